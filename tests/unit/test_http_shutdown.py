"""`HttpShutdown` on its own, around small ASGI apps: which responses `close()` ends, which it
waits for, and what each client receives. The real stack (uvicorn, the SDK's event streams) is
driven by the SIGTERM tests in `tests/e2e/test_http.py`."""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
import anyio.lowlevel
import pytest
from mcp_types import INTERNAL_ERROR
from starlette.types import Message, Receive, Scope, Send

from server.http_shutdown import HttpShutdown, _Post
from server.unanswered import MAX_BODY_BYTES, abandoned_answer_to

LAST_CHUNK: Message = {"type": "http.response.body", "body": b"", "more_body": False}
EVENT_STREAM = [(b"content-type", b"text/event-stream; charset=utf-8")]


class Exchange:
    """One request through the wrapper: what its client was sent, and when it started and ended."""

    def __init__(self, http: HttpShutdown, method: str, path: str = "/mcp") -> None:
        self.http = http
        self.scope: Scope = {"type": "http", "method": method, "path": path, "headers": []}
        self.sent: list[Message] = []
        self.started = anyio.Event()
        self.ended = anyio.Event()

    async def _receive(self) -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def _send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.started.set()

    async def run(self) -> None:
        try:
            await self.http(self.scope, self._receive, self._send)
        finally:
            self.ended.set()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /mcp: an event stream that never ends by itself (like the SDK's); GET /healthz: a
    plain response; POST: a response that waits for `release` (set on the app) before it ends."""
    if scope["method"] == "GET" and scope["path"] == "/mcp":
        await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
        await send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})
        await anyio.sleep_forever()
    elif scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
        await send({"type": "http.response.body", "body": b"event: message\r\n\r\n", "more_body": True})
        await scope["release"].wait()
        await send({"type": "http.response.body", "body": b"data: {}\r\n\r\n", "more_body": False})


async def test_a_second_response_after_a_whole_one_is_not_sent() -> None:
    # The SDK answers a notification 202, then, if delivering it fails (its client ended the
    # session meanwhile), sends a 500 too: uvicorn refused that with an ERROR and a traceback.
    accepted: list[Message] = [
        {"type": "http.response.start", "status": 202, "headers": []},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]

    async def accepts_then_fails(scope: Scope, receive: Receive, send: Send) -> None:
        for message in accepted:
            await send(message)
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})
        raise anyio.ClosedResourceError  # its own failure to deliver the 500's error to the session

    post = Exchange(HttpShutdown(accepts_then_fails), "POST")
    with anyio.fail_after(5):
        await post.run()  # nothing raised for uvicorn to log as an error
    assert post.sent == accepted


async def test_an_app_failing_before_its_response_is_whole_still_raises() -> None:
    async def fails_half_way(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
        raise anyio.ClosedResourceError

    with anyio.fail_after(5), pytest.raises(anyio.ClosedResourceError):
        await Exchange(HttpShutdown(fails_half_way), "POST").run()


async def test_close_ends_an_open_get_event_stream_with_its_last_chunk() -> None:
    http = HttpShutdown(app)
    stream = Exchange(http, "GET")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await stream.started.wait()
            await http.close(within=5)
            assert stream.ended.is_set()  # close returns once the stream's request has ended
    assert stream.sent[-1] == LAST_CHUNK
    assert [m for m in stream.sent if m == LAST_CHUNK] == [LAST_CHUNK]


async def test_close_waits_for_a_post_in_flight_and_leaves_its_response_alone() -> None:
    http = HttpShutdown(app)
    post = Exchange(http, "POST")
    release = anyio.Event()
    post.scope["release"] = release
    closed = anyio.Event()

    async def close() -> None:
        await http.close(within=5)
        closed.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post.run)
            await post.started.wait()
            tg.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            assert not closed.is_set() and not post.ended.is_set()  # an event stream, but not a GET's
            release.set()
            await closed.wait()
    assert post.sent[-1] == {"type": "http.response.body", "body": b"data: {}\r\n\r\n", "more_body": False}


async def test_a_get_event_stream_that_starts_after_close_is_ended_at_once() -> None:
    http = HttpShutdown(app)
    with anyio.fail_after(5):
        await http.close(within=5)
        late = Exchange(http, "GET")
        await late.run()
    assert late.sent[0]["type"] == "http.response.start"
    assert late.sent[-1] == LAST_CHUNK


async def test_other_responses_and_the_lifespan_pass_through_untouched() -> None:
    http = HttpShutdown(app)
    health = Exchange(http, "GET", "/healthz")
    lifespan: list[Scope] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        lifespan.append(scope)

    with anyio.fail_after(5):
        await health.run()
        await HttpShutdown(lifespan_app)({"type": "lifespan"}, health._receive, health._send)
        await http.close(within=5)
    assert health.sent == [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]},
        {"type": "http.response.body", "body": b"ok", "more_body": False},
    ]
    assert lifespan == [{"type": "lifespan"}]


async def test_close_gives_up_on_a_request_that_does_not_end_within_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    http = HttpShutdown(app)
    post = Exchange(http, "POST")
    post.scope["release"] = anyio.Event()  # never set
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post.run)
            await post.started.wait()
            with caplog.at_level(logging.WARNING, logger="server.http_shutdown"):
                await http.close(within=0.1)
            tg.cancel_scope.cancel()
    assert "Stopping with 1 HTTP request(s) still in flight after 0.1s" in caplog.text


async def reads_body(scope: Scope, receive: Receive, send: Send) -> None:
    """POST: read the whole body (as the SDK does before it answers), then answer it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class PartBody(Exchange):
    """A POST whose client sends the first part of its body and then nothing more."""

    def __init__(self, http: HttpShutdown) -> None:
        super().__init__(http, "POST")
        self.parts = [{"type": "http.request", "body": b'{"jsonrpc"', "more_body": True}]
        self.reading = anyio.Event()

    async def _receive(self) -> Message:
        if self.parts:
            return self.parts.pop()
        self.reading.set()
        return await super()._receive()


async def test_close_answers_503_to_a_post_whose_body_has_not_arrived_and_cancels_its_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancelled = anyio.Event()

    async def app_noting_cancel(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await reads_body(scope, receive, send)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    http = HttpShutdown(app_noting_cancel)
    post = PartBody(http)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post.run)
            await post.reading.wait()
            with caplog.at_level(logging.WARNING, logger="server.http_shutdown"):
                await http.close(within=0.1)
            await post.ended.wait()
            await cancelled.wait()
    body = b"The server is shutting down; the request's body had not arrived.\n"
    assert post.sent == [
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        },
        {"type": "http.response.body", "body": body, "more_body": False},
    ]
    assert "answered 1 HTTP request(s) whose body had not arrived 503" in caplog.text
    assert http.left_behind() == 0  # its app task ended on the cancel


async def test_close_answers_a_post_whose_body_arrived_as_before_with_its_json_rpc_answer() -> None:
    # The whole body is there and its work holds on: the answer is the request's own, not a 503.
    holding = anyio.Event()

    async def holds_on(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        holding.set()
        await anyio.sleep_forever()

    http = HttpShutdown(holds_on)
    post = Exchange(http, "POST")
    request = b'{"jsonrpc": "2.0", "id": 7, "method": "ping"}'
    parts = [{"type": "http.request", "body": request[20:], "more_body": False}]
    parts.append({"type": "http.request", "body": request[:20], "more_body": True})

    async def receive() -> Message:
        if not parts:
            await anyio.sleep_forever()
        return parts.pop()

    post._receive = receive  # type: ignore[method-assign]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post.run)
            await holding.wait()
            await http.close(within=0.1)
            await post.ended.wait()
    start, body = post.sent
    assert start["status"] == 200 and (b"content-type", b"application/json") in start["headers"]
    answer = json.loads(body["body"])
    assert answer["id"] == 7 and "held its cancellation off" in answer["error"]["message"], answer


async def test_a_post_that_comes_in_after_close_is_answered_503_if_its_body_does_not_follow() -> None:
    http = HttpShutdown(reads_body)
    with anyio.fail_after(5):
        await http.close(within=0.1)  # nothing in flight: it returns at once, and uvicorn is told to stop
        late = PartBody(http)
        await late.run()  # ends: answered without its body, before uvicorn's own cancel would come
    assert late.sent[0]["status"] == 503 and late.sent[-1]["more_body"] is False


class Post(Exchange):
    """A POST whose body is the JSON-RPC request `request`; with `slow`, its client reads nothing,
    so that the app's `send` of a body never returns (uvicorn holds it while the buffer is full)."""

    def __init__(self, http: HttpShutdown, request: bytes, slow: bool = False) -> None:
        super().__init__(http, "POST")
        self.parts = [{"type": "http.request", "body": request, "more_body": False}]
        self.slow = slow

    async def _receive(self) -> Message:
        return self.parts.pop() if self.parts else await super()._receive()

    async def _send(self, message: Message) -> None:
        await super()._send(message)
        if self.slow and message["type"] == "http.response.body":
            await anyio.sleep_forever()


async def test_close_does_not_answer_again_a_post_writing_its_answer_and_answers_one_whose_work_holds_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On an event stream, the app writes what it has to say, then the last chunk: a POST whose
    # answer has gone out (its last chunk to come), or whose app is held in `send` by a client
    # slow to read, is being answered; only one whose work holds on (after a notification, say)
    # is answered at the exit.
    notification = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n'
    answer = b'event: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\r\n\r\n'
    sent_all = anyio.Event()
    count = 0

    async def writes_then_holds(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal count
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
        await send({"type": "http.response.body", "body": scope["event"], "more_body": True})
        count += 1
        if count == 2:
            sent_all.set()
        await anyio.sleep_forever()  # the work holds on, or the last chunk is still to come

    http = HttpShutdown(writes_then_holds)
    answered = Post(http, b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}')
    answered.scope["event"] = answer
    slow = Post(http, b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call"}', slow=True)
    slow.scope["event"] = notification
    holding = Post(http, b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call"}')
    holding.scope["event"] = notification
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for post in (answered, slow, holding):
                tg.start_soon(post.run)
            await sent_all.wait()
            await slow.started.wait()
            with caplog.at_level(logging.WARNING, logger="server.http_shutdown"):
                await http.close(within=0.1)
            await holding.ended.wait()
            assert not answered.ended.is_set() and not slow.ended.is_set()
            tg.cancel_scope.cancel()
    assert [m["body"] for m in answered.sent[1:]] == [answer]
    assert [m["body"] for m in slow.sent[1:]] == [notification]
    *_, last_event, last_chunk = holding.sent
    assert last_chunk == LAST_CHUNK
    assert json.loads(last_event["body"].split(b"data: ")[1])["id"] == 3
    assert "Stopping with 1 HTTP request(s) still in flight after 0.1s: 1 request(s) answered shutting_down" in (
        caplog.text
    )


async def test_close_does_not_take_a_post_that_came_in_after_the_drain_for_a_held_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under steady load a request is always in flight: one that came in just before `within`
    # passed was answered "held its cancellation off" as if its work had held the drain.
    releases = {"/first": anyio.Event(), "/late": anyio.Event()}
    holding = {"/first": anyio.Event(), "/late": anyio.Event()}

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        holding[scope["path"]].set()
        await releases[scope["path"]].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"its own answer", "more_body": False})

    http = HttpShutdown(slow)
    first, late = Exchange(http, "POST", "/first"), Exchange(http, "POST", "/late")
    for exchange in (first, late):
        body: list[Message] = [
            {"type": "http.request", "body": b'{"jsonrpc": "2.0", "id": 3, "method": "ping"}', "more_body": False}
        ]

        async def receive(body: list[Message] = body) -> Message:
            if not body:
                await anyio.sleep_forever()
            return body.pop()

        exchange._receive = receive  # type: ignore[method-assign]
    with anyio.fail_after(5), caplog.at_level(logging.WARNING, logger="server.http_shutdown"):
        async with anyio.create_task_group() as tg:
            closed = anyio.Event()

            async def close() -> None:
                await http.close(within=0.2)
                closed.set()

            tg.start_soon(first.run)
            await holding["/first"].wait()
            tg.start_soon(close)  # the drain is over: `first` is in flight
            await anyio.lowlevel.checkpoint()
            tg.start_soon(late.run)  # a new request, as the server stops
            await holding["/late"].wait()
            releases["/first"].set()  # `first` ends in time; `late` is still in flight at `within`
            await closed.wait()
            releases["/late"].set()
            await late.ended.wait()
    for exchange in (first, late):
        assert [m.get("body") for m in exchange.sent if m["type"] == "http.response.body"] == [b"its own answer"]
    assert "held its cancellation off" not in caplog.text and "Stopping with" not in caplog.text, caplog.text


def test_the_exit_answer_to_a_held_request_other_than_a_tool_call_is_an_internal_error_naming_its_method() -> None:
    body = b'{"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "file:///a"}}'

    answer = abandoned_answer_to(body)

    assert answer is not None
    error = json.loads(answer)["error"]
    assert error["code"] == INTERNAL_ERROR == -32603
    assert error["message"] == (
        "the server stopped while 'resources/read' still ran: it held its cancellation off past the "
        "shutdown deadline and was abandoned"
    )


@pytest.mark.parametrize("request_id", [b"7", b"-1", b'"a-1"'], ids=["positive", "negative", "string"])
async def test_an_answer_event_is_recognised_whatever_the_form_of_its_id(request_id: bytes) -> None:
    post = _Post(asyncio.get_running_loop().create_future())
    post.sent({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
    event = b'event: message\ndata: {"jsonrpc":"2.0","id":' + request_id + b',"result":{}}\n\n'

    post.sending({"type": "http.response.body", "body": event, "more_body": True})

    assert post.gave_answer


async def test_a_body_of_exactly_the_limit_is_kept_and_one_byte_more_is_not() -> None:
    post = _Post(asyncio.get_running_loop().create_future())
    post.received({"type": "http.request", "body": b"x" * (MAX_BODY_BYTES - 1), "more_body": True})
    post.received({"type": "http.request", "body": b"x", "more_body": True})
    assert (post.too_large, len(post.body)) == (False, MAX_BODY_BYTES)

    post.received({"type": "http.request", "body": b"x", "more_body": False})
    assert (post.too_large, len(post.body), post.complete) == (True, 0, True)
