"""Malformed protocol traffic over stdio and streamable HTTP: each gets a protocol error (not a
tool result, not silence), no session is created, and the server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import pytest

from tests.e2e.conftest import PROTOCOL_VERSION, ServerProcess, metrics, server_config, start_server
from tests.helpers import text_of
from tests.hostile.conftest import Raw

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
SESSION_COUNTERS = ("total_sessions_created", "active_sessions")

#: Lines that are not JSON-RPC messages at all, and the protocol error each gets over stdio.
UNREADABLE_LINES = [
    pytest.param("{not json", PARSE_ERROR, id="invalid-json"),
    pytest.param('{"jsonrpc": "2.0", "id": 1, "method": "ping"', PARSE_ERROR, id="truncated"),
    pytest.param("\x00\x01\x02 binary", PARSE_ERROR, id="control-bytes"),
    pytest.param("x" * (20 * 1024 * 1024), PARSE_ERROR, id="20MB-of-garbage"),
    pytest.param('{"hello": "world"}', INVALID_REQUEST, id="json-not-jsonrpc"),
    pytest.param("[]", INVALID_REQUEST, id="empty-batch"),
    pytest.param("42", INVALID_REQUEST, id="a-number"),
]


@pytest.mark.parametrize(("line", "code"), UNREADABLE_LINES)
def test_an_unreadable_line_over_stdio_gets_a_protocol_error_and_the_server_stays_up(
    raw: Raw, line: str, code: int
) -> None:
    before = raw.metrics()
    seen = len(raw.server.unreadable_errors)

    raw.portal.call(raw.server.send_line, line)

    error = raw.portal.call(raw.server.next_unreadable_error, seen)
    assert error["id"] is None and error["error"]["code"] == code, error
    after = raw.metrics()
    assert [after[k] for k in SESSION_COUNTERS] == [before[k] for k in SESSION_COUNTERS]


def surrogate_call(text: str) -> Callable[[int], str]:
    """An `echo` call of `text` as `json.dumps` writes it: a lone surrogate as its `\\u` escape."""
    return lambda request_id: json.dumps(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}},
        }
    )


@pytest.mark.parametrize(
    ("text", "read_as"),
    [
        pytest.param("report-\udcff.txt", "report-\ufffd.txt", id="low-surrogate"),
        pytest.param("cut \ud83d", "cut \ufffd", id="high-surrogate-at-the-end"),
        pytest.param("\ud800\ud800 \U0001f600", "\ufffd\ufffd \U0001f600", id="two-high-and-a-pair"),
    ],
)
def test_a_request_holding_a_lone_surrogate_escape_is_served_with_replacement_characters(
    raw: Raw, text: str, read_as: str
) -> None:
    # Valid JSON (RFC 8259's grammar) that Python's json.dumps and JavaScript's JSON.stringify
    # write; the SDK's reader refused it, and the request got a parse error with id null.
    response = raw.portal.call(raw.server.request_text, surrogate_call(text))

    assert response["result"]["content"][0]["text"] == read_as, response
    raw.portal.call(raw.server.wait_stderr, "held 1 lone UTF-16 surrogate escape(s)")


def test_a_lone_surrogate_escape_in_a_line_too_long_to_read_again_is_answered_with_its_id(raw: Raw) -> None:
    filler = "x" * (1024 * 1024)

    error = raw.portal.call(raw.server.request_text, surrogate_call(filler + "\udcff"))

    assert error["error"]["code"] == PARSE_ERROR, error
    assert "lone UTF-16 surrogate" in error["error"]["message"], error
    assert raw.metrics()["active_sessions"] == 0  # still serving


def test_a_lone_surrogate_escape_in_json_that_is_not_json_rpc_is_answered_as_such_with_its_id(raw: Raw) -> None:
    error = raw.portal.call(
        raw.server.request_text,
        lambda request_id: f'{{"jsonrpc":"2.0","id":{request_id},"method":42,"params":{{"n":"\\udcff"}}}}',
    )

    assert error["error"]["code"] == INVALID_REQUEST, error


WRONG_REQUESTS = [
    pytest.param("no/such/method", {}, METHOD_NOT_FOUND, id="unknown-method"),
    pytest.param("tools/call", {"name": 42, "arguments": {}}, INVALID_PARAMS, id="tool-name-not-a-string"),
    pytest.param("tools/call", {"arguments": {}}, INVALID_PARAMS, id="tool-name-missing"),
    pytest.param("tools/call", {"name": "echo", "arguments": "text"}, INVALID_PARAMS, id="arguments-not-an-object"),
    pytest.param("resources/read", {"uri": 7}, INVALID_PARAMS, id="bad-params-for-a-method"),
]


@pytest.mark.parametrize(("method", "params", "code"), WRONG_REQUESTS)
def test_a_well_formed_but_wrong_request_over_stdio_gets_its_json_rpc_error(
    raw: Raw, method: str, params: dict[str, Any], code: int
) -> None:
    before = raw.metrics()

    response = raw.request(method, params)

    assert "error" in response and response["error"]["code"] == code, response
    after = raw.metrics()
    assert [after[k] for k in SESSION_COUNTERS] == [before[k] for k in SESSION_COUNTERS]


def test_an_unknown_tool_over_stdio_is_refused_without_a_session(raw: Raw) -> None:
    before = raw.metrics()

    response = raw.call("no_such_tool", {})

    refused = response.get("error") or response["result"]
    assert "no_such_tool" in json.dumps(refused), response
    assert raw.metrics()["total_sessions_created"] == before["total_sessions_created"]


@pytest.mark.parametrize("request_id", [{"x": 1}, [1], True, 1.5, None], ids=repr)
def test_a_cancellation_naming_an_id_no_request_can_have_is_ignored_and_the_call_still_answers(
    raw: Raw, request_id: Any
) -> None:
    # The server's stdin relay looked the id up before the SDK checked it: an object or an array
    # (unhashable) ended the server with a traceback, and the call in flight went unanswered.
    async def call_through_the_cancellation() -> Any:
        call = await raw.server.start_call("sleep_async", {"seconds": 0.2})
        await raw.server.notify("notifications/cancelled", {"requestId": request_id})
        return await raw.server.call_result(call)

    result = raw.portal.call(call_through_the_cancellation)

    assert text_of(result) == "slept 0.2s"
    assert raw.server.returncode is None, raw.server.stderr


@pytest.mark.parametrize("request_id", ["null", '{"o": 1}', "[1]", "true", "1.5"])
def test_a_request_with_an_id_json_rpc_cannot_use_gets_no_answer_but_a_warning_saying_why(
    raw: Raw, request_id: str
) -> None:
    # JSON-RPC reads it as a notification (no answer may be sent): the log must say why the
    # client hears nothing, and the server serves on.
    method = f"ping/{len(raw.server.stderr)}"  # a name of its own, to find this line in the log
    raw.portal.call(raw.server.send_line, f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "{method}"}}')

    raw.portal.call(raw.server.wait_stderr, f"No answer to {method!r}: it came with no id, or an id that is not")
    assert raw.metrics()["active_sessions"] == 0  # still serving


@pytest.mark.parametrize(
    "template",
    ['{{"jsonrpc": "2.0", "id": {id}, "method": 42}}', '{{"jsonrpc": "1.0", "id": {id}, "method": "ping"}}'],
    ids=["method-not-a-string", "wrong-version"],
)
def test_a_request_that_is_not_json_rpc_but_has_a_readable_id_is_answered_with_it(raw: Raw, template: str) -> None:
    # JSON-RPC answers with id null only when the id cannot be read: the client hears at once
    # which of its requests was wrong.
    response = raw.portal.call(raw.server.request_text, lambda request_id: template.format(id=request_id))
    assert response["error"]["code"] == INVALID_REQUEST, response


def test_an_integer_too_long_to_read_is_answered_at_once_with_its_request_s_id(raw: Raw) -> None:
    # JSON with a 5000-digit integer (in metadata, say) is refused by the reader before any tool
    # sees it: the answer names the request (an error with id null left the client waiting out its
    # timeout) and says what to do.
    before = raw.metrics()
    metadata = '{"n": ' + "9" * 5000 + "}"

    def build(request_id: int) -> str:
        params = '{"name": "session_create", "arguments": {"metadata": ' + metadata + "}}"
        return f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", "params": {params}}}'

    response = raw.portal.call(raw.server.request_text, build)

    assert response["error"] == {
        "code": INVALID_PARAMS,
        "message": "Invalid params: a number in the message has more than 4300 digits, more than this server "
        "reads; send such a number as a string",
    }, response
    after = raw.metrics()
    assert [after[k] for k in SESSION_COUNTERS] == [before[k] for k in SESSION_COUNTERS]


# -- streamable HTTP -----------------------------------------------------------------------

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("hostile-http")
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, server_config(), transport="streamable-http")) as s,
    ):
        yield s


def init_body(request_id: int = 1) -> dict[str, Any]:
    params = {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "hostile", "version": "0"},
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": params}


#: The SDK's HTTP transport answers a body that is JSON but not JSON-RPC with INVALID_PARAMS.
BAD_POSTS = [
    pytest.param(b"{not json", HEADERS, 400, PARSE_ERROR, id="invalid-json"),
    pytest.param(b'{"hello": "world"}', HEADERS, 400, INVALID_PARAMS, id="json-not-jsonrpc"),
    pytest.param(b"42", HEADERS, 400, INVALID_PARAMS, id="a-number"),
    pytest.param(
        json.dumps(init_body()).encode(), {**HEADERS, "Content-Type": "text/plain"}, 400, None, id="wrong-type"
    ),
    pytest.param(json.dumps(init_body()).encode(), {**HEADERS, "Accept": "text/html"}, 406, None, id="wrong-accept"),
    pytest.param(b"x" * (5 * 1024 * 1024), HEADERS, 413, None, id="5MB-body"),
    pytest.param(
        json.dumps({**init_body(), "pad": "x" * (5 * 1024 * 1024)}).encode(), HEADERS, 413, None, id="5MB-json"
    ),
]


@pytest.mark.parametrize(("body", "headers", "status", "code"), BAD_POSTS)
async def test_a_malformed_http_request_gets_a_4xx_and_the_server_stays_up(
    http_server: ServerProcess, body: bytes, headers: dict[str, str], status: int, code: int | None
) -> None:
    url = http_server.url or ""
    async with http_server.client() as client:
        before = await metrics(client)
        with anyio.fail_after(30):
            async with httpx2.AsyncClient() as http:
                response = await http.post(url, content=body, headers=headers)
        assert response.status_code == status, (response.status_code, response.text[:300])
        if code is not None:
            assert response.json()["error"]["code"] == code, response.text
        assert text_of(await client.call_tool("echo", {"text": "still up"})) == "still up"
        after = await metrics(client)
    assert after["total_sessions_created"] - before["total_sessions_created"] == 1  # the echo


async def test_an_unknown_method_over_http_gets_method_not_found(http_server: ServerProcess) -> None:
    url = http_server.url or ""
    with anyio.fail_after(30):
        async with httpx2.AsyncClient() as http:
            first = await http.post(url, json=init_body(), headers=HEADERS)
            assert first.status_code == 200, first.text
            session = {
                **HEADERS,
                "mcp-session-id": first.headers["mcp-session-id"],
                "mcp-protocol-version": PROTOCOL_VERSION,
            }
            await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            unknown = await http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "no/such"}, headers=session)
    assert unknown.status_code == 200, unknown.text
    data = next(json.loads(line[5:]) for line in unknown.text.splitlines() if line.startswith("data:"))
    assert data["id"] == 2 and data["error"]["code"] == METHOD_NOT_FOUND, data
