"""The standalone server as a real process over stdio: the session tools and their error codes,
deadlines for hanging async and sync tools, `server_shutdown`, SIGTERM/SIGINT, stdin EOF, and
a stdout that carries nothing but JSON-RPC messages.

Each test runs its own server process (over stdio one process is one connection), talking to
it with the SDK's `Client` (as an assistant would, including one launched the SDK's own way
with `StdioServerParameters`) or with raw JSON-RPC lines where the test needs the pipes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)

from server.app import FLUSH_SECONDS
from server.unanswered import WRITE_SECONDS
from tests.e2e.conftest import (
    CALL_SECONDS,
    HELD_EXIT_MARGIN,
    HELD_SECONDS,
    ROOT,
    START_SECONDS,
    TOOL_MODULE,
    ServerProcess,
    assert_held_call_answered,
    listen_through_sigterm,
    metrics,
    metrics_until,
    render_toml,
    server_config,
    server_env,
    start_server,
    tool_result,
)
from tests.e2e_cli.test_cli import (
    FIXTURES,
    NOISY_IMPORT_FD,
    NOISY_IMPORT_PRINT,
    NOISY_MODULE,
    NOISY_SETUP_PRINT,
)
from tests.fixtures.e2e_tools import IN_SHUTDOWN, NOISE_FROM_FD, NOISE_FROM_PRINT
from tests.helpers import ON_TIME_MARGIN, code_of, error_of, text_of

#: Margin on top of a shutdown deadline for the process to wind down and exit.
EXIT_MARGIN = 8.0
#: A tool module that reads stdin at import and in `setup`; not imported here, where it would
#: read the test's own stdin.
STDIN_READER_MODULE = f"{FIXTURES}.reads_stdin_at_import"


async def raw_metrics(server: ServerProcess) -> dict[str, Any]:
    result = await server.call("session_metrics")
    assert not result.is_error, result
    return result.structured_content or {}


async def raw_metrics_until(server: ServerProcess, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Ask `session_metrics` until `predicate` holds (each ask is a round trip; bounded)."""
    with anyio.fail_after(5):
        while not predicate(data := await raw_metrics(server)):
            pass
    return data


# -- the session tools -------------------------------------------------------------------


async def test_session_create_release_and_metrics_through_a_client_that_launches_the_server(tmp_path: Path) -> None:
    config_path = tmp_path / "server.toml"
    config_path.write_text(render_toml(server_config()), encoding="utf-8")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server", "--config", str(config_path)],
        cwd=ROOT,
        env=server_env(),
    )
    metadata = {"task": "summarise", "steps": [1, 2, 3], "note": "héllo"}
    async with Client(params, read_timeout_seconds=CALL_SECONDS) as client:
        created = await client.call_tool(
            "session_create", {"provider": "acme", "model": "m-1", "timeout_seconds": 60, "metadata": metadata}
        )
        assert not created.is_error, created
        session = created.structured_content or {}
        assert session["state"] == "active" and session["timeout_seconds"] == 60.0
        assert session["session_id"] and session["request_id"]
        assert datetime.fromisoformat(session["expires_at"]).tzinfo is not None
        during = await metrics(client)
        assert (during["active_sessions"], during["total_sessions_created"]) == (1, 1)
        metadata_bytes = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
        assert during["current_metadata_bytes"] == metadata_bytes

        released = await client.call_tool("session_release", {"session_id": session["session_id"]})
        assert not released.is_error, released
        ended = released.structured_content or {}
        assert ended["session_id"] == session["session_id"] and ended["state"] == "completed"
        assert ended["duration_seconds"] >= 0

        failed = await client.call_tool("session_create", {})
        failed_id = (failed.structured_content or {})["session_id"]
        released = await client.call_tool(
            "session_release", {"session_id": failed_id, "outcome": "error", "error": "the model gave up"}
        )
        assert (released.structured_content or {})["state"] == "error"

        assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"
        assert (await client.call_tool("fail", {"message": "kaput"})).is_error
        after = await metrics(client)

    assert (after["active_sessions"], after["total_sessions_created"]) == (0, 4)
    assert after["total_sessions_completed"] == 2 and after["total_sessions_error"] == 2
    assert after["total_sessions_timeout"] == 0
    assert after["current_metadata_bytes"] == 0 and after["peak_concurrent_sessions"] == 1
    assert after["success_rate"] == 0.5 and after["error_rate"] == 0.5 and after["timeout_rate"] == 0.0
    assert after["tools"]["echo"]["completed"] == 1 and after["tools"]["fail"]["errors"] == 1
    assert "session_metrics" not in after["tools"]  # management tools are not sessions
    assert after["limits"]["max_concurrent_sessions"] == 100


async def test_session_tools_refuse_bad_requests_with_their_error_codes(tmp_path: Path) -> None:
    config = server_config(limits={"max_metadata_bytes": 64})
    async with start_server(tmp_path, config) as server, server.client() as client:
        unknown = await client.call_tool("session_release", {"session_id": "s1-not-ours"})
        assert code_of(unknown) == "unknown_session" and error_of(unknown)["session_id"] == "s1-not-ours"

        session_id = (await client.call_tool("session_create", {})).structured_content or {}
        first = await client.call_tool("session_release", {"session_id": session_id["session_id"]})
        assert not first.is_error
        again = await client.call_tool("session_release", {"session_id": session_id["session_id"]})
        assert code_of(again) == "already_released"

        for tool, arguments in [
            ("session_create", {"timeout_seconds": -1}),
            ("session_create", {"timeout_seconds": 0}),
            ("session_release", {"session_id": session_id["session_id"], "outcome": "bogus"}),
            ("session_release", {}),
            ("server_shutdown", {"timeout_seconds": -1}),
        ]:
            result = await client.call_tool(tool, arguments)
            assert code_of(result) == "invalid_argument", (tool, arguments, result)

        too_large = await client.call_tool("session_create", {"metadata": {"blob": "x" * 100}})
        error = error_of(too_large)
        assert error["code"] == "metadata_too_large" and "64" in error["message"]
        fits = await client.call_tool("session_create", {"metadata": {"blob": "x" * 10}})
        assert not fits.is_error

        m = await metrics(client)
    assert m["sessions_rejected_metadata_size"] == 1
    assert (m["total_sessions_created"], m["active_sessions"], m["total_sessions_completed"]) == (2, 1, 1)
    assert m["shutdown_requested"] is False  # the refused server_shutdown did not start one


async def test_a_full_server_refuses_new_work_until_a_slot_is_released_or_expires(tmp_path: Path) -> None:
    config = server_config(limits={"max_concurrent_sessions": 2})
    async with start_server(tmp_path, config) as server, server.client() as client:
        held = (await client.call_tool("session_create", {})).structured_content or {}
        expiring = (await client.call_tool("session_create", {"timeout_seconds": 0.5})).structured_content or {}
        assert held["state"] == expiring["state"] == "active"

        refused = await client.call_tool("session_create", {})
        assert code_of(refused) == "capacity_exceeded" and "2" in text_of(refused)
        call = await client.call_tool("echo", {"text": "no room"})
        assert code_of(call) == "capacity_exceeded" and error_of(call)["tool"] == "echo"
        full = await metrics(client)  # management tools never count against the cap

        # The unreleased session times out at its deadline and frees its slot by itself.
        await metrics_until(client, lambda m: m["total_sessions_timeout"] == 1)
        assert text_of(await client.call_tool("echo", {"text": "room again"})) == "room again"
        expired = await client.call_tool("session_release", {"session_id": expiring["session_id"]})
        assert code_of(expired) == "already_released" and "timeout" in text_of(expired)
        released = await client.call_tool("session_release", {"session_id": held["session_id"]})
        assert (released.structured_content or {})["state"] == "completed"
        after = await metrics(client)
    assert full["sessions_rejected_capacity"] == 2 and full["active_sessions"] == 2
    assert full["peak_concurrent_sessions"] == 2
    assert (after["total_sessions_created"], after["active_sessions"]) == (3, 0)
    assert (after["total_sessions_completed"], after["total_sessions_timeout"]) == (2, 1)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_the_stdio_client_is_one_client_for_the_per_client_share_in_either_protocol_era(
    tmp_path: Path, mode: str
) -> None:
    # "auto" negotiates the 2026-07-28 era, where the SDK builds a Connection per request: the
    # share must still be the stdio stream's, not the request's.
    config = server_config(limits={"max_sessions_per_client": 1})
    async with start_server(tmp_path, config) as server:
        async with Client(server.transport(), mode=mode, read_timeout_seconds=CALL_SECONDS) as client:
            assert (client.protocol_version == "2026-07-28") == (mode == "auto"), client.protocol_version
            held = (await client.call_tool("session_create", {})).structured_content or {}
            assert held["state"] == "active"
            second = await client.call_tool("session_create", {})
            call = await client.call_tool("echo", {"text": "over the share"})
            await client.call_tool("session_release", {"session_id": held["session_id"]})
            again = await client.call_tool("echo", {"text": "room again"})
            m = await metrics(client)
    error = error_of(second)
    assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"]
    assert code_of(call) == "capacity_exceeded" and "max_sessions_per_client" in text_of(call)
    assert text_of(again) == "room again"
    assert (m["sessions_rejected_client_limit"], m["total_sessions_created"]) == (2, 2)


# -- deadlines ---------------------------------------------------------------------------


async def test_hanging_async_and_sync_tools_get_a_timeout_on_time_and_the_server_still_exits(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        async with server.client() as client:
            for tool in ("hang_async", "hang_sync"):
                started = time.monotonic()
                with anyio.fail_after(5):
                    result = await client.call_tool(tool, {})
                elapsed = time.monotonic() - started
                error = error_of(result)
                assert error["code"] == "timeout" and error["tool"] == tool and error["session_id"], result
                assert "0.5s" in error["message"]
                fate = "was abandoned: its thread runs on" if tool == "hang_sync" else "was cancelled"
                assert fate in error["message"], error["message"]
                assert 0.5 <= elapsed < 0.5 + ON_TIME_MARGIN, elapsed
            m = await metrics(client)
            # The server keeps serving while the stuck thread runs on.
            assert text_of(await client.call_tool("echo", {"text": "alive"})) == "alive"
        assert m["abandoned_threads"] == 1  # hang_sync's thread, still blocked in time.sleep
        assert (m["total_sessions_timeout"], m["total_sessions_error"], m["active_sessions"]) == (2, 0, 0)
        assert m["tools"]["hang_async"]["timeouts"] == 1 and m["tools"]["hang_sync"]["timeouts"] == 1
        assert m["timeout_rate"] == 1.0

        # A thread stuck in time.sleep(3600) cannot be joined: the server must exit anyway.
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert "1 stuck tool thread" in server.stderr


async def test_a_stuck_thread_holding_a_log_handlers_lock_does_not_hold_the_forced_exit(tmp_path: Path) -> None:
    # The exit that leaves stuck threads behind writes the log's pending counts first, but must not
    # wait for a lock a stuck tool holds (logging.shutdown takes every handler's: it hung for good).
    config = server_config(tools={"hold_a_log_lock": {"timeout_seconds": 0.5}})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        assert text_of(await server.call("log_repeated", {"message": "Library trouble", "times": 3})) == "logged"
        assert error_of(await server.call("hold_a_log_lock"))["code"] == "timeout"
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert "1 stuck tool thread" in server.stderr
    assert "Library trouble [and 1 more like this" in server.stderr, server.stderr


#: A tool module whose tools use `concurrent.futures` thread pools (the loop's default executor, a
#: pool of its own) and whose `atexit` handler writes `EXECUTOR_AT_EXIT`; not imported here,
#: where it would register that handler in the test process.
EXECUTOR_MODULE = "tests.fixtures.executor_tools"
EXECUTOR_AT_EXIT = "executor_tools: atexit handler ran"


async def test_idle_thread_pool_workers_let_the_process_exit_the_ordinary_way(tmp_path: Path) -> None:
    # asyncio's getaddrinfo (what asyncio.open_connection and most HTTP clients do) leaves a worker
    # of the loop's default executor waiting for more work, and so does a module's own pool: such
    # idle workers run no tool work, so the exit is the ordinary one, which runs atexit handlers.
    config: dict[str, Any] = {"server": {"tool_modules": [EXECUTOR_MODULE]}, "shutdown": {"timeout_seconds": 5.0}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        assert text_of(await server.call("resolve", {"host": "localhost"})) in ("127.0.0.1", "::1")
        assert text_of(await server.call("pooled", {"text": "idle"})) == "IDLE"
        names = text_of(await server.call("threads")).split("\n")
        assert any(name.startswith("asyncio_") for name in names), names  # the default executor's worker
        assert any(name.startswith("executor_tools") for name in names), names  # the module pool's
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert EXECUTOR_AT_EXIT in server.stderr, server.stderr
    assert "Exiting with" not in server.stderr, server.stderr


async def test_what_the_start_built_is_out_of_the_garbage_collector_s_sight(tmp_path: Path) -> None:
    # With 5,000 tools the start leaves half a million objects (the SDK's models of each tool) that
    # live as long as the process: each full collection walked them all, holding the event loop
    # (and every deadline on it) about 0.4 s. Frozen after the start, they are not walked.
    config: dict[str, Any] = {"server": {"tool_modules": ["tests.fixtures.gc_tools"]}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        state = dict(pair.split("=") for pair in text_of(await server.call("gc_state")).split())
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert int(state["frozen"]) > int(state["tracked"]), state


async def test_a_thread_pool_worker_still_running_tool_work_forces_the_exit(tmp_path: Path) -> None:
    # A call cancelled at the drain deadline whose work sleeps on in a worker of the loop's default
    # executor: Python would wait for that thread at exit, so the process exits at once, saying
    # so, and counts that worker alone (the module pool's idle one is not tool work).
    shutdown_seconds = 1.0
    config: dict[str, Any] = {
        "server": {"tool_modules": [EXECUTOR_MODULE, TOOL_MODULE]},
        "shutdown": {"timeout_seconds": shutdown_seconds},
    }
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        assert text_of(await server.call("pooled", {"text": "idle"})) == "IDLE"
        # A library's record three times: the log writes the first and holds the other two, the last
        # of them to be written with the count of the one before.
        assert text_of(await server.call("log_repeated", {"message": "Library trouble", "times": 3})) == "logged"
        stuck = await server.start_call("stuck_in_executor", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        await server.close_stdin()
        assert await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN) == 0
        assert error_of(await server.call_result(stuck, within=0))["code"] == "shutting_down"
    assert "Exiting with 1 thread(s) still running tool work past the shutdown" in server.stderr, server.stderr
    assert EXECUTOR_AT_EXIT not in server.stderr, server.stderr
    # The exit skips atexit handlers, but still writes the count the log held.
    assert "mcp.e2e_library: Library trouble [and 1 more like this in the last" in server.stderr, server.stderr


@pytest.fixture
def workers() -> Iterator[list[int]]:
    """Worker processes a test learns of: killed at its end if still running (the server's exit
    should have stopped them; a failing test must not leave them behind)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def wait_gone(pid: int, within: float = 5.0) -> None:
    """Wait (bounded) until process `pid` has ended (a zombie counts: it runs nothing)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # ended and reaped
    try:
        with anyio.fail_after(within):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def test_an_idle_process_pool_is_stopped_by_the_ordinary_exit(tmp_path: Path, workers: list[int]) -> None:
    # Its manager thread (not daemon) was taken for tool work: the exit was forced, skipping the
    # hook that stops the pool, and the forked worker lived on, holding the stdio pipes (and,
    # over HTTP, the listening port).
    config: dict[str, Any] = {"server": {"tool_modules": [EXECUTOR_MODULE]}, "shutdown": {"timeout_seconds": 5.0}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        worker = int(text_of(await server.call("in_process", {"seconds": 0})))
        workers.append(worker)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        await wait_gone(worker)
    assert EXECUTOR_AT_EXIT in server.stderr, server.stderr
    assert "Exiting with" not in server.stderr, server.stderr


async def test_a_forced_exit_stops_a_process_pool_s_busy_worker(tmp_path: Path, workers: list[int]) -> None:
    shutdown_seconds = 1.0
    config: dict[str, Any] = {
        "server": {"tool_modules": [EXECUTOR_MODULE]},
        "shutdown": {"timeout_seconds": shutdown_seconds},
    }
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        worker = int(text_of(await server.call("in_process", {"seconds": 0})))
        workers.append(worker)
        busy = await server.start_call("in_process", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        await server.close_stdin()
        assert await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN) == 0
        assert error_of(await server.call_result(busy, within=0))["code"] == "shutting_down"
        await wait_gone(worker)
    assert "Exiting with 1 thread(s) still running tool work past the shutdown" in server.stderr, server.stderr


async def test_a_signal_to_a_forked_worker_ends_the_worker_not_the_server(tmp_path: Path, workers: list[int]) -> None:
    # The worker had the server's handlers, which write the signal to the event loop's wake-up
    # socket, shared with the server: SIGTERM to the worker began the server's shutdown.
    config: dict[str, Any] = {"server": {"tool_modules": [EXECUTOR_MODULE, TOOL_MODULE]}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        worker = int(text_of(await server.call("in_process", {"seconds": 0})))
        workers.append(worker)
        # SIGINT (a terminal's Ctrl-C reaches the whole process group) is the server's to handle.
        os.kill(worker, signal.SIGINT)
        assert int(text_of(await server.call("in_process", {"seconds": 0}))) == worker, "the worker ended"
        os.kill(worker, signal.SIGTERM)
        await wait_gone(worker)
        assert text_of(await server.call("echo", {"text": "still serving"})) == "still serving"
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert "received SIGTERM" not in server.stderr and "received SIGINT" not in server.stderr, server.stderr


async def test_a_process_a_tool_started_does_not_hold_the_exit_it_is_stopped_and_named(
    tmp_path: Path, workers: list[int]
) -> None:
    # multiprocessing's atexit hook joined it, for as long as it ran, with SIGINT and SIGTERM ignored.
    config: dict[str, Any] = {"server": {"tool_modules": [EXECUTOR_MODULE]}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        child = int(text_of(await server.call("start_child", {"seconds": 3600})))
        workers.append(child)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        await wait_gone(child)
    assert "Exiting with 1 process(es) a tool started still running past the shutdown: stopping them" in server.stderr
    assert "Stopped 1 process(es) a tool started" in server.stderr, server.stderr


async def test_a_program_a_tool_runs_does_not_inherit_sigint_ignored(tmp_path: Path, workers: list[int]) -> None:
    # The fork hook ignored SIGINT (SIG_IGN), which survives exec: subprocess with a preexec_fn
    # forks through the hook, so the program could not be stopped with Ctrl-C.
    config: dict[str, Any] = {"server": {"tool_modules": [EXECUTOR_MODULE]}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        program = int(text_of(await server.call("run_program", {"seconds": 30})))
        workers.append(program)
        status = await anyio.Path(f"/proc/{program}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        os.kill(program, signal.SIGKILL)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert not ignored & (1 << (signal.SIGINT - 1)), f"SIGINT ignored: SigIgn {ignored:x}"


#: A tool module whose `atexit` handler writes `SLOW_EXIT_LINE` and then takes 2 s.
SLOW_EXIT_MODULE = "tests.fixtures.slow_exit_tools"
SLOW_EXIT_LINE = "slow_exit_tools: atexit handler flushing"


@pytest.mark.parametrize("trigger", ["stdin", "server_shutdown", "SIGTERM"])
async def test_a_signal_in_the_last_moments_of_the_exit_joins_it_and_a_second_forces_it(
    tmp_path: Path, trigger: str
) -> None:
    # Once serving's handlers were gone, SIGTERM had its default action back: the process ended
    # by the signal (no status 0, no word in the log) while it ran its atexit handlers.
    config: dict[str, Any] = {"server": {"tool_modules": [SLOW_EXIT_MODULE]}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        if trigger == "stdin":
            await server.close_stdin()
        elif trigger == "server_shutdown":
            await server.call("server_shutdown", {"timeout_seconds": 0})
        else:
            server.send_signal(signal.SIGTERM)
        await server.wait_stderr(SLOW_EXIT_LINE)
        if trigger == "SIGTERM":  # the shutdown's own signal was the first: this one forces the exit
            server.send_signal(signal.SIGINT)
            assert await server.wait_exit(within=EXIT_MARGIN) == 1
            await server.wait_stderr("SIGINT after SIGTERM: forcing exit; the server had stopped serving")
            return
        server.send_signal(signal.SIGTERM)
        await server.wait_stderr("Received SIGTERM as the server exits: joining the exit")
        assert await server.wait_exit(within=EXIT_MARGIN) == 0


async def test_past_max_abandoned_threads_sync_tools_are_refused_at_once_async_ones_served(tmp_path: Path) -> None:
    # echo's own deadline, so that "at once" is told from "after its timeout" with seconds to
    # spare either way: a refusal at once is one stdio round trip (milliseconds, well under a
    # second on a loaded machine), one that came at echo's deadline takes all of it.
    echo_timeout = 6.0
    config = server_config(limits={"max_abandoned_threads": 1}, tools={"echo": {"timeout_seconds": echo_timeout}})
    async with start_server(tmp_path, config) as server:
        async with server.client() as client:
            assert code_of(await client.call_tool("hang_sync", {})) == "timeout"
            started = time.monotonic()
            refused = await client.call_tool("echo", {"text": "needs a thread"})  # echo is sync
            elapsed = time.monotonic() - started
            assert elapsed < echo_timeout / 2, (
                f"refused at once, not after echo's {echo_timeout}s timeout: {elapsed:.2f}s"
            )
            assert code_of(await client.call_tool("hang_async", {})) == "timeout"  # async: still admitted
            m = await metrics(client)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and "1 thread is stuck" in error["message"]
    assert (m["sessions_rejected_threads"], m["abandoned_threads"], m["max_abandoned_threads"]) == (1, 1, 1)


async def test_progress_over_stdio_keeps_a_call_alive_and_silence_times_it_out(tmp_path: Path) -> None:
    config = server_config(tools={"steps": {"timeout_seconds": 20.0, "idle_timeout_seconds": 0.6}})
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with start_server(tmp_path, config) as server:
        async with server.client() as client:
            started = time.monotonic()
            with anyio.fail_after(10):
                alive = await client.call_tool(
                    "steps", {"count": 8, "seconds_per_step": 0.25}, progress_callback=on_progress
                )
            lived = time.monotonic() - started
            started = time.monotonic()
            with anyio.fail_after(10):
                stalled = await client.call_tool("steps", {"count": 8, "seconds_per_step": 0.1, "stall_after": 2})
            stalled_after = time.monotonic() - started
            m = await metrics(client)
    assert text_of(alive) == "8 steps" and lived >= 2.0, "lived over three idle timeouts by reporting progress"
    assert seen == [float(n) for n in range(1, 9)]
    error = error_of(stalled)
    assert error["code"] == "timeout" and "no progress" in error["message"]
    # At the idle timeout after the last progress: seconds of slack for a loaded machine, far
    # short of the 20 s deadline a call whose silence went unnoticed would run to.
    assert 0.2 + 0.6 <= stalled_after < 0.2 + 0.6 + 4.0, stalled_after
    assert (m["total_sessions_completed"], m["total_sessions_timeout"]) == (1, 1)


# -- shutdown ----------------------------------------------------------------------------


async def test_server_shutdown_drains_cancels_the_rest_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    results: dict[str, Any] = {}
    # Over stdio the client owns the process: no token is needed, even with one configured.
    config = server_config(shutdown={"admin_token_env": "E2E_SESSIONS_ADMIN_TOKEN"})
    async with start_server(tmp_path, config, env={"E2E_SESSIONS_ADMIN_TOKEN": "secret"}) as server:
        async with server.client() as client:

            async def call(key: str, tool: str, arguments: dict[str, Any]) -> None:
                results[key] = await client.call_tool(tool, arguments)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:  # ends once every call has its answer
                    tg.start_soon(call, "quick", "finish_in_shutdown", {})
                    tg.start_soon(call, "stuck", "sleep_async", {"seconds": 3600})
                    await metrics_until(client, lambda m: m["active_sessions"] == 2)
                    tg.start_soon(call, "shutdown", "server_shutdown", {"timeout_seconds": 1})
                    await metrics_until(client, lambda m: m["shutdown_requested"])

                    late_call = await client.call_tool("echo", {"text": "too late"})
                    late_session = await client.call_tool("session_create", {})
                    rejected = await metrics(client)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0

    assert code_of(late_call) == "shutting_down" and code_of(late_session) == "shutting_down"
    assert "Graceful shutdown: requested by a server_shutdown call\n" in server.stderr, server.stderr
    assert rejected["sessions_rejected_shutdown"] == 2
    report = results["shutdown"]
    assert not report.is_error, report
    numbers = report.structured_content or {}
    assert numbers["initial_active_sessions"] == 2
    assert numbers["sessions_completed_during_shutdown"] == 1
    assert numbers["sessions_cancelled_at_deadline"] == 1
    assert numbers["final_active_sessions"] == 0
    assert numbers["timeout_reached"] is True
    assert numbers["total_sessions_at_shutdown"] == 2
    assert 1.0 <= numbers["shutdown_duration"] < 5.0
    assert text_of(results["quick"]) == IN_SHUTDOWN
    assert code_of(results["stuck"]) == "shutting_down"


async def start_quick_and_stuck_calls(server: ServerProcess) -> tuple[int, int]:
    """Start a call that finishes early in the shutdown and one that hangs; return once both are sessions."""
    await server.initialize()
    quick = await server.start_call("finish_in_shutdown")
    stuck = await server.start_call("sleep_async", {"seconds": 3600})
    await raw_metrics_until(server, lambda m: m["active_sessions"] == 2)
    return quick, stuck


async def test_sigterm_drains_calls_in_flight_then_exits_0(tmp_path: Path) -> None:
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": shutdown_seconds})
    async with start_server(tmp_path, config) as server:
        quick, stuck = await start_quick_and_stuck_calls(server)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN) == 0
        exit_seconds = time.monotonic() - signalled
        finished = await server.call_result(quick)
        cancelled = await server.call_result(stuck)
    assert text_of(finished) == IN_SHUTDOWN
    assert code_of(cancelled) == "shutting_down"
    assert exit_seconds >= shutdown_seconds  # it drained up to the deadline, not a moment less
    assert "received SIGTERM" in server.stderr
    assert "1 of 2 session(s) finished, 1 cancelled" in server.stderr
    assert server.stray_stdout == []


async def test_sigint_runs_the_same_graceful_shutdown(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        quick = await server.start_call("finish_in_shutdown")
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        server.send_signal(signal.SIGINT)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        finished = await server.call_result(quick)
    assert text_of(finished) == IN_SHUTDOWN
    assert "received SIGINT" in server.stderr and "1 of 1 session(s) finished, 0 cancelled" in server.stderr


async def test_stdin_eof_lets_running_calls_answer_then_exits_0(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        quick = await server.start_call("finish_in_shutdown")
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        finished = await server.call_result(quick)
    assert text_of(finished) == IN_SHUTDOWN
    assert "stdin closed" in server.stderr


async def test_stdin_eof_ends_the_client_s_session_create_sessions_at_once_and_drains_only_its_calls(
    tmp_path: Path,
) -> None:
    # Only the client that closed stdin could release its reservations: the drain must not wait its
    # whole 20 s for them (the SDK's client kills a server still running 4 s after closing stdin).
    config = server_config(shutdown={"timeout_seconds": 20})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        reservation = (await server.call("session_create", {"timeout_seconds": 60})).structured_content or {}
        quick = await server.start_call("finish_in_shutdown")
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 2)
        closed = time.monotonic()
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        exit_seconds = time.monotonic() - closed
        finished = await server.call_result(quick)
    assert text_of(finished) == IN_SHUTDOWN  # the running call still finished and answered
    assert exit_seconds < 4.0, exit_seconds
    assert "stdin closed: ended 1 session(s) made by session_create, which no one can release" in server.stderr
    assert (
        f"Session {reservation['session_id']} ended cancelled" in server.stderr
        and "the client closed stdin: no one is left to release it" in server.stderr
    ), server.stderr
    assert "1 of 1 session(s) finished, 0 cancelled" in server.stderr, server.stderr


async def test_a_setting_that_cannot_take_effect_is_warned_about_at_start(tmp_path: Path) -> None:
    config = server_config(limits={"max_concurrent_sessions": 5}, tools={"echo": {"max_concurrent": 50}})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert (
        "WARNING server.cli: Config: tools.echo.max_concurrent (50) is above limits.max_concurrent_sessions (5): "
        "the server-wide cap is reached first" in server.stderr
    ), server.stderr


async def test_sigterm_ends_an_open_listen_stream_with_its_result_and_exits_at_once(tmp_path: Path) -> None:
    # A `subscriptions/listen` request (protocol 2026-07-28) is answered only when its stream ends:
    # the shutdown ends it with its result (the SDK's client raises `SubscriptionLost` for a stream
    # that stops without one), so the exit does not wait for it as an unanswered request.
    async with start_server(tmp_path, server_config()) as server:
        events, status = await listen_through_sigterm(server, within=EXIT_MARGIN)
    assert (events, status) == ([], 0)
    assert "received SIGTERM" in server.stderr
    assert "unanswered" not in server.stderr
    assert server.stray_stdout == []


async def test_session_create_answers_the_json_rpc_id_of_its_call_as_its_request_id(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        answers: dict[int | str, str] = {}
        for request_id in ("", "0", 0, "call-7"):
            answer = await server.request_with_id(request_id, "tools/call", {"name": "session_create", "arguments": {}})
            answers[request_id] = (tool_result(answer).structured_content or {})["request_id"]
    # "" is an id as good as any other: it must not be taken for "none" (and replaced by the session id).
    assert answers == {"": "", "0": "0", 0: "0", "call-7": "call-7"}


@pytest.mark.parametrize("spelling", [int, str], ids=["as-sent", "as-a-string"])
async def test_a_call_the_client_cancels_ends_as_cancelled_and_does_not_hold_up_the_exit(
    tmp_path: Path, spelling: Callable[[int], int | str]
) -> None:
    # The SDK takes a cancellation naming request 7 as "7" for request 7 (as the TypeScript SDK
    # does): the call is cancelled, so it must not be waited for, or answered, at the exit either.
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        request_id = await server.start_call("sleep_async", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        cancel = {"requestId": spelling(request_id), "reason": "the user gave up"}
        await server.notify("notifications/cancelled", cancel)
        m = await raw_metrics_until(server, lambda m: m["active_sessions"] == 0)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert m["total_sessions_cancelled"] == 1 and m["tools"]["sleep_async"]["cancelled"] == 1
    assert not any(json.loads(line).get("id") == request_id for line in server.stdout_lines)
    # A cancelled request gets no response; the server must not wait for one before exiting.
    assert "unanswered" not in server.stderr


@contextlib.contextmanager
def closing_stdout(tmp_path: Path, config: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    """The server as a process, serving a `hang_async` call, whose client has closed its end of
    stdout once initialized: the server finds out when it next writes, here the call's timeout at
    its 0.5 s deadline, and stops with no shutdown. (subprocess, not anyio: closing anyio's stream
    of a child's stdout leaves the pipe open.) Killed on the way out."""
    config_path = tmp_path / "server.toml"
    config_path.write_text(render_toml(config), encoding="utf-8")
    command = [sys.executable, "-m", "server", "--config", str(config_path)]
    with subprocess.Popen(
        command, cwd=ROOT, env=server_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        try:
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
            for message in (
                {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "hang_async", "arguments": {}}},
            ):
                process.stdin.write((json.dumps(message) + "\n").encode())
            process.stdin.flush()
            watchdog = threading.Timer(START_SECONDS, process.kill)  # bounds the read: a kill ends it at EOF
            watchdog.start()
            try:
                line = process.stdout.readline()
            finally:
                watchdog.cancel()
            assert line, f"no answer to initialize within {START_SECONDS}s"
            assert json.loads(line)["id"] == 1  # the server is up and serving
            process.stdout.close()
            yield process
        finally:
            process.kill()


def test_a_client_that_closes_only_stdout_stops_the_server_at_its_next_answer_with_one_warning(
    tmp_path: Path,
) -> None:
    # The client keeps stdin open but reads no more: the server stops, exit status 0.
    with closing_stdout(tmp_path, server_config()) as process:
        status = process.wait(timeout=EXIT_MARGIN)
        _, stderr_bytes = process.communicate(timeout=EXIT_MARGIN)
    stderr = stderr_bytes.decode()
    assert status == 0, stderr
    assert "Session " in stderr and "ended timeout" in stderr, stderr
    assert stderr.count("The client closed its end of the pipe") == 1, stderr
    assert "Traceback" not in stderr, stderr


def test_a_signal_after_a_stop_without_a_shutdown_joins_the_exit(tmp_path: Path) -> None:
    # A client that closes its stdout stops the server with no shutdown (exit status 0); a SIGTERM
    # while the tool modules' atexit handlers ran was taken for one before serving: status 143.
    config = server_config()
    config["server"] = {"tool_modules": [*config["server"]["tool_modules"], SLOW_EXIT_MODULE]}
    with closing_stdout(tmp_path, config) as process:
        assert process.stderr is not None
        watchdog = threading.Timer(EXIT_MARGIN, process.kill)  # bounds the reads below: a kill ends them at EOF
        watchdog.start()
        try:
            lines = []
            for line in iter(process.stderr.readline, b""):
                lines.append(line.decode())
                if SLOW_EXIT_LINE in lines[-1]:  # serving has stopped: the atexit handlers run
                    process.send_signal(signal.SIGTERM)
                    break
            status = process.wait(timeout=EXIT_MARGIN)
            stderr = "".join(lines) + process.stderr.read().decode()
        finally:
            watchdog.cancel()
    assert status == 0, stderr
    assert "The client closed its end of the pipe" in stderr, stderr
    assert "Received SIGTERM as the server exits: joining the exit" in stderr, stderr


async def test_stdout_carries_only_json_rpc_messages_even_when_a_tool_prints(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        for text in ("one", "two"):
            assert text_of(await server.call("noisy", {"text": text})) == text
        await raw_metrics(server)
        # A print reaches stderr at its newline, while serving, not when the exit flushes it.
        await server.wait_stderr(NOISE_FROM_PRINT, within=3.0)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    # Every line the process ever wrote to stdout, up to EOF, is a JSON-RPC message...
    assert server.stray_stdout == []
    assert len(server.stdout_lines) == 4  # initialize, noisy, noisy, session_metrics
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in server.stdout_lines)
    assert not any(NOISE_FROM_PRINT in line or NOISE_FROM_FD in line for line in server.stdout_lines)
    # ...and the tool's output went to stderr: fd 1 pointed there while serving, and `print`
    # wrote there line by line.
    assert server.stderr.count(NOISE_FROM_FD) == 2
    assert server.stderr.count(NOISE_FROM_PRINT) == 2


async def test_a_result_holding_text_that_is_not_unicode_is_sent_with_replacement_characters(tmp_path: Path) -> None:
    # A lone surrogate (a non-UTF-8 file name through os.fsdecode) cannot be written as UTF-8:
    # the SDK's writer raised on it, which ended the server with the other calls unanswered.
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        sleeping = await server.start_call("sleep_async", {"seconds": 0.5})
        names = await server.call("undecodable_names")
        assert text_of(await server.call_result(sleeping)) == "slept 0.5s"
        assert text_of(await server.call("echo", {"text": "still serving"})) == "still serving"
        await server.wait_stderr("not valid Unicode", within=3.0)
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert not names.is_error and "report-\ufffd.txt" in text_of(names)
    assert (names.structured_content or {}).get("result") == ["report-\ufffd.txt"]
    assert server.stray_stdout == []


async def test_stdout_carries_only_json_rpc_messages_when_a_tool_module_prints_at_import_and_setup(
    tmp_path: Path,
) -> None:
    config = server_config()
    config["server"] = {"tool_modules": [*config["server"]["tool_modules"], NOISY_MODULE]}
    async with start_server(tmp_path, config) as server:
        initialized = await server.initialize()
        assert text_of(await server.call("whisper", {"text": "QUIET"})) == "quiet"
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    # stdout, up to EOF, is exactly the two responses, one JSON-RPC message per line...
    assert server.stray_stdout == []
    first, second = (json.loads(line) for line in server.stdout_lines)
    assert first == initialized and second["id"] == initialized["id"] + 1
    # ...and what the module wrote while imported and set up (before serving began) went to stderr.
    for noise in (NOISY_IMPORT_PRINT, NOISY_IMPORT_FD, NOISY_SETUP_PRINT):
        assert server.stderr.count(noise) == 1, noise


async def test_a_tool_module_reading_stdin_at_import_and_setup_reads_nothing_and_every_message_is_served(
    tmp_path: Path,
) -> None:
    config = server_config()
    config["server"] = {"tool_modules": [*config["server"]["tool_modules"], STDIN_READER_MODULE]}
    async with start_server(tmp_path, config) as server:
        # Sent at once, maybe while the module is still being imported: before serving began
        # it must already read the null device, not this stream.
        try:
            initialized = await server.initialize()
        except TimeoutError:
            raise AssertionError(
                f"initialize was never answered (read by the tool module?):\n{server.stderr}"
            ) from None
        listed = await server.request("tools/list", {})
        read = await server.call("stdin_read_at_startup")
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert "result" in initialized
    assert "stdin_read_at_startup" in {tool["name"] for tool in listed["result"]["tools"]}
    assert json.loads(text_of(read)) == {"import": "", "setup": ""}  # end of file at once, both ways
    # Every message the client sent was read by the server: three requests, three responses.
    assert server.stray_stdout == [] and len(server.stdout_lines) == 3


@pytest.mark.parametrize(
    ("first", "second", "said"),
    [
        (signal.SIGINT, signal.SIGINT, "Second SIGINT"),  # an impatient second Ctrl-C
        (signal.SIGTERM, signal.SIGINT, "SIGINT after SIGTERM"),  # a Ctrl-C after an orchestrator's stop
    ],
)
async def test_a_second_signal_forces_an_immediate_exit_with_status_1(
    tmp_path: Path, first: signal.Signals, second: signal.Signals, said: str
) -> None:
    config = server_config(shutdown={"timeout_seconds": 60})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        # A library's record three times: the log writes the first and holds the other two, the last
        # of them to be written with the count of the one before.
        assert text_of(await server.call("log_repeated", {"message": "Library trouble", "times": 3})) == "logged"
        await server.start_call("sleep_async", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        server.send_signal(first)
        await server.wait_stderr(f"Graceful shutdown: received {first.name}")
        server.send_signal(second)
        assert await server.wait_exit(within=EXIT_MARGIN) == 1
    assert f"{said}: forcing exit; 1 tool call(s) running or queued are cut off unanswered" in server.stderr
    # The forced exit still writes the count the log held.
    assert "mcp.e2e_library: Library trouble [and 1 more like this in the last" in server.stderr, server.stderr


async def test_a_server_shutdown_its_client_cancels_still_ends_and_the_process_exits_0(tmp_path: Path) -> None:
    # The client gives up on its `server_shutdown` during the drain (a request timeout shorter
    # than the drain): the shutdown still runs to its end, the call left at the deadline is
    # answered, and the process exits 0, instead of staying half shut down until a second signal.
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": 60})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        hanging = await server.start_call("sleep_async", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        shutdown = await server.start_call("server_shutdown", {"timeout_seconds": shutdown_seconds})
        await server.wait_stderr("Shutting down: waiting up to")
        await server.notify("notifications/cancelled", {"requestId": shutdown, "reason": "client timeout"})
        assert await server.wait_exit(within=shutdown_seconds + EXIT_MARGIN) == 0, server.stderr
        answer = await server.call_result(hanging, within=0)
    assert error_of(answer)["code"] == "shutting_down", answer
    assert "0 of 1 session(s) finished, 1 cancelled" in server.stderr, server.stderr
    assert server.stray_stdout == []


async def test_a_bad_config_exits_2_naming_the_file_and_key_without_starting(tmp_path: Path) -> None:
    config = server_config(limits={"max_concurrent_sessions": 0, "max_sesions": 5})
    async with start_server(tmp_path, config) as server:
        assert await server.wait_exit(within=EXIT_MARGIN) == 2
    assert server.stdout_lines == []
    assert f"{server.config_path}: limits.max_concurrent_sessions" in server.stderr
    assert f"{server.config_path}: limits.max_sesions: unknown key" in server.stderr


# -- work that holds the shutdown's cancellation off -------------------------------------


@pytest.mark.parametrize("tool", ["thread_wait", "shielded_sleep", "progress_flood"])
async def test_a_call_holding_the_shutdown_off_is_answered_shutting_down_and_the_process_exits_0_on_time(
    tmp_path: Path, tool: str
) -> None:
    # The call's work holds the cancellation off (a shielded thread wait, a shield) far past the
    # drain deadline: the shutdown still ends on time, the caller gets `shutting_down` (not
    # silence), and the process exits without waiting for the work, saying why. Work that reports
    # progress faster than the client reads (`progress_flood`) must not bury that answer past the
    # exit's write bound, and none of its notifications may come after it.
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": shutdown_seconds})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        held = await server.start_request(
            "tools/call",
            {"name": tool, "arguments": {"seconds": HELD_SECONDS}, "_meta": {"progressToken": "held"}},
        )
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=shutdown_seconds + HELD_EXIT_MARGIN) == 0
        exit_seconds = time.monotonic() - signalled
        answer = await server.call_result(held, within=0)
    assert_held_call_answered(answer, server.stderr, tool, exit_seconds, shutdown_seconds)
    lines = [json.loads(line) for line in server.stdout_lines if line]
    answered_at = next(i for i, message in enumerate(lines) if message.get("id") == held)
    after = [m for m in lines[answered_at:] if m.get("method") == "notifications/progress"]
    assert after == [], f"{len(after)} progress notification(s) after the answer"
    assert "still being written" not in server.stderr, server.stderr
    assert server.stray_stdout == []


@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
async def test_a_held_call_s_exit_answer_has_the_shape_the_sdk_gives_results_on_its_connection(
    tmp_path: Path, era: str
) -> None:
    # The answer the server writes itself at the exit (the SDK's handler writes none) must look
    # like one the SDK writes on that connection: `resultType` and the `serverInfo` stamp on
    # protocol 2026-07-28, neither in the handshake era. An answer to `echo` shows the SDK's shape.
    shutdown_seconds = 1.0
    config = server_config(shutdown={"timeout_seconds": shutdown_seconds})
    meta: dict[str, Any] = {}
    async with start_server(tmp_path, config) as server:
        if era == "2026-07-28":  # no handshake: each request names its protocol version
            meta = {
                PROTOCOL_VERSION_META_KEY: era,
                CLIENT_INFO_META_KEY: {"name": "e2e", "version": "0"},
                CLIENT_CAPABILITIES_META_KEY: {},
            }
        else:
            assert (await server.initialize())["result"]["protocolVersion"] == era

        async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            response = await server.request("tools/call", {"name": name, "arguments": arguments, "_meta": meta})
            assert "result" in response, response
            result: dict[str, Any] = response["result"]
            return result

        given = await call("echo", {"text": "shape"})
        held = await server.start_request(
            "tools/call", {"name": "shielded_sleep", "arguments": {"seconds": HELD_SECONDS}, "_meta": meta}
        )
        with anyio.fail_after(5):
            while (await call("session_metrics", {}))["structuredContent"]["active_sessions"] != 1:
                pass
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=shutdown_seconds + HELD_EXIT_MARGIN) == 0
        answer = (await server.response(held, within=0))["result"]
    assert error_of(tool_result({"result": answer}))["code"] == "shutting_down", answer
    assert answer.get("resultType") == given.get("resultType"), (answer, given)
    assert answer["_meta"].get(SERVER_INFO_META_KEY) == given.get("_meta", {}).get(SERVER_INFO_META_KEY)
    if era == "2026-07-28":
        assert given["resultType"] == "complete" and given["_meta"][SERVER_INFO_META_KEY]["name"], given
    else:
        assert "resultType" not in given and SERVER_INFO_META_KEY not in given.get("_meta", {}), given


# -- a client slow to read its answers ---------------------------------------------------

#: An answer larger than a pipe holds (64 KiB on Linux): writing it blocks until the client reads.
LARGE_ANSWER = 200_000


async def start_large_calls(server: ServerProcess, count: int) -> list[int]:
    """Start `count` calls that answer `LARGE_ANSWER` characters 0.1 s into the shutdown."""
    await server.initialize()
    calls = [await server.start_call("large_in_shutdown", {"chars": LARGE_ANSWER}) for _ in range(count)]
    await raw_metrics_until(server, lambda m: m["active_sessions"] == count)
    return calls


async def test_a_client_that_stops_reading_during_the_drain_gets_each_answer_once_when_it_reads_again(
    tmp_path: Path,
) -> None:
    # The calls finish early in the drain, but the client reads nothing for longer than the exit
    # gives answers to come (FLUSH_SECONDS): their answers are written once it reads again, one
    # per request, and none is taken for work that held the shutdown off.
    async with start_server(tmp_path, server_config()) as server:
        calls = await start_large_calls(server, 3)
        server.stop_reading()
        server.send_signal(signal.SIGTERM)
        await server.wait_stderr("Shutdown finished")
        await anyio.sleep(FLUSH_SECONDS + 1.0)  # the client is busy elsewhere, not a wait for the server
        assert WRITE_SECONDS > FLUSH_SECONDS + 2.0  # what the pause relies on: it reads in time
        server.resume_reading()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    for call in calls:
        answers = server.messages_for(call)
        assert len(answers) == 1, (
            f"request {call} got {len(answers)} answers: {[str(a)[:200] for a in answers]}\n{server.stderr}"
        )
        assert text_of(tool_result(answers[0])) == "x" * LARGE_ANSWER
    assert "3 of 3 session(s) finished, 0 cancelled" in server.stderr, server.stderr
    assert "held the cancellation off" not in server.stderr and "WARNING" not in server.stderr, server.stderr
    assert server.stray_stdout == []


async def test_a_client_that_never_reads_again_does_not_hold_the_exit_past_its_bound(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        await start_large_calls(server, 2)
        server.stop_reading()
        server.send_signal(signal.SIGTERM)
        await server.wait_stderr("Shutdown finished")
        drained = time.monotonic()
        with anyio.fail_after(WRITE_SECONDS + EXIT_MARGIN):
            assert await server.process.wait() == 0
        exit_seconds = time.monotonic() - drained
        server.resume_reading()  # to the end of what the pipe held: a line cut short
        await server.wait_exit(within=EXIT_MARGIN)
    assert exit_seconds < WRITE_SECONDS + 2.0, exit_seconds
    assert (
        f"2 answer(s) were still being written {WRITE_SECONDS}s after the shutdown to a client that had not read "
        "them (it reads its stdout too slowly, or not at all): the server exits without writing them"
    ) in server.stderr, server.stderr
    assert "held the cancellation off" not in server.stderr, server.stderr


async def test_requests_sent_as_the_shutdown_runs_do_not_hold_the_exit_nor_get_a_held_answer(tmp_path: Path) -> None:
    # A client that keeps stdin open and sends requests as SIGTERM comes: the SDK's reader could be
    # left holding one it read, which nobody took any more, and the process never exited; and a
    # request read in the last moment was answered "held its cancellation off", as if its work had.
    ids = range(5000, 5300)
    async with start_server(tmp_path, server_config()) as server:
        await server.initialize()
        server.send_signal(signal.SIGTERM)
        for request_id in ids:
            await server.send({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
        assert await server.wait_exit(within=FLUSH_SECONDS + EXIT_MARGIN) == 0
    answers = {request_id: server.messages_for(request_id) for request_id in ids}
    assert all(len(given) <= 1 for given in answers.values()), answers
    assert all(given[0].get("result") == {} for given in answers.values() if given), answers
    assert "held the cancellation off" not in server.stderr, server.stderr
    assert "still being written" not in server.stderr, server.stderr


async def test_a_trigger_that_comes_during_the_shutdown_says_it_joins_it(tmp_path: Path) -> None:
    config = server_config(shutdown={"timeout_seconds": 60})
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        hanging = await server.start_call("sleep_async", {"seconds": 3600})
        await raw_metrics_until(server, lambda m: m["active_sessions"] == 1)
        shutdown = await server.start_call("server_shutdown", {"timeout_seconds": 3.0})  # time for both to come
        await server.wait_stderr("Graceful shutdown: requested by a server_shutdown call")
        server.send_signal(signal.SIGTERM)
        await server.wait_stderr("received SIGTERM during the shutdown")
        again = await server.start_call("server_shutdown", {})
        await server.wait_stderr("a server_shutdown call during the shutdown: joining it")
        await server.close_stdin()
        await server.wait_stderr("stdin closed during the shutdown")
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
        report = await server.call_result(shutdown, within=0)
        joined = await server.call_result(again, within=0)
        answer = await server.call_result(hanging, within=0)
    assert not report.is_error and code_of(answer) == "shutting_down", (report, answer)
    assert joined.structured_content == report.structured_content  # the same shutdown's report
    lines = [line for line in server.stderr_lines if "shutdown" in line.lower()]
    assert [line for line in lines if "Graceful shutdown:" in line] == [
        next(line for line in lines if "requested by a server_shutdown call" in line)
    ], server.stderr
    assert (
        "received SIGTERM during the shutdown: joining it (a second SIGINT or SIGTERM forces the exit at once, "
        "with status 1)\n" in server.stderr
    ), server.stderr
    assert "stdin closed during the shutdown: joining it\n" in server.stderr, server.stderr
