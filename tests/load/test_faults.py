"""Faults in real processes: clients that vanish mid-call, and SIGTERM with 100 calls in flight.

- stdio: the client process is killed (SIGKILL) while its call runs. The server sees stdin close,
  drains, cancels the call at its shutdown deadline and exits 0.
- streamable HTTP, 2026 era (the SDK client's default against this server): a call is one POST,
  and closing its response stream is how a client cancels. The session ends `cancelled` at once.
- streamable HTTP, 2025 era: the spec says a dropped connection is not a cancellation (the
  client may resume); the session holds its slot only until its deadline, then ends `timeout`.
  A client that ends its MCP session (DELETE) while a call runs gets it `cancelled`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import pytest
from anyio.streams.text import TextReceiveStream
from mcp import Client

from tests.e2e.conftest import (
    PROTOCOL_VERSION,
    ROOT,
    ServerProcess,
    metrics,
    metrics_until,
    render_toml,
    server_config,
    server_env,
    start_server,
)
from tests.helpers import code_of, text_of

#: Start-up, drain and exit of a server on a loaded machine.
EXIT_MARGIN = 15.0
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("faults-http")
    config = server_config(limits={"default_timeout_seconds": 60.0})
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, config, transport="streamable-http")) as server,
    ):
        yield server


@pytest.mark.parametrize("calls", [1, 3])
async def test_killing_a_stdio_client_mid_call_cancels_its_session_and_the_server_exits(
    tmp_path: Path, calls: int
) -> None:
    # With more than one call in flight, the second answer meets a writer the first one's broken
    # pipe has already ended: still one warning, not a traceback.
    config_path = tmp_path / "server.toml"
    config_path.write_text(render_toml(server_config(shutdown={"timeout_seconds": 1.0})), encoding="utf-8")
    command = [sys.executable, "-m", "tests.load.stdio_client", str(config_path), str(calls)]
    stderr: list[str] = []
    stderr_closed = anyio.Event()
    # The client runs in a process group of its own (its id is the client's pid), and the server
    # it launches joins it: killing the group on the way out stops both, whatever failed.
    async with await anyio.open_process(command, cwd=ROOT, env=server_env(), start_new_session=True) as client:
        try:
            assert client.stdout is not None

            async def read_stderr() -> None:  # the client's, and after its death the orphaned server's
                assert client.stderr is not None
                async for chunk in TextReceiveStream(client.stderr, errors="replace"):
                    stderr.append(chunk)
                stderr_closed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stderr)
                with anyio.fail_after(40):
                    ready = await client.stdout.receive()
                assert ready.startswith(b"ready "), (ready, "".join(stderr))
                client.kill()
                # The server notices its client is gone, shuts down and exits: its stderr closes.
                with anyio.fail_after(EXIT_MARGIN):
                    await stderr_closed.wait()
        finally:
            kill_group(client.pid)
    log = "".join(stderr)
    assert "Graceful shutdown: stdin closed" in log, log
    assert f"0 of {calls} session(s) finished, {calls} cancelled at the deadline" in log, log
    assert log.count("The client closed its end of the pipe") == 1, log
    assert "Traceback" not in log, log


async def test_a_call_whose_client_goes_away_over_http_ends_cancelled_at_once(http_server: ServerProcess) -> None:
    async with http_server.client() as observer:
        before = await metrics(observer)
        async with anyio.create_task_group() as tg:

            async def doomed_call() -> None:
                async with http_server.client() as client:
                    await client.call_tool("sleep_async", {"seconds": 3600})

            tg.start_soon(doomed_call)
            await metrics_until(observer, lambda m: m["active_sessions"] == before["active_sessions"] + 1)
            tg.cancel_scope.cancel()  # the client goes away: its connection closes mid-call
        after = await metrics_until(observer, lambda m: m["active_sessions"] == before["active_sessions"])
        assert after["total_sessions_cancelled"] - before["total_sessions_cancelled"] == 1
        assert after["total_sessions_created"] - before["total_sessions_created"] == 1
        assert text_of(await observer.call_tool("echo", {"text": "still up"})) == "still up"


async def legacy_call_then(server: ServerProcess, observer: Client, before: dict[str, Any], end: str) -> None:
    """Start `hang_async` in a 2025-era MCP session over raw HTTP; once it runs, `end` the client:
    "drop" closes the connection, "delete" ends the MCP session (DELETE) first."""
    url = server.url or ""
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    init = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "gone", "version": "0"}}
    with anyio.fail_after(10):
        async with httpx2.AsyncClient() as http:
            initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
            first = await http.post(url, headers=headers, json=initialize)
            assert first.status_code == 200, first.text
            session = {
                **headers,
                "mcp-session-id": first.headers["mcp-session-id"],
                "mcp-protocol-version": PROTOCOL_VERSION,
            }
            await http.post(url, headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            params = {"name": "hang_async", "arguments": {}}
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
            async with http.stream("POST", url, headers=session, json=call) as stream:
                assert stream.status_code == 200
                await metrics_until(observer, lambda m: m["active_sessions"] == before["active_sessions"] + 1)
                if end == "delete":
                    deleted = await http.delete(url, headers=session)
                    assert deleted.status_code in (200, 204), deleted.text
        # Leaving the block closes the connection, without a cancellation notification.


async def test_a_legacy_client_ending_its_mcp_session_mid_call_gets_it_cancelled(http_server: ServerProcess) -> None:
    async with http_server.client() as observer:
        before = await metrics(observer)
        await legacy_call_then(http_server, observer, before, "delete")
        after = await metrics_until(observer, lambda m: m["active_sessions"] == before["active_sessions"])
        assert after["total_sessions_cancelled"] - before["total_sessions_cancelled"] == 1


async def test_a_dropped_legacy_http_connection_holds_the_slot_only_until_the_deadline(
    http_server: ServerProcess,
) -> None:
    async with http_server.client() as observer:
        before = await metrics(observer)
        await legacy_call_then(http_server, observer, before, "drop")
        after = await metrics_until(observer, lambda m: m["active_sessions"] == before["active_sessions"])
        assert after["total_sessions_timeout"] - before["total_sessions_timeout"] == 1  # hang_async: 0.5 s deadline
        assert after["total_sessions_cancelled"] == before["total_sessions_cancelled"]


async def test_sigterm_with_100_calls_in_flight_drains_reports_and_exits_0_in_time(tmp_path: Path) -> None:
    shutdown_seconds = 2.0
    quick, stuck = 60, 40
    config = server_config(
        limits={"max_concurrent_sessions": 200},
        shutdown={"timeout_seconds": shutdown_seconds},
        tools={"hang_async": {"timeout_seconds": 60.0}},
    )
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        quick_ids = [await server.start_call("finish_in_shutdown", {"seconds": 0.5}) for _ in range(quick)]
        stuck_ids = [await server.start_call("hang_async") for _ in range(stuck)]
        with anyio.fail_after(20):
            while (data := raw(await server.call("session_metrics")))["active_sessions"] < quick + stuck:
                pass
        assert data["total_sessions_created"] == quick + stuck

        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN)
        exit_seconds = time.monotonic() - signalled

        finished = [await server.call_result(request_id, within=1) for request_id in quick_ids]
        cancelled = [await server.call_result(request_id, within=1) for request_id in stuck_ids]
    assert code == 0, server.stderr
    # The drain waits out its deadline for the stuck calls, then the process exits: 1.75 s of
    # slack for a loaded machine (about 0.3 s is usual), short of the 2 s a response left
    # waiting to be flushed would add (`server.app.FLUSH_SECONDS`), let alone stuck calls' 60 s.
    assert shutdown_seconds <= exit_seconds <= shutdown_seconds + 1.75, exit_seconds
    assert all(text_of(result) == "finished 0.5s into the shutdown" for result in finished)
    assert all(code_of(result) == "shutting_down" for result in cancelled)
    report = f"{quick} of {quick + stuck} session(s) finished, {stuck} cancelled at the deadline"
    assert report in server.stderr, server.stderr
    assert server.stray_stdout == []


def kill_group(group: int) -> None:
    """SIGKILL every process left in process group `group` (none left is fine)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def raw(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = result.structured_content or {}
    return data
