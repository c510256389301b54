"""What one misbehaving HTTP client can make the standalone server write to its log, as a real
process on loopback: requests whose body never arrives, held through a SIGTERM, are answered at
the exit without an ERROR or a traceback; and a flood of requests uvicorn or the SDK log one line
(or one traceback) each about is rate-limited to a few lines that count the rest. Also the stdio
server's Prometheus exporter under connections that send nothing: it holds a few at a time, and
the process keeps its descriptors.

The connections are raw sockets (`anyio.connect_tcp`): no HTTP client sends a head without its
body, garbage, or an upgrade it cannot take.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import anyio
import httpx2
from anyio.abc import SocketStream

from server.prometheus import EXPORTER_MAX_CONNECTIONS
from tests.e2e.conftest import (
    READ_SECONDS,
    START_SECONDS,
    ServerProcess,
    connect,
    free_port,
    read_to_end,
    server_config,
    start_server,
)
from tests.e2e.test_http import error_lines, url_of

#: The count a rate-limited line carries of the records like it that were not written.
MORE = re.compile(r"\[and ([0-9,]+) more (?:like this|from this logger) in the last ")
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


async def read_until(stream: SocketStream, marker: bytes) -> bytes:
    """What the server sends on `stream` up to and including `marker` (bounded)."""
    data = b""
    with anyio.fail_after(READ_SECONDS):
        while marker not in data:
            data += await stream.receive()
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


async def test_post_heads_sent_while_the_server_stops_are_answered_503_and_log_no_error(tmp_path: Path) -> None:
    # A client keeps sending POST heads without their bodies from SIGTERM on, until the listener
    # closes: those that came after `HttpShutdown.close` had answered the requests in flight were
    # left to uvicorn, which cancelled each at its graceful-shutdown timeout with an ERROR.
    streams: list[SocketStream] = []
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        server.send_signal(signal.SIGTERM)
        with anyio.fail_after(START_SECONDS):
            try:
                while True:
                    stream = await connect(server)
                    streams.append(stream)
                    await stream.send(head(server))
            except OSError:
                pass  # the listener has closed: connection refused
            answers = [await read_to_end(stream) for stream in streams]
        assert await server.wait_exit(within=START_SECONDS) == 0

    served = [answer for answer in answers if answer]  # the rest were never accepted
    assert served and all(answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") for answer in served), {
        answer[:40] for answer in served
    }
    assert error_lines(server) == [], server.stderr[-3000:]
    # Each counted in the line for those in flight when the listener's wait ended, or in the one
    # for those that came after.
    said = re.finditer(r"nswered (\d+) HTTP request\(s\) (whose body had not|that came in as)", server.stderr)
    assert sum(int(match[1]) for match in said) == len(served), server.stderr[-3000:]


#: The start of a TLS ClientHello: what a client that speaks HTTPS to the HTTP port sends first.
CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + bytes(32)


def counted(server: ServerProcess, text: str) -> tuple[int, int]:
    """(how many stderr lines hold `text`, how many records they stand for): each line is one
    record, plus the `[and N more like this ...]` it carries."""
    lines = [line for line in server.stderr_lines if text in line]
    more = sum(int(m.group(1).replace(",", "")) for line in lines if (m := MORE.search(line)))
    return len(lines), len(lines) + more


async def test_floods_of_records_from_uvicorn_and_the_sdk_are_rate_limited_and_counted(tmp_path: Path) -> None:
    # One client makes uvicorn or the SDK log a line (or a traceback) per request or connection;
    # at a client's rate that was thousands of lines a second. Each (logger, message) now writes
    # its first record per 10 s; the rest are counted, and the count written with the next one
    # after the period, or at the exit. Our own lines are not limited (the shutdown's, below).
    times = 200
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        host, port = address_of(server)
        with anyio.fail_after(START_SECONDS * 2):
            for _ in range(times):  # garbage, a new connection each time
                stream = await connect(server)
                await stream.send(CLIENT_HELLO)
                assert (await read_to_end(stream)).startswith(b"HTTP/1.1 400 "), "uvicorn answers it 400"
            # Upgrade requests uvicorn cannot take, pipelined on one connection.
            health = b"GET /healthz HTTP/1.1\r\nHost: %s:%d\r\n" % (host.encode(), port)
            stream = await connect(server)
            await stream.send((health + b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n") * times)
            await stream.send(health + b"Connection: close\r\n\r\n")
            assert (await read_to_end(stream)).count(b"HTTP/1.1 200 OK\r\n") == times + 1
            for index in range(times):  # a Host the server does not serve, a new one each time
                stream = await connect(server)
                evil = b"evil%d.example" % index
                await stream.send(b"GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % evil)
                assert (await read_to_end(stream)).startswith(b"HTTP/1.1 421 ")
            for _ in range(times):  # a POST's head, one byte of its body, then gone
                stream = await connect(server)
                await stream.send(head(server) + b"{")
                await stream.aclose()
            server.send_signal(signal.SIGTERM)
            assert await server.wait_exit(within=START_SECONDS) == 0

    floods = {
        "uvicorn.error: Invalid HTTP request received.": times,
        "uvicorn.error: Unsupported upgrade request.": times,
        "uvicorn.error: No supported WebSocket library detected.": times,
        # The SDK writes the Host into its message (an f-string): told apart from the rest anyway.
        "Invalid Host header: evil": times,
    }
    for text, records in floods.items():
        lines, total = counted(server, text)
        assert lines <= 3 and total == records, (text, lines, total, server.stderr[-3000:])
    # The SDK's ERROR and traceback for a POST whose client went away mid-body is a DEBUG line
    # (`server.http_connections`): the client's doing, not the server's.
    assert counted(server, "Error handling POST request") == (0, 0), server.stderr[-3000:]
    assert server.stderr.count("Traceback") <= 3, server.stderr[-3000:]
    assert len(server.stderr_lines) < 40, server.stderr[-3000:]
    assert "Graceful shutdown: received SIGTERM" in server.stderr


async def test_silent_connections_to_the_stdio_servers_exporter_cannot_use_up_its_descriptors(tmp_path: Path) -> None:
    # Under an open-files limit of 256, 300 connections that send nothing used to hold a thread
    # and a descriptor each, for ever: the process ran out of descriptors. The exporter now holds
    # a few at a time (each until its timeout) and closes the rest at once.
    port, held = free_port(), 300
    config = {**server_config(), "metrics": {"prometheus_port": port}}
    async with start_server(tmp_path, config, files_limit=(256, 256)) as server:
        await server.wait_stderr(f"Serving Prometheus metrics at http://127.0.0.1:{port}/metrics")
        await server.initialize()  # serving stdio: its threads are running
        threads_before = threads_of(server)
        with anyio.fail_after(START_SECONDS):
            streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(held)]
        closed = 0
        all_but_the_cap = anyio.Event()
        threads_held: list[int] = []

        async def until_closed(stream: SocketStream) -> None:
            nonlocal closed
            assert await read_to_end(stream) == b""
            closed += 1
            if closed == held - EXPORTER_MAX_CONNECTIONS:
                threads_held.append(threads_of(server))
                all_but_the_cap.set()

        async with anyio.create_task_group() as tg:
            for stream in streams:
                tg.start_soon(until_closed, stream)
        async with httpx2.AsyncClient(timeout=READ_SECONDS) as http:
            scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
        echoed = await server.call("echo", {"text": "still here"})

    assert all_but_the_cap.is_set() and threads_held[0] <= threads_before + EXPORTER_MAX_CONNECTIONS
    assert scraped.status_code == 200 and "mcp_sessions_created_total" in scraped.text
    assert not echoed.is_error
    assert "Too many open files" not in server.stderr and "Traceback" not in server.stderr, server.stderr[-3000:]
    refusals = [line for line in server.stderr_lines if "Prometheus exporter" in line]
    assert 1 <= len(refusals) <= 2, server.stderr[-3000:]


def threads_of(server: ServerProcess) -> int:
    """How many threads the server process runs now (Linux)."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])
