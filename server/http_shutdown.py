"""Ending the HTTP responses still open when the standalone server stops, before uvicorn does.

Tier: application wiring. `server.app.serve_http` wraps its ASGI app in `HttpShutdown` and calls
`close()` between the graceful drain and telling uvicorn to exit.

A client of the handshake era (protocol 2025-11-25 and earlier: the MCP Inspector by default,
the SDK's `Client(url, mode="legacy")`) keeps a GET /mcp open after `initialize`: a
`text/event-stream` response for what the server sends unprompted, which never ends by itself.
Left open until uvicorn exits, it is cut instead of ended. Measured with mcp 2.3.0, sse-starlette
3.7.0 and uvicorn 0.54.0: once `uvicorn.Server.should_exit` is set, sse-starlette's shutdown
watcher (it polls that flag every 0.5 s, finding the server through the SIGTERM handler) cancels
the response, which returns without its last, empty chunk. uvicorn then logs `ERROR ... ASGI
callable returned without completing response` once per open stream and closes the connection,
and the client reads an incomplete chunked body. Without the watcher, uvicorn's graceful-shutdown
timeout would cancel the response instead, with an ERROR and a traceback. The SDK's session
manager, which would close these streams, stops only in the lifespan shutdown, after both.

So `HttpShutdown` notes each GET whose response starts as an event stream. `close(within)`
cancels those (and any that starts later) and sends the final empty body itself, so each
response ends properly. They carry nothing the client is still owed: the answer to a request
goes out on the POST that asked for it. `close` then waits, up to `within` seconds, for the
other requests in flight (responses on their way out, `server_shutdown`'s own report among
them) so that uvicorn does not cut those either.

A POST still in flight after that wait, unless it is writing its answer (below), is a call whose
work holds its cancellation off past the drain (a shielded wait, `anyio.to_thread.run_sync`
without `abandon_on_cancel`): its session ended at the deadline, but its handler writes nothing
until the work ends. Left to uvicorn, it
would be cancelled after its grace second, the client would get a transport error, and the log an
ERROR with a traceback. So each POST's body is kept as it is received (up to `MAX_BODY_BYTES`),
and such a request is answered here (`server.unanswered`): a plain JSON response if its response
has not started, else one last `message` event on its event stream. The app runs each POST in a
task of its own, which is then left running (its later messages go nowhere), so that the request
ends; `left_behind()` counts those tasks, and the lifespan's shutdown, which in the handshake era
waits for the sessions they run in, is then given `LEFT_BEHIND_GRACE` seconds, not forever. The
server exits without them (`server.app._report_exit`).

A POST whose body has not fully arrived by then (its client sent the head and stalled: no
`http.request` message without `more_body` yet) has no request to answer, and its app waits for
the body until uvicorn cancels it: an ERROR with a traceback for each such request (a client
holding 10,000 of them made 8.7 MB of log at the exit), and a `500` for its client. So it is
answered here too, `503` with `Connection: close` and `BODY_MISSING`, and its app task cancelled
and left as above. So is a POST that comes in after that, while the listener is still open,
whose body has not arrived within `LATE_BODY_SECONDS`. Everything else passes through untouched.

An answer larger than the sockets' buffers is handed whole to uvicorn, which writes it as its
client reads. Left to uvicorn, a client slow to read it during the drain would lose what it had
not read yet, though the call completed: uvicorn gives the connection its graceful-shutdown
second, logs an ERROR, and the process exits with megabytes unsent (on an event stream, the app is
still in flight, held in `send` while the write buffer is full: it would be answered a second
time as above, and cancelled, with tracebacks). So a POST whose app is in `send` with a body, or has
sent its answer on its event stream (`_ANSWER_EVENT`), is writing its answer: not answered
again, nor counted as still in flight. Then `close(within, flush)` waits, through `flush`
(`ConnectionGuard.flush`), until the connections have written what they hold, cutting those
still writing `WRITE_SECONDS` after `close` began; the cut ones are told in one line. (No shorter
bound for a client that seems to read nothing: a write is seen only once the kernel's send queue,
megabytes on loopback, has half emptied, so a client reading steadily at a few hundred KB/s
looked stalled.)

Example:
    ```python
    http = HttpShutdown(server.streamable_http_app())
    ...  # serve `http` with uvicorn; once the drain has finished:
    await http.close(within=2.0, flush=guard.flush)  # guard: the ConnectionGuard of its connections
    uvicorn_server.should_exit = True
    ```
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.unanswered import (
    ANSWERED,
    LEFT_BEHIND_GRACE,
    MAX_BODY_BYTES,
    WRITE_SECONDS,
    SessionOf,
    abandoned_answer_to,
)

logger = logging.getLogger(__name__)

_LAST_CHUNK: Message = {"type": "http.response.body", "body": b"", "more_body": False}
#: After answering the requests left running, how long to wait for the answers to go out.
ANSWER_SECONDS = 1.0
#: The text of the `503` that answers, at the exit, a POST whose body has not (fully) arrived.
BODY_MISSING = "The server is shutting down; the request's body had not arrived.\n"
#: A POST that comes in once `close` has answered those in flight (the listener is still open for
#: a moment) is answered `BODY_MISSING` if its body has not arrived within this many seconds: less
#: than uvicorn's graceful-shutdown timeout (1 s, `server.app.serve_http`), which would cancel it.
LATE_BODY_SECONDS = 0.5
#: What waits for the connections to write what they hold (`ConnectionGuard.flush`): given the
#: loop time to stop at, it returns how many were cut.
Flush = Callable[[float], Awaitable[int]]
#: The head of an event carrying a JSON-RPC response (the SDK writes `jsonrpc`, `id`, then
#: `result` or `error`), after an `id:` or `event:` line: on a POST's event stream, its answer.
_ANSWER_EVENT = re.compile(
    rb'(?:[a-z]+:[^\n]*\n)*data: \{"jsonrpc":"2\.0","id":(?:-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)":'
)
#: How far into an event that head is looked for.
_ANSWER_HEAD = 512


class _Post:
    """One POST in flight: its body as received, how far its response got, and its answer at the exit.

    Every POST makes one (plain asyncio primitives and slots: it is made on every request)."""

    __slots__ = (
        "body",
        "too_large",
        "complete",
        "started",
        "event_stream",
        "ended",
        "writing",
        "gave_answer",
        "answer",
        "refused",
        "wake",
    )

    def __init__(self, wake: asyncio.Future[None]) -> None:
        self.body = bytearray()
        self.too_large = False
        #: The body has fully arrived (an `http.request` message without `more_body`).
        self.complete = False
        self.started = False
        self.event_stream = False
        self.ended = False
        #: The app is in `send` with a body message (held there while its client is slow to read).
        self.writing = False
        #: The app has sent its answer on its event stream (the response's last chunk may be to come).
        self.gave_answer = False
        #: The JSON-RPC message to end the response with, once `close` gives up waiting for the app.
        self.answer: bytes | None = None
        #: Answered `BODY_MISSING` at the exit, its body not having arrived.
        self.refused = False
        #: Done when the app has returned, or when `answer` is set or the request `refused`.
        self.wake = wake

    def done(self, _task: object = None) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def received(self, message: Message) -> None:
        if message["type"] != "http.request":
            return
        if not message.get("more_body", False):
            self.complete = True
        if self.too_large:
            return
        chunk = message.get("body", b"")
        if len(self.body) + len(chunk) > MAX_BODY_BYTES:
            self.too_large = True
            self.body = bytearray()
        else:
            self.body += chunk

    def sending(self, message: Message) -> None:
        if message["type"] != "http.response.body":
            return
        self.writing = True
        if self.event_stream and not self.gave_answer:
            self.gave_answer = _ANSWER_EVENT.match(message.get("body", b""), 0, _ANSWER_HEAD) is not None

    def sent(self, message: Message) -> None:
        self.writing = False
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = _is_event_stream(message)
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True

    @property
    def delivering(self) -> bool:
        """Whether the app's answer is being written (or its client is slow to read what comes first)."""
        return self.writing or self.gave_answer

    @property
    def answered(self) -> bool:
        """Whether `close` has taken this request over: the app's own messages go nowhere from now on."""
        return self.answer is not None or self.refused

    def refuse_now(self) -> bool:
        """Take the request over to answer it `BODY_MISSING` if its body has not arrived (nor its
        response started); False otherwise."""
        if self.complete or self.started or self.ended:
            return False
        self.refused = True
        self.done()
        return True

    def answer_now(self, server_info: Mapping[str, Any] | None = None, session_of: SessionOf | None = None) -> bool:
        """Take the answer to give at the exit (`server_info` and `session_of` as
        `abandoned_answer`'s); False if there is none to give (then uvicorn ends it)."""
        if self.refused or self.ended or self.too_large or self.delivering or (self.started and not self.event_stream):
            return False
        self.answer = abandoned_answer_to(bytes(self.body), server_info, session_of)
        if self.answer is None:
            return False
        self.done()
        return True


class HttpShutdown:
    """An ASGI app around `app` that can end its open GET event streams and wait for the rest."""

    def __init__(
        self, app: ASGIApp, server_info: Mapping[str, Any] | None = None, session_of: SessionOf | None = None
    ) -> None:
        self.app = app
        #: The server's `serverInfo` stamp, which an answer given at the exit on protocol 2026-07-28 carries.
        self.server_info = server_info
        #: The session of a call an answer given at the exit is for (`abandoned_answer`'s).
        self.session_of = session_of
        #: One cancel scope per GET whose event stream has started and not ended.
        self._streams: set[anyio.CancelScope] = set()
        self._posts: set[_Post] = set()
        #: Tasks of requests answered at the exit, and of a lifespan not waited for, still running.
        self._left: set[asyncio.Task[None]] = set()
        #: Requests answered at the exit (their work held the cancellation off).
        self._answered = 0
        self._in_flight = 0
        self._fewer: anyio.Event | None = None
        self._closing = False
        #: `close` has answered the POSTs in flight: a POST from now on gets `LATE_BODY_SECONDS`.
        self._late = False
        self._refused_late = 0

    def left_behind(self) -> int:
        """How many of the app's tasks are still running though their request was answered at the exit."""
        return sum(not task.done() for task in self._left)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._in_flight += 1
        try:
            if scope["method"] == "GET":
                await self._serve_get(scope, receive, send)
            elif scope["method"] == "POST":
                await self._serve_post(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            if self._fewer is not None:
                self._fewer.set()

    async def _serve_get(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = False  # an event stream has started and its last chunk is not sent yet
        with anyio.CancelScope() as stream:

            async def watch(message: Message) -> None:
                nonlocal streaming
                await send(message)
                if message["type"] == "http.response.start" and _is_event_stream(message):
                    streaming = True
                    self._streams.add(stream)
                    if self._closing:
                        stream.cancel()
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    streaming = False

            try:
                await self.app(scope, receive, watch)
            finally:
                self._streams.discard(stream)
        if stream.cancel_called and streaming:
            await send(_LAST_CHUNK)

    async def _serve_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        post = _Post(loop.create_future())

        async def capture() -> Message:
            message = await receive()
            post.received(message)
            return message

        async def watch(message: Message) -> None:
            if post.answered:
                return  # answered at the exit: the app's late messages go nowhere
            if post.ended:
                # A second response after a whole one: the SDK answers a notification 202 first,
                # and when delivering it then fails (its client's session closed meanwhile, by
                # the client's DELETE) it sends a 500 as well, which uvicorn refused with an
                # ERROR and a traceback for each. The client has its answer: nothing more goes.
                return
            post.sending(message)
            await send(message)
            post.sent(message)

        task: asyncio.Task[None] = loop.create_task(_run(self.app, scope, capture, watch))
        task.add_done_callback(post.done)
        self._posts.add(post)
        late = loop.call_later(LATE_BODY_SECONDS, self._refuse_late, post) if self._late else None
        try:
            await post.wake
        except BaseException:
            task.cancel()  # uvicorn cancels the request (its graceful-shutdown timeout): the app with it
            raise
        finally:
            self._posts.discard(post)
            if late is not None:
                late.cancel()
        if not post.answered:
            try:
                await task  # the app's own ending (done already), its exception included
            except anyio.ClosedResourceError:
                if not post.ended:
                    raise
                # Its answer was whole (the SDK's 202 for a notification) when delivering the
                # message failed, its client having ended the session meanwhile (its DELETE): the
                # client's doing, and nothing is left to answer (uvicorn logged an ERROR for it).
                logger.debug("A client's message came as the client ended its session")
            return
        # Its work holds the cancellation off, or it waits for a body that may never come: it
        # unwinds what it can, and is left running.
        task.cancel()
        task.add_done_callback(_retrieve)
        self._left.add(task)
        if post.answer is None:
            body = BODY_MISSING.encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # what is left of its body must not be read as a request
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        elif post.started:
            event = b"event: message\r\ndata: " + post.answer + b"\r\n\r\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send(_LAST_CHUNK)
        else:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(post.answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": post.answer, "more_body": False})

    def _refuse_late(self, post: _Post) -> None:
        if post.refuse_now():
            self._refused_late += 1

    async def _serve_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, whose shutdown is not waited for past `LEFT_BEHIND_GRACE` once
        requests have been left running (in the handshake era it waits for their sessions)."""
        stopping = anyio.Event()
        given_up = False

        async def watch_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                stopping.set()
                if self._refused_late:  # uvicorn is done with the connections: all are counted
                    logger.warning(
                        "Answered %s HTTP request(s) that came in as the server stopped 503: "
                        "their body had not arrived within %ss",
                        self._refused_late,
                        LATE_BODY_SECONDS,
                    )
            return message

        async def watch_send(message: Message) -> None:
            if not given_up:
                await send(message)

        async def run() -> None:
            try:
                await self.app(scope, watch_receive, watch_send)
            finally:
                stopping.set()

        task = _start(run())
        await stopping.wait()
        with anyio.move_on_after(LEFT_BEHIND_GRACE if self._answered else math.inf):
            await asyncio.wait({task})
        if task.done():
            await task
            return
        given_up = True
        self._left.add(task)
        logger.info("Not waiting for the application's shutdown: it waits for work left running")

    async def close(self, within: float, flush: Flush | None = None) -> None:
        """End every open GET event stream, then wait up to `within` seconds for the requests
        still in flight; GET event streams that start from now on are ended at once. A POST still
        in flight then is answered here, if its body is a JSON-RPC request and its app is not
        writing its answer, and left running; one whose body has not arrived is answered `503`
        (`BODY_MISSING`) and its app task cancelled. Then `flush` waits for the answers still
        being written (see the module)."""
        began = anyio.current_time()
        self._closing = True
        # The POSTs in flight at the drain's end: one still in flight `within` seconds later is held
        # by its work. One that comes in meanwhile is a new request, answered by the app (a call
        # refused, shutting down) however busy the server is; it is never taken for a held one.
        drained = set(self._posts)
        if self._streams:
            logger.info("Ending %s open event stream(s)", len(self._streams))
        for stream in self._streams:
            stream.cancel()
        with anyio.move_on_after(within):
            await self._wait_until(lambda: drained.isdisjoint(self._posts) and not self._in_flight)
        self._late = True  # the POSTs in flight now are dealt with below; any later one in its turn
        held = [post for post in self._posts if post in drained]
        if held:
            await self._answer_held(within, held)
        if flush is None:
            return
        cut = await flush(began + WRITE_SECONDS)
        if cut:
            logger.warning(
                "%s HTTP response(s) still being written to slow clients were cut %ss after the drain: their "
                "clients had not read them by then (too slowly, or not at all)",
                cut,
                WRITE_SECONDS,
            )
            # The requests that were writing to those connections end now (uvicorn's `send` returns).
            with anyio.move_on_after(ANSWER_SECONDS):
                await self._wait_until(lambda: not any(post.writing for post in self._posts))

    async def _answer_held(self, within: float, posts: list[_Post]) -> None:
        """Answer `posts`, in flight since the drain's end and still `within` seconds later, that
        are not writing their answer, and wait for those answers to be handed to uvicorn."""
        still = len(posts) - sum(post.delivering for post in posts)  # those writing are `flush`'s
        if not still:
            return
        refusing = [post for post in posts if post.refuse_now()]
        answering = [post for post in posts if post.answer_now(self.server_info, self.session_of)]
        refused, answered = len(refusing), len(answering)
        self._answered += answered
        what = []
        if answered:
            what.append(f"{answered} request(s) {ANSWERED}")
        if refused:
            what.append(f"answered {refused} HTTP request(s) whose body had not arrived 503 (shutting down)")
        if what:
            logger.warning(
                "Stopping with %s HTTP request(s) still in flight after %ss: %s", still, within, "; ".join(what)
            )
            with anyio.move_on_after(ANSWER_SECONDS):
                await self._wait_until(lambda: self._posts.isdisjoint(refusing) and self._posts.isdisjoint(answering))
        else:
            logger.warning("Stopping with %s HTTP request(s) still in flight after %ss", still, within)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()`, read again each time a request ends."""
        while not done():
            self._fewer = anyio.Event()
            await self._fewer.wait()


def _start(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """`work` as a task of its own, which its caller may stop waiting for; an exception it raises
    after that is not reported as never retrieved."""
    task = asyncio.get_running_loop().create_task(work)
    task.add_done_callback(_retrieve)
    return task


async def _run(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    await app(scope, receive, send)  # an ASGI app returns an awaitable; a task needs a coroutine


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Retrieve a left task's exception, so that it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def _is_event_stream(start: Message) -> bool:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return bool(value.split(b";")[0].strip().lower() == b"text/event-stream")
    return False
