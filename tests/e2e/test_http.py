"""The standalone server as a real process over streamable HTTP on loopback: the URL on stderr,
tools and deadlines through the SDK's `Client(url)`, `server_shutdown` guarded by the admin
token, SIGTERM (also with a handshake-era client's GET event stream, or a `subscriptions/listen`
stream, open), and a port already in use.

The tests that leave the server running share one process (`shared_http_server`, each with
its own MCP session, asserting on metric deltas); the ones that stop it start their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import SERVER_INFO_META_KEY, CallToolResult

from server.app import package_version
from tests.e2e.conftest import (
    CALL_SECONDS,
    HELD_EXIT_MARGIN,
    HELD_SECONDS,
    HOST,
    PROTOCOL_VERSION,
    START_SECONDS,
    ServerProcess,
    assert_held_call_answered,
    listen_through_sigterm,
    metrics,
    metrics_until,
    server_config,
    start_server,
)
from tests.fixtures.e2e_tools import IN_SHUTDOWN
from tests.helpers import ON_TIME_MARGIN, code_of, error_of, text_of

EXIT_MARGIN = 8.0
TOKEN_ENV = "E2E_SESSIONS_ADMIN_TOKEN"
TOKEN = "correct horse battery staple"


def url_of(server: ServerProcess) -> str:
    assert server.url is not None, "not an HTTP server"
    return server.url


def error_lines(server: ServerProcess) -> list[str]:
    """The stderr lines logged at ERROR or above, and any traceback."""
    return [
        line
        for line in server.stderr_lines
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
    ]


async def test_the_server_prints_its_url_on_stderr_and_serves_tools(shared_http_server: ServerProcess) -> None:
    url = url_of(shared_http_server)
    assert url.startswith(f"http://{HOST}:") and url.endswith("/mcp")
    assert any(url in line for line in shared_http_server.stderr_lines)

    async with shared_http_server.client() as client:
        before = await metrics(client)
        assert text_of(await client.call_tool("echo", {"text": "over http"})) == "over http"
        created = await client.call_tool("session_create", {"provider": "acme", "timeout_seconds": 30})
        session = created.structured_content or {}
        assert session["state"] == "active" and session["timeout_seconds"] == 30.0
        released = await client.call_tool("session_release", {"session_id": session["session_id"]})
        assert (released.structured_content or {})["state"] == "completed"
        again = await client.call_tool("session_release", {"session_id": session["session_id"]})
        assert code_of(again) == "already_released"
        after = await metrics(client)
    assert after["total_sessions_created"] - before["total_sessions_created"] == 2
    assert after["total_sessions_completed"] - before["total_sessions_completed"] == 2
    assert after["tools"]["echo"]["completed"] >= 1
    assert after["limits"]["max_concurrent_sessions"] == 3


@pytest.mark.parametrize(("level", "fmt"), [("warning", "text"), ("error", "json")])
async def test_the_url_is_printed_at_every_logging_level(tmp_path: Path, level: str, fmt: str) -> None:
    # DESIGN: on streamable HTTP the server prints the URL it serves on stderr. A deployment
    # that logs only warnings must still be told where to connect; nothing else below its
    # level is shown. `start_server` waits (bounded) for the URL on stderr before the body runs.
    config = {**server_config(), "logging": {"level": level, "format": fmt}}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        async with server.client() as client:
            assert text_of(await client.call_tool("echo", {"text": "here"})) == "here"
    url_lines = [line for line in server.stderr_lines if url_of(server) in line]
    assert len(url_lines) == 1, server.stderr
    if fmt == "json":
        assert json.loads(url_lines[0])["message"].endswith(url_of(server))
    # The records below the level stay hidden: the session end of the echo call is INFO.
    assert not any("echo" in line for line in server.stderr_lines), server.stderr


async def test_a_refused_host_header_is_logged_cut_not_whole(shared_http_server: ServerProcess) -> None:
    # The SDK logs the Host header it refuses, whole: 60 KB of it fits one request, which would
    # then add 60 KB to the log each time.
    host = "h" * 60_000
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Host": host, "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with anyio.fail_after(CALL_SECONDS):
        async with httpx2.AsyncClient(timeout=CALL_SECONDS) as http:
            answer = await http.post(url_of(shared_http_server), headers=headers, json=body)
        line = await shared_http_server.wait_stderr("Invalid Host header")
    assert answer.status_code == 421
    assert len(line) < 8_500 and line.rstrip().endswith(" more characters]"), line[-200:]


async def test_hanging_tools_time_out_on_time_over_http(shared_http_server: ServerProcess) -> None:
    async with shared_http_server.client() as client:
        before = await metrics(client)
        for tool in ("hang_async", "hang_sync"):
            started = time.monotonic()
            with anyio.fail_after(5):
                result = await client.call_tool(tool, {})
            error = error_of(result)
            assert error["code"] == "timeout" and error["tool"] == tool
            elapsed = time.monotonic() - started
            assert 0.5 <= elapsed < 0.5 + ON_TIME_MARGIN, elapsed
        after = await metrics(client)
    assert after["total_sessions_timeout"] - before["total_sessions_timeout"] == 2
    assert after["total_sessions_error"] == before["total_sessions_error"]
    assert after["abandoned_threads"] - before["abandoned_threads"] == 1


async def test_a_signal_in_the_last_moments_of_the_exit_over_http_joins_it(tmp_path: Path) -> None:
    # uvicorn put back the handler there was before it served: Python's default, so a SIGTERM in
    # the last moments of a finished exit ended the process by the signal, with no word.
    config: dict[str, Any] = {"server": {"tool_modules": ["tests.fixtures.slow_exit_tools"]}}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        server.send_signal(signal.SIGTERM)
        await server.wait_stderr("slow_exit_tools: atexit handler flushing")
        server.send_signal(signal.SIGINT)
        assert await server.wait_exit(within=EXIT_MARGIN) == 1
    assert "SIGINT after SIGTERM: forcing exit; the server had stopped serving" in server.stderr, server.stderr


async def test_server_shutdown_without_a_configured_admin_token_is_refused_and_counted(
    shared_http_server: ServerProcess,
) -> None:
    async with shared_http_server.client() as client:
        before = await metrics(client)
        for arguments in ({}, {"token": "guess"}, {"token": "", "timeout_seconds": 0}):
            refused = await client.call_tool("server_shutdown", arguments)
            assert code_of(refused) == "unauthorized", (arguments, refused)
        after = await metrics(client)
        # Still serving: nothing was shut down.
        assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
    assert after["shutdown_rejected_unauthorized"] - before["shutdown_rejected_unauthorized"] == 3
    assert after["shutdown_requested"] is False
    assert shared_http_server.returncode is None


@pytest.mark.parametrize(("value", "state"), [(None, "is not set"), ("", "is empty")])
async def test_server_shutdown_with_its_token_variable_unset_or_empty_says_to_set_the_variable(
    tmp_path: Path, value: str | None, state: str
) -> None:
    # shutdown.admin_token_env is set: what is missing is the variable's value, in the server's environment.
    variable = "E2E_SESSIONS_TOKEN_NOT_GIVEN"
    assert variable not in os.environ
    config = server_config(shutdown={"admin_token_env": variable})
    env = {} if value is None else {variable: value}
    async with start_server(tmp_path, config, transport="streamable-http", env=env) as server:
        async with server.client() as client:
            refused = await client.call_tool("server_shutdown", {"token": ""})
            assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
    error = error_of(refused)
    assert (error["code"], error["tool"]) == ("unauthorized", "server_shutdown")
    assert error["message"] == (
        f"server_shutdown is disabled over HTTP because the environment variable {variable} "
        f"(named by shutdown.admin_token_env) {state}: the operator must restart the server with "
        f"{variable} set to a non-empty admin token"
    )


async def test_server_shutdown_with_the_admin_token_reports_and_the_process_exits_0(tmp_path: Path) -> None:
    config = server_config(shutdown={"admin_token_env": TOKEN_ENV, "timeout_seconds": 5})
    async with start_server(tmp_path, config, transport="streamable-http", env={TOKEN_ENV: TOKEN}) as server:
        results: dict[str, CallToolResult] = {}
        async with server.client() as client:
            wrong = await client.call_tool("server_shutdown", {"token": TOKEN + "x"})
            missing = await client.call_tool("server_shutdown", {})
            assert code_of(wrong) == "unauthorized" and code_of(missing) == "unauthorized"
            refusals = await metrics(client)

            async def call(key: str, tool: str, arguments: dict[str, Any]) -> None:
                results[key] = await client.call_tool(tool, arguments)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "quick", "finish_in_shutdown", {})
                    await metrics_until(client, lambda m: m["active_sessions"] == 1)
                    await call("shutdown", "server_shutdown", {"token": TOKEN, "timeout_seconds": 5})
        assert await server.wait_exit(within=EXIT_MARGIN) == 0

    assert refusals["shutdown_rejected_unauthorized"] == 2 and refusals["shutdown_requested"] is False
    assert server.stderr.count("Graceful shutdown: requested by a server_shutdown call over HTTP") == 1, server.stderr
    report = results["shutdown"]
    assert not report.is_error, report
    numbers = report.structured_content or {}
    assert numbers["initial_active_sessions"] == 1 and numbers["sessions_completed_during_shutdown"] == 1
    assert numbers["sessions_cancelled_at_deadline"] == 0 and numbers["timeout_reached"] is False
    assert numbers["final_active_sessions"] == 0 and numbers["total_sessions_at_shutdown"] == 1
    assert text_of(results["quick"]) == IN_SHUTDOWN


async def test_sigterm_drains_calls_in_flight_and_exits_0(tmp_path: Path) -> None:
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": shutdown_seconds})
    results: dict[str, CallToolResult] = {}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        async with server.client() as client:

            async def call(key: str, tool: str, arguments: dict[str, Any]) -> None:
                results[key] = await client.call_tool(tool, arguments)

            # A sync tool past its deadline leaves a thread stuck in time.sleep(3600) behind.
            assert code_of(await client.call_tool("hang_sync", {})) == "timeout"
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "quick", "finish_in_shutdown", {})
                    tg.start_soon(call, "stuck", "sleep_async", {"seconds": 3600})
                    await metrics_until(client, lambda m: m["active_sessions"] == 2)
                    server.send_signal(signal.SIGTERM)
            assert await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN) == 0

    assert text_of(results["quick"]) == IN_SHUTDOWN
    assert code_of(results["stuck"]) == "shutting_down"
    assert "received SIGTERM" in server.stderr
    assert "1 of 2 session(s) finished, 1 cancelled" in server.stderr
    assert "Exiting with 1 stuck tool thread(s) abandoned" in server.stderr


async def test_sigterm_ends_an_open_get_event_stream_cleanly_and_logs_no_error(tmp_path: Path) -> None:
    # A handshake-era client (the MCP Inspector's default, the SDK's `streamable_http_client`)
    # keeps GET /mcp open for what the server sends unprompted. Stopping the server must end that
    # response properly (its last chunk sent), not cut it and log an ERROR per open stream.
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        url = url_of(server)
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        init = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "e2e", "version": "0"}}
        received: list[bytes] = []
        with anyio.fail_after(EXIT_MARGIN + 5):
            async with httpx2.AsyncClient(timeout=CALL_SECONDS) as http:
                initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
                first = await http.post(url, headers=headers, json=initialize)
                assert first.status_code == 200, first.text
                session_id = first.headers["mcp-session-id"]
                session = {**headers, "mcp-session-id": session_id, "mcp-protocol-version": PROTOCOL_VERSION}
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                assert (await http.post(url, headers=session, json=initialized)).status_code == 202
                unprompted = {"Accept": "text/event-stream", "mcp-session-id": session_id}
                unprompted["mcp-protocol-version"] = PROTOCOL_VERSION
                async with http.stream("GET", url, headers=unprompted) as stream:
                    # The headers have arrived: the server has started the event stream.
                    assert stream.status_code == 200
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    server.send_signal(signal.SIGTERM)
                    # Ends without httpx2.RemoteProtocolError ("incomplete chunked read").
                    async for chunk in stream.aiter_raw():
                        received.append(chunk)
            assert await server.wait_exit(within=EXIT_MARGIN) == 0

    assert "received SIGTERM" in server.stderr
    assert error_lines(server) == [], server.stderr
    assert all(chunk.startswith(b":") for chunk in received), received  # pings at most, no message


async def test_a_client_session_left_idle_is_closed_and_its_room_given_to_a_new_client(tmp_path: Path) -> None:
    # A handshake-era client that goes away without DELETE (a crash, a lost network) leaves its
    # session open: `server.http_session_idle_timeout_seconds` closes it, and
    # `server.http_max_sessions` bounds how many are open meanwhile (503 past it).
    config = server_config()
    config["server"] = {**config["server"], "http_session_idle_timeout_seconds": 1.0, "http_max_sessions": 1}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "e2e", "version": "0"}}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url = url_of(server)
        with anyio.fail_after(START_SECONDS):
            async with httpx2.AsyncClient(timeout=CALL_SECONDS) as http:
                first = await http.post(url, headers=headers, json=initialize)
                assert first.status_code == 200, first.text
                gone = first.headers["mcp-session-id"]  # this client never comes back, nor sends DELETE
                refused = await http.post(url, headers=headers, json=initialize)
                assert refused.status_code == 503, refused.text  # the one session allowed is taken
                await server.wait_stderr(f"Session {gone} idle timeout", within=START_SECONDS)
                session = {**headers, "mcp-session-id": gone, "mcp-protocol-version": PROTOCOL_VERSION}
                ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
                assert (await http.post(url, headers=session, json=ping)).status_code == 404
                again = await http.post(url, headers=headers, json=initialize)
                assert again.status_code == 200, again.text
    assert error_lines(server) == [], server.stderr


async def test_server_shutdown_from_a_handshake_era_client_is_answered_with_its_event_stream_open(
    tmp_path: Path,
) -> None:
    # The SDK's client in the handshake era opens its GET event stream after `initialize`. The
    # shutdown ends that stream, but not the responses still owed on their POSTs: the call
    # cancelled at the drain deadline, and `server_shutdown`'s own report.
    config = server_config(shutdown={"admin_token_env": TOKEN_ENV})
    results: dict[str, CallToolResult] = {}
    async with start_server(tmp_path, config, transport="streamable-http", env={TOKEN_ENV: TOKEN}) as server:
        async with Client(url_of(server), mode="legacy", read_timeout_seconds=CALL_SECONDS) as client:

            async def call(key: str, tool: str, arguments: dict[str, Any]) -> None:
                results[key] = await client.call_tool(tool, arguments)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "stuck", "sleep_async", {"seconds": 3600})
                    await metrics_until(client, lambda m: m["active_sessions"] == 1)
                    await call("shutdown", "server_shutdown", {"token": TOKEN, "timeout_seconds": 0.5})
            assert await server.wait_exit(within=EXIT_MARGIN) == 0

    report = results["shutdown"]
    assert not report.is_error, report
    numbers = report.structured_content or {}
    assert numbers["initial_active_sessions"] == 1 and numbers["sessions_cancelled_at_deadline"] == 1
    assert code_of(results["stuck"]) == "shutting_down"
    assert error_lines(server) == [], server.stderr


async def test_sigterm_ends_an_open_listen_stream_with_its_result(tmp_path: Path) -> None:
    # Protocol 2026-07-28 (the SDK client's default): a `subscriptions/listen` POST stays open
    # for change events. The shutdown ends it the protocol's way, with its result as the last
    # frame; the SDK's client raises `SubscriptionLost` for a stream that is cut instead.
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        events, status = await listen_through_sigterm(server, within=EXIT_MARGIN)

    assert (events, status) == ([], 0)
    assert "still in flight" not in server.stderr  # nothing held the exit up
    assert error_lines(server) == [], server.stderr


async def test_a_port_in_use_fails_fast_with_exit_status_1_and_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with start_server(
            tmp_path, server_config(), transport="streamable-http", port=port, wait_ready=False
        ) as server:
            assert await server.wait_exit(within=START_SECONDS) == 1
    assert "address already in use" in server.stderr
    assert f"Could not serve MCP over streamable HTTP on {HOST} port {port}" in server.stderr
    assert "Traceback" not in server.stderr and "/mcp" not in server.stderr


async def test_one_http_client_flooding_is_refused_while_another_is_served(tmp_path: Path) -> None:
    config = server_config(limits={"max_concurrent_sessions": 10, "max_sessions_per_client": 2})
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url = url_of(server)
        # Handshake-era clients: each is one MCP session (Mcp-Session-Id), the unit of fair share.
        flooder = Client(url, mode="legacy", read_timeout_seconds=CALL_SECONDS)
        polite = Client(url, mode="legacy", read_timeout_seconds=CALL_SECONDS)
        async with flooder, polite:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(flooder.call_tool, "sleep_async", {"seconds": 1.0})
                    await metrics_until(polite, lambda m: m["active_sessions"] == 2)
                    refused = [await flooder.call_tool("echo", {"text": "more"}) for _ in range(3)]
                    served = [await polite.call_tool("echo", {"text": f"polite {n}"}) for n in range(3)]
            m = await metrics(polite)
    for result in refused:
        error = error_of(result)
        assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"]
    assert [text_of(r) for r in served] == ["polite 0", "polite 1", "polite 2"]
    assert m["sessions_rejected_client_limit"] == 3 and m["sessions_rejected_capacity"] == 0
    assert m["total_sessions_created"] == 5 and m["total_sessions_completed"] == 5


async def test_stateless_era_clients_without_credentials_share_the_quota_of_their_peer_ip_address(
    tmp_path: Path,
) -> None:
    # The 2026-07-28 era has no MCP session: a client is its credential, else its peer's IP
    # address. Two clients on one machine (or behind one proxy) are one client to the server.
    config = server_config(limits={"max_sessions_per_client": 2})
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url = url_of(server)
        timeout = httpx2.Timeout(CALL_SECONDS, read=60.0)
        async with (
            Client(url, read_timeout_seconds=CALL_SECONDS) as first,
            Client(url, read_timeout_seconds=CALL_SECONDS) as second,
            httpx2.AsyncClient(headers={"Authorization": "Bearer someone-else"}, timeout=timeout) as http,
            Client(streamable_http_client(url, http_client=http), read_timeout_seconds=CALL_SECONDS) as credentialed,
            # uvicorn takes the address from X-Forwarded-For when the peer is trusted (loopback by
            # default: FORWARDED_ALLOW_IPS), as from a reverse proxy on the same machine.
            httpx2.AsyncClient(headers={"X-Forwarded-For": "192.0.2.7"}, timeout=timeout) as proxied_http,
            Client(streamable_http_client(url, http_client=proxied_http), read_timeout_seconds=CALL_SECONDS) as proxied,
        ):
            held = [await first.call_tool("session_create", {}) for _ in range(2)]
            refused = await second.call_tool("session_create", {})
            # An Mcp-Session-Id header means nothing in this era (the SDK checks none): a made-up
            # one is no new client.
            made_up_headers = {"Mcp-Session-Id": "made-up-1"}
            async with (
                httpx2.AsyncClient(headers=made_up_headers, timeout=timeout) as made_up_http,
                Client(streamable_http_client(url, http_client=made_up_http), read_timeout_seconds=60) as made_up,
            ):
                not_a_new_client = await made_up.call_tool("session_create", {})
            served = await credentialed.call_tool("session_create", {})
            forwarded = await proxied.call_tool("session_create", {})
    assert not any(result.is_error for result in held)
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"]
    assert code_of(not_a_new_client) == "capacity_exceeded", "a made-up Mcp-Session-Id is the same peer"
    assert not served.is_error, "a credential is a client of its own"
    assert not forwarded.is_error, "a forwarded address from a trusted peer is a client of its own"


# -- work that holds the shutdown's cancellation off -------------------------------------


@pytest.mark.parametrize("mode", ["default", "legacy"])
@pytest.mark.parametrize("tool", ["thread_wait", "shielded_sleep"])
async def test_a_call_holding_the_shutdown_off_is_answered_shutting_down_and_the_process_exits_0_on_time(
    tmp_path: Path, tool: str, mode: str
) -> None:
    # The call's work holds the cancellation off (a shielded thread wait, a shield) far past the
    # drain deadline: the shutdown still ends on time, the caller gets `shutting_down` on its POST
    # (not a transport error), nothing is logged as an error, and the process exits without
    # waiting for the work, saying why.
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": shutdown_seconds})
    results: dict[str, CallToolResult] = {}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        client = Client(url_of(server), read_timeout_seconds=CALL_SECONDS)
        if mode == "legacy":
            client = Client(url_of(server), mode="legacy", read_timeout_seconds=CALL_SECONDS)
        async with client:

            async def call() -> None:
                results["held"] = await client.call_tool(tool, {"seconds": HELD_SECONDS})

            with anyio.fail_after(shutdown_seconds + HELD_EXIT_MARGIN + 5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    await metrics_until(client, lambda m: m["active_sessions"] == 1)
                    signalled = time.monotonic()
                    server.send_signal(signal.SIGTERM)
            assert await server.wait_exit(within=shutdown_seconds + HELD_EXIT_MARGIN) == 0
            exit_seconds = time.monotonic() - signalled

    assert_held_call_answered(results["held"], server.stderr, tool, exit_seconds, shutdown_seconds)
    assert error_lines(server) == [], server.stderr
    # As the SDK shapes a result on the connection: the `serverInfo` stamp on protocol 2026-07-28 only.
    stamp = (results["held"].meta or {}).get(SERVER_INFO_META_KEY)
    assert stamp == ({"name": "mcp-session-manager", "version": package_version()} if mode == "default" else None)
