"""What one misbehaving HTTP client can make the standalone server write to its log, as a real
process on loopback: requests whose body never arrives, held through a SIGTERM, are answered at
the exit without an ERROR or a traceback; and a flood of requests uvicorn or the SDK log one line
(or one traceback) each about is rate-limited to a few lines that count the rest.

The connections are raw sockets (`anyio.connect_tcp`): no HTTP client sends a head without its
body, garbage, or an upgrade it cannot take.
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
from anyio.abc import SocketStream

from tests.e2e.conftest import START_SECONDS, ServerProcess, server_config, start_server
from tests.e2e.test_http import error_lines, url_of

#: Bound on reading one connection to its end.
READ_SECONDS = 10.0
MCP_HEADERS = b"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"


def address_of(server: ServerProcess) -> tuple[str, int]:
    host, _, port = url_of(server).removeprefix("http://").removesuffix("/mcp").rpartition(":")
    return host, int(port)


def head(server: ServerProcess, extra: bytes = b"", length: int = 100) -> bytes:
    """The head of a POST /mcp announcing a `length`-byte body, with the headers the SDK asks for."""
    host, port = address_of(server)
    return b"POST /mcp HTTP/1.1\r\nHost: %s:%d\r\n%sContent-Length: %d\r\n%s\r\n" % (
        host.encode(),
        port,
        MCP_HEADERS,
        length,
        extra,
    )


async def connect(server: ServerProcess) -> SocketStream:
    return await anyio.connect_tcp(*address_of(server))


async def read_until(stream: SocketStream, marker: bytes) -> bytes:
    """What the server sends on `stream` up to and including `marker` (bounded)."""
    data = b""
    with anyio.fail_after(READ_SECONDS):
        while marker not in data:
            data += await stream.receive()
    return data


async def read_to_end(stream: SocketStream) -> bytes:
    """What the server sends on `stream` until it closes the connection (bounded)."""
    data = b""
    with anyio.fail_after(READ_SECONDS):
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    await stream.aclose()
    return data


async def test_sigterm_with_post_bodies_held_answers_them_503_and_logs_no_error(tmp_path: Path) -> None:
    # Each client sends a POST's head and never its body: the app waits for the body until the
    # exit. Left to uvicorn, each was cancelled at its graceful-shutdown timeout with an ERROR and a
    # traceback, and the client's connection cut. `Expect: 100-continue` makes uvicorn say when the
    # app has started reading the body, so the test knows every request is in the app before SIGTERM.
    held = 20
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        streams = [await connect(server) for _ in range(held)]
        for stream in streams:
            await stream.send(head(server, b"Expect: 100-continue\r\n"))
        for stream in streams:
            assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue\r\n")
        # And one whose body is partly there: 10 of its 100 bytes.
        partial = await connect(server)
        await partial.send(head(server) + b'{"jsonrpc"')
        streams.append(partial)
        server.send_signal(signal.SIGTERM)
        answers = [await read_to_end(stream) for stream in streams]
        assert await server.wait_exit(within=START_SECONDS) == 0

    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"\r\nconnection: close\r\n" in answer.lower(), answer
        assert answer.endswith(b"\r\n\r\nThe server is shutting down; the request's body had not arrived.\n"), answer
    assert error_lines(server) == [], server.stderr
    assert f"answered {held + 1} HTTP request(s) whose body had not arrived" in server.stderr, server.stderr
