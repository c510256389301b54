"""The standalone server's bounds on HTTP connections, as a real process on loopback: a connection
past `server.http_max_connections` is answered 503 (unless it asks for `/healthz`, `/readyz` or
`/metrics`), one whose client owes a request (its headers, or its body) for
`server.http_request_timeout_seconds` is answered 408 and closed while a long call or an event
stream is not, and connections held past the process's open-files limit are refused without the
accept loop failing (EMFILE) or flooding the log.

The connections are raw sockets (`anyio.connect_tcp`): a client that opens a connection and sends
nothing, or headers without their body, is what the bounds are for, and no HTTP client does that.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client

from tests.e2e.conftest import (
    READ_SECONDS,
    START_SECONDS,
    ServerProcess,
    connect,
    read_to_end,
    server_config,
    start_server,
)
from tests.e2e.test_http import error_lines, url_of
from tests.helpers import text_of


def http_config(**server: Any) -> dict[str, Any]:
    config = server_config()
    config["server"] = {**config["server"], **server}
    return config


def base_of(server: ServerProcess) -> str:
    return url_of(server).removesuffix("/mcp")


async def scrape(server: ServerProcess) -> dict[str, float]:
    """`/metrics` as {sample name: value}, and `/healthz` must answer 200 (a new connection)."""
    async with httpx2.AsyncClient(timeout=READ_SECONDS) as http:
        assert (await http.get(f"{base_of(server)}/healthz")).status_code == 200
        text = (await http.get(f"{base_of(server)}/metrics")).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def host_of(server: ServerProcess) -> bytes:
    return base_of(server).removeprefix("http://").encode()


def post_head(server: ServerProcess, length: int) -> bytes:
    """The head of a `POST /mcp` whose body is `length` bytes."""
    return (
        b"POST /mcp HTTP/1.1\r\nHost: " + host_of(server) + b"\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n" % length
    )


async def test_past_the_connection_cap_a_request_gets_503_a_probe_200_and_a_silent_one_408(
    tmp_path: Path,
) -> None:
    config = http_config(http_max_connections=2, http_request_timeout_seconds=1.0)
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        with anyio.fail_after(START_SECONDS):
            silent = [await connect(server) for _ in range(2)]  # open, and never send a byte
            refused = await connect(server)  # past the cap: its headers are read, then refused
            await refused.send(post_head(server, 2) + b"{}")
            refused_answer = await read_to_end(refused)
            probe = await connect(server)  # past the cap too, but a liveness probe: served, once
            healthz = b"GET /healthz HTTP/1.1\r\nHost: " + host_of(server) + b"\r\n\r\n"
            await probe.send(healthz + post_head(server, 2) + b"{}")  # a second request rides on it
            probe_answer = await read_to_end(probe)
            timed_out = [await read_to_end(stream) for stream in silent]
            samples = await scrape(server)  # there is room again
            # At the exit, connections past the cap still being read are closed with the rest.
            held = [await connect(server) for _ in range(4)]
            lane = [await connect(server) for _ in range(3)]
            for stream in lane:
                await stream.send(b"GET /heal")
            server.process.send_signal(signal.SIGTERM)
            assert await server.wait_exit(within=START_SECONDS) == 0
            for stream in [*held, *lane]:
                await stream.aclose()
    assert refused_answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused_answer
    assert refused_answer.endswith(b"\r\n\r\nThe server has too many connections open; retry later.\n"), refused_answer
    assert probe_answer.startswith(b"HTTP/1.1 200 OK\r\n") and probe_answer.count(b"HTTP/1.1 ") == 1, probe_answer
    assert samples["mcp_sessions_http_connections"] == 1  # the scrape's own: no count left behind
    assert all(data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for data in timed_out), timed_out
    assert samples["mcp_sessions_http_max_connections"] == 2
    assert samples["mcp_sessions_http_connections_refused_total"] == 1
    assert samples["mcp_sessions_http_request_timeouts_total"] == 2
    assert "Refusing new HTTP connections (503): 2 are open" in server.stderr
    assert "did not send its request in time (server.http_request_timeout_seconds = 1;" in server.stderr
    # The second timeout came within the report period: counted in the line written at the exit.
    assert "Closed 1 more HTTP connection(s) whose request did not come in time since the last report" in (
        server.stderr
    )
    assert error_lines(server) == [], server.stderr


async def test_a_request_whose_body_never_comes_is_cut_off_and_one_that_comes_is_served(tmp_path: Path) -> None:
    # Headers in time are not enough: a client that sends them and then nothing (or a request
    # whole, then the next one's headers only) would hold its connection for ever.
    config = http_config(http_request_timeout_seconds=1.0)
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        with anyio.fail_after(START_SECONDS):
            no_body = await connect(server)
            await no_body.send(post_head(server, 100))
            pipelined = await connect(server)  # a whole request, then the next one's headers only
            whole = b"GET /healthz HTTP/1.1\r\nHost: " + host_of(server) + b"\r\n\r\n"
            await pipelined.send(whole + post_head(server, 100))
            in_pieces = await connect(server)  # headers and body in pieces: served
            await in_pieces.send(b"GET /healthz HTTP/1.1\r\nHost: " + host_of(server) + b"\r\n")
            await in_pieces.send(b"Connection: close\r\n\r\n")
            answers = [await read_to_end(stream) for stream in (no_body, pipelined, in_pieces)]
            samples = await scrape(server)
    assert answers[0].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200 OK\r\n") and answers[1].endswith(b"\r\n\r\n"), answers[1]
    assert answers[1].count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 Request Timeout\r\n" in answers[1], answers[1]
    assert answers[2].startswith(b"HTTP/1.1 200 OK\r\n"), answers[2]
    assert samples["mcp_sessions_http_request_timeouts_total"] == 2
    assert error_lines(server) == [], server.stderr


async def test_silent_connections_past_the_cap_cannot_keep_a_probe_out(tmp_path: Path) -> None:
    # The cap held, and the 8 places read past it taken by connections that send nothing: a
    # probe takes the oldest one's place (answered 503), and is served.
    config = http_config(http_max_connections=1, http_request_timeout_seconds=30.0)
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        with anyio.fail_after(START_SECONDS):
            holder = await connect(server)
            await holder.send(b"GET /heal")  # counted, and owes the rest for 30 s
            silent = [await connect(server) for _ in range(8)]
            probe = await connect(server)
            await probe.send(b"GET /healthz HTTP/1.1\r\nHost: " + host_of(server) + b"\r\n\r\n")
            probe_answer = await read_to_end(probe)
            evicted = await read_to_end(silent[0])
            for stream in [holder, *silent[1:]]:
                await stream.aclose()
    assert probe_answer.startswith(b"HTTP/1.1 200 OK\r\n"), probe_answer
    assert evicted.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), evicted
    assert error_lines(server) == [], server.stderr


async def test_a_request_answered_before_its_body_was_read_is_not_timed_out_later(tmp_path: Path) -> None:
    # Starlette answers POST /healthz 405 without reading the body; the body comes after the
    # answer. That is no request owed, but an idle connection (uvicorn forgets its own idle
    # timeout here): closed at the timeout without a 408, and not counted as a timeout.
    config = http_config(http_request_timeout_seconds=1.0)
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        with anyio.fail_after(START_SECONDS):
            stream = await connect(server)
            head = b"POST /healthz HTTP/1.1\r\nHost: " + host_of(server) + b"\r\nContent-Length: 10\r\n\r\n"
            await stream.send(head)
            answered = b""
            while not answered.endswith(b"Method Not Allowed"):  # the whole answer (it may come in pieces)
                answered += await stream.receive()
            await stream.send(b"0123456789")  # the body, after its answer
            rest = await read_to_end(stream)  # the guard ends it, silently
            samples = await scrape(server)
    assert answered.startswith(b"HTTP/1.1 405 "), answered
    assert rest == b"", rest
    assert samples["mcp_sessions_http_request_timeouts_total"] == 0
    assert error_lines(server) == [], server.stderr


async def test_a_call_and_an_event_stream_that_outlast_the_request_timeout_are_not_cut(tmp_path: Path) -> None:
    # The clock runs while the client owes a request, not while the server answers one: a tool
    # call longer than the timeout, and a handshake-era client's GET event stream, both stay.
    config = http_config(http_request_timeout_seconds=1.0)
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        async with Client(url_of(server), mode="legacy", read_timeout_seconds=READ_SECONDS) as client:
            with anyio.fail_after(START_SECONDS):
                slow = await client.call_tool("sleep_async", {"seconds": 2.5})
                after = await client.call_tool("echo", {"text": "still connected"})
        samples = await scrape(server)
    assert not slow.is_error and text_of(after) == "still connected"
    assert samples["mcp_sessions_http_request_timeouts_total"] == 0
    assert error_lines(server) == [], server.stderr


async def test_connections_held_past_the_open_files_limit_are_refused_without_accept_errors(tmp_path: Path) -> None:
    # Under an open-files limit of 256, the cap is what the limit leaves room for (192), and 8
    # more are read for a probe's headers. Holding 600 connections used to use up the
    # descriptors: every accept failed with EMFILE (nobody served, /healthz included) and asyncio
    # logged an error for each, megabytes a second.
    held = 600
    config = http_config(http_request_timeout_seconds=3.0)
    async with start_server(tmp_path, config, transport="streamable-http", files_limit=(256, 256)) as server:
        with anyio.fail_after(START_SECONDS):
            streams = [await connect(server) for _ in range(held)]
            answers = [await read_to_end(stream) for stream in streams]
            samples = await scrape(server)
    refused = sum(answer.startswith(b"HTTP/1.1 503 ") for answer in answers)
    timed_out = sum(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert samples["mcp_sessions_http_max_connections"] == 192
    assert samples["mcp_sessions_http_connections"] == 1  # the scrape's own: no count left behind
    assert (refused, timed_out) == (held - 192 - 8, 192 + 8)
    assert samples["mcp_sessions_http_connections_refused_total"] == held - 192 - 8
    assert "Too many open files" not in server.stderr
    assert error_lines(server) == [], server.stderr[:2000]
    # The refusals are reported once, then as a count: not a line per connection.
    assert len(server.stderr_lines) < 20, server.stderr[:2000]


async def test_the_open_files_limit_is_raised_to_the_hard_limit_and_a_cap_past_it_is_warned_about(
    tmp_path: Path,
) -> None:
    async with start_server(tmp_path, http_config(), transport="streamable-http", files_limit=(200, 400)) as server:
        samples = await scrape(server)
    assert samples["mcp_sessions_http_max_connections"] == 400 - 64  # the reserve: 64 at least
    assert "leaves too little room" not in server.stderr

    config = http_config(http_max_connections=1000)
    async with start_server(tmp_path, config, transport="streamable-http", files_limit=(400, 400)) as server:
        samples = await scrape(server)
    assert samples["mcp_sessions_http_max_connections"] == 1000  # as asked, but warned about
    assert (
        "server.http_max_connections = 1000 leaves too little room under this process's open-files "
        "limit (400)" in server.stderr
    )
    assert "lower the key to at most 336" in server.stderr

    async with start_server(tmp_path, http_config(), transport="streamable-http", files_limit=(100, 100)) as server:
        samples = await scrape(server)
    assert samples["mcp_sessions_http_max_connections"] == 36
    assert (
        "this process's open-files limit (100, the hard limit too) leaves room for 36 HTTP connection(s) at once:"
        " raise it to at least 256" in server.stderr
    )
