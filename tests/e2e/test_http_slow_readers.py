"""Answers still being written to slow clients when the standalone HTTP server stops, through a
real process on loopback: a call that completes early in the drain, with an answer larger than
the sockets' buffers, reaches whole a client that reads it slowly after a pause (in both eras:
a JSON answer in protocol 2026-07-28, an event stream in the handshake era), and one whose
client never reads is cut after the bound the README gives, with one plain log line.

The clients are raw sockets with a small receive buffer, so that what the client has not read
stays in the server's own buffers (a kernel's socket buffers are delivered after the exit).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import h11
import httpx2
import pytest

from tests.e2e.conftest import (
    CALL_SECONDS,
    HOST,
    PROTOCOL_VERSION,
    ServerProcess,
    metrics_until,
    server_config,
    start_server,
)
from tests.e2e.test_http import error_lines, url_of

#: The answer's length (twice that in its JSON: the text, and the structured result): several
#: times what loopback's socket buffers hold (about 4 MB sent, 32 KB read).
CHARS = 10_000_000
#: The slow client's receive buffer.
RCVBUF = 16_384
#: After SIGTERM the client reads nothing for this long (its loop is busy)...
PAUSE_SECONDS = 1.2
#: ... then reads this much at a time, this often (about 3 MB/s: less than half its 20 MB by then)...
READ_BYTES = 65_536
READ_INTERVAL = 0.02
#: ... until this long after SIGTERM, past the 2 s after the drain that the server used to give (and
#: uvicorn's 1 s); then the rest at full speed, well within the 5 s it gives. Paced by the clock, as
#: the server's bound is: a busy machine that slows the test process leaves it the same margin.
SLOW_SECONDS = 3.2
#: An answer still being written 5 s after the drain is cut; then a loaded machine's margin.
CUT_EXIT_SECONDS = 5.0 + 3.0
STATELESS = "2026-07-28"
REQUEST_ID = 7


def _meta() -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientInfo": {"name": "e2e", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }


async def _handshake(server: ServerProcess) -> dict[str, str]:
    """A handshake-era MCP session (`initialize`, `notifications/initialized`): its headers."""
    url = url_of(server)
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "e2e", "version": "0"}}
    async with httpx2.AsyncClient(timeout=CALL_SECONDS) as http:
        first = await http.post(
            url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
        )
        assert first.status_code == 200, first.text
        session = {"Mcp-Session-Id": first.headers["mcp-session-id"], "MCP-Protocol-Version": PROTOCOL_VERSION}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(url, headers={**headers, **session}, json=initialized)).status_code == 202
    return session


async def call_large_in_shutdown(server: ServerProcess, era: str) -> socket.socket:
    """A connection with a small receive buffer that has sent `tools/call large_in_shutdown`: a
    plain socket, read only when the test says (an event loop's stream would read it eagerly)."""
    params: dict[str, Any] = {"name": "large_in_shutdown", "arguments": {"chars": CHARS}}
    if era == STATELESS:
        headers = {"MCP-Protocol-Version": STATELESS, "Mcp-Method": "tools/call", "Mcp-Name": "large_in_shutdown"}
        params["_meta"] = _meta()
    else:
        headers = await _handshake(server)
    body = json.dumps({"jsonrpc": "2.0", "id": REQUEST_ID, "method": "tools/call", "params": params}).encode()
    port = int(url_of(server).removesuffix("/mcp").rpartition(":")[2])
    head = {
        "Host": f"{HOST}:{port}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Content-Length": str(len(body)),
        **headers,
    }
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connecting: it sets the window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (HOST, port))
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    await loop.sock_sendall(sock, f"POST /mcp HTTP/1.1\r\n{lines}\r\n".encode() + body)
    return sock


async def read_slowly(sock: socket.socket, within: float, fast_from: float) -> tuple[bytes, int]:
    """Until `fast_from` (on anyio's clock), read nothing for `PAUSE_SECONDS`, then slowly; then
    read the rest at full speed until the server closes the connection; then close it. What was
    read, and how much of it by `fast_from`."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    slowly: int | None = None
    with sock, anyio.fail_after(within):
        try:
            with anyio.CancelScope(deadline=fast_from):
                await anyio.sleep(PAUSE_SECONDS)  # the client is busy
                while True:
                    burst = len(data) + READ_BYTES
                    while len(data) < burst:
                        chunk = await loop.sock_recv(sock, READ_BYTES)
                        if not chunk:
                            return bytes(data), len(data)
                        data += chunk
                    await anyio.sleep(READ_INTERVAL)  # a slow client
            slowly = len(data)
            while chunk := await loop.sock_recv(sock, READ_BYTES):
                data += chunk
        except ConnectionResetError:
            pass
    return bytes(data), len(data) if slowly is None else slowly


def parse_response(raw: bytes) -> tuple[h11.Response, bytes, bool]:
    """One HTTP response read off the wire: its head, its body (de-chunked), whether it ended."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/mcp", headers=[("Host", HOST)]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(raw)
    connection.receive_data(b"")  # the connection has closed
    response: h11.Response | None = None
    body = bytearray()
    ended = False
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            break  # cut before the body's end
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            ended = True
            break
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
    assert response is not None, raw[:200]
    return response, bytes(body), ended


def answers_in(response: h11.Response, body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages a response carries: its JSON body, or its event stream's messages."""
    content_type = dict(response.headers).get(b"content-type", b"")
    if not content_type.startswith(b"text/event-stream"):
        return [json.loads(body)]
    return [json.loads(line[5:]) for line in body.splitlines() if line.startswith(b"data:") and line[5:].strip()]


@pytest.mark.parametrize("era", [STATELESS, "handshake"])
async def test_an_answer_completed_in_the_drain_reaches_whole_a_client_slow_to_read_it(
    tmp_path: Path, era: str
) -> None:
    # The call completes early in the drain; its answer (20 MB) is far more than the sockets'
    # buffers hold, and the client is busy for a moment before it reads, then reads slowly. The
    # server must not exit (nor end the request's event stream with another answer) while the
    # answer is still being written to a client that reads it.
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        sock = await call_large_in_shutdown(server, era)
        async with server.client() as observer:
            await metrics_until(observer, lambda m: m["active_sessions"] == 1)
        signalled = anyio.current_time()
        server.send_signal(signal.SIGTERM)
        raw, slowly = await read_slowly(sock, within=CALL_SECONDS, fast_from=signalled + SLOW_SECONDS)
        assert await server.wait_exit(within=CALL_SECONDS) == 0

    response, body, ended = parse_response(raw)
    assert response.status_code == 200 and ended, (len(raw), slowly, server.stderr)
    # Most of it was still the server's to write past the old bounds (loopback's buffers hold about 4 MB).
    assert slowly < CHARS, (slowly, len(raw))
    answers = answers_in(response, body)
    assert [answer["id"] for answer in answers] == [REQUEST_ID], [str(answer)[:300] for answer in answers]
    [answer] = answers
    assert answer["id"] == REQUEST_ID and not answer["result"].get("isError"), str(answer)[:300]
    assert answer["result"]["content"][0]["text"] == "x" * CHARS
    assert "1 of 1 session(s) finished" in server.stderr
    assert "answered shutting_down" not in server.stderr and "were cut" not in server.stderr, server.stderr
    assert error_lines(server) == [], server.stderr


@pytest.mark.parametrize("era", [STATELESS, "handshake"])
async def test_an_answer_its_client_never_reads_is_cut_on_time_with_one_plain_line(tmp_path: Path, era: str) -> None:
    # A client that never reads cannot hold the exit: its answer is cut 5 s after the drain, with
    # one line that says so, and no error nor traceback (the call completed).
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        sock = await call_large_in_shutdown(server, era)
        async with server.client() as observer:
            await metrics_until(observer, lambda m: m["active_sessions"] == 1)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=CUT_EXIT_SECONDS) == 0
        exit_seconds = time.monotonic() - signalled
        raw, _ = await read_slowly(sock, within=CALL_SECONDS, fast_from=anyio.current_time())  # what the kernel held

    response, body, ended = parse_response(raw)
    assert response.status_code == 200 and not ended and len(body) < CHARS, (exit_seconds, server.stderr)
    cut = [line for line in server.stderr_lines if "still being written to slow clients were cut" in line]
    assert len(cut) == 1 and " WARNING " in cut[0] and "1 HTTP response(s)" in cut[0], server.stderr
    assert "answered shutting_down" not in server.stderr, server.stderr
    assert error_lines(server) == [], server.stderr
