"""SessionsExtension through the SDK's in-memory Client: every call a session, deadlines,
capacity, metadata, errors, cancellation and graceful shutdown."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import Resolve
from mcp.server.mcpserver.tools.tool_manager import ToolManager
from mcp_types import CallToolResult

from server import ERROR_META_KEY, SessionsExtension, outcomes
from server import extension as extension_module
from server.config import MAX_TIMEOUT_SECONDS, ConfigError, Settings
from server.deadline import Deadline, LateScope
from server.sdk_seams import registry_lookup
from tests.helpers import (
    ON_TIME_MARGIN,
    Gate,
    boom,
    build,
    code_of,
    echo,
    error_of,
    hang_async,
    settings,
    text_of,
    until,
)
from tools.sessions import MANAGEMENT_TOOLS, with_error_code


async def metrics(client: Client) -> dict[str, Any]:
    result = await client.call_tool("session_metrics", {})
    assert not result.is_error
    data: dict[str, Any] = result.structured_content
    created = data["total_sessions_created"]
    finished = sum(
        data[k]
        for k in (
            "active_sessions",
            "total_sessions_completed",
            "total_sessions_error",
            "total_sessions_timeout",
            "total_sessions_cancelled",
        )
    )
    assert created == finished, f"invariant broken: {data}"
    return data


async def test_a_host_tool_call_is_a_completed_session() -> None:
    app, _ = build()
    async with Client(app) as client:
        result = await client.call_tool("echo", {"text": "hi"})
        assert not result.is_error and text_of(result) == "hi"
        m = await metrics(client)
    assert (m["total_sessions_created"], m["total_sessions_completed"], m["active_sessions"]) == (1, 1, 0)
    assert m["tools"]["echo"]["calls"] == 1 and m["tools"]["echo"]["completed"] == 1
    assert m["success_rate"] == 1.0


async def test_a_tool_that_raises_ends_its_session_as_error() -> None:
    app, _ = build()
    async with Client(app) as client:
        result = await client.call_tool("boom", {"message": "kaput"})
        assert result.is_error
        m = await metrics(client)
    assert m["total_sessions_error"] == 1 and m["tools"]["boom"]["errors"] == 1 and m["error_rate"] == 1.0


async def test_a_plain_exception_gives_the_bare_sdk_text_and_a_tool_error_its_message() -> None:
    def plain() -> str:
        raise ValueError("internal detail")

    def told() -> str:
        raise ToolError("what the caller should read")

    app, _ = build(tools=[plain, told])
    async with Client(app) as client:
        bare = await client.call_tool("plain", {})
        explained = await client.call_tool("told", {})
        m = await metrics(client)
    assert bare.is_error and text_of(bare) == "Error executing tool plain", "the README quotes it so"
    assert explained.is_error and text_of(explained) == "Error executing tool told: what the caller should read"
    assert ERROR_META_KEY not in (bare.meta or {}) and ERROR_META_KEY not in (explained.meta or {})
    assert m["total_sessions_error"] == 2


async def test_a_tool_calling_another_in_process_bypasses_the_session_layer_while_a_client_call_is_tracked() -> None:
    inner_cancelled = anyio.Event()

    async def inner(seconds: float = 0.0) -> str:
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            inner_cancelled.set()
            raise
        return "inner"

    async def direct() -> str:
        result = await app.call_tool("inner", {"seconds": 0.0})
        assert isinstance(result, CallToolResult)
        return "direct: " + text_of(result)

    async def direct_hang() -> str:
        await app.call_tool("inner", {"seconds": 3600})
        return "never"

    async def through_a_client() -> str:
        async with Client(app) as client:
            return "client: " + text_of(await client.call_tool("inner", {}))

    config = settings(tool_timeouts={"inner": 0.1, "direct_hang": 0.5})
    app, _ = build(config, tools=[inner, direct, direct_hang, through_a_client])
    async with Client(app) as client:
        with anyio.fail_after(5):
            assert text_of(await client.call_tool("direct", {})) == "direct: inner"
            assert text_of(await client.call_tool("through_a_client", {})) == "client: inner"
            started = time.monotonic()
            hung = await client.call_tool("direct_hang", {})
            took = time.monotonic() - started
            await inner_cancelled.wait()
        m = await metrics(client)
    # The direct calls got no session (nor inner's 0.1 s deadline): only the Client's call of
    # `inner` is one. The outer deadline still cancels the inner call, which runs in its task.
    assert m["tools"]["inner"]["calls"] == 1 and m["tools"]["inner"]["completed"] == 1
    assert code_of(hung) == "timeout" and "0.5s" in text_of(hung) and took >= 0.5
    assert m["total_sessions_created"] == 4  # direct, through_a_client and its inner call, direct_hang


async def test_a_sync_tool_called_in_process_before_any_client_called_it_still_gives_way_to_the_deadline() -> None:
    # The stand-in that makes a sync tool's thread wait cancellable is in place from the start,
    # not from the tool's first client call: else this inner call's wait, shielded by the SDK,
    # would hold its caller until the thread returned, far past the caller's deadline.
    release = threading.Event()

    def blocking() -> str:
        release.wait(timeout=8)  # bounded: a failing test cannot leave it behind for good
        return "released"

    async def outer() -> str:
        await app.call_tool("blocking", {})
        return "never"

    app, sessions = build(settings(tool_timeouts={"outer": 0.3}), tools=[blocking, outer])
    try:
        async with Client(app) as client:
            started = time.monotonic()
            with anyio.fail_after(5):
                result = await client.call_tool("outer", {})
            took = time.monotonic() - started
            assert code_of(result) == "timeout" and took < 2.0, (text_of(result), took)
            assert sessions.manager.metrics().abandoned_threads == 1  # the inner call's, left running
    finally:
        release.set()


class Fatal(BaseException):
    """Not an Exception: the SDK lets it through to the interceptor."""


async def test_a_base_exception_from_a_tool_is_accounted_and_the_server_keeps_serving() -> None:
    async def fatal() -> str:
        raise Fatal("deep trouble")

    def fatal_in_thread() -> str:
        raise Fatal("deep trouble in a thread")

    app, _ = build(tools=[fatal, fatal_in_thread, echo])
    async with Client(app) as client:
        for name in ("fatal", "fatal_in_thread"):
            result = await client.call_tool(name, {})
            assert result.is_error and name in text_of(result)
        assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
        m = await metrics(client)
    assert (m["total_sessions_error"], m["total_sessions_completed"]) == (2, 1)


class Unprintable(BaseException):
    """A BaseException whose text cannot be had: describing it must not fail the call's ending."""

    def __str__(self) -> str:
        raise RuntimeError("str broke")


def _one() -> int:
    return 1


async def test_a_base_exception_that_cannot_be_described_still_ends_its_session_and_frees_its_slot() -> None:
    async def unprintable() -> str:
        raise Unprintable()

    def unprintable_in_thread() -> str:
        raise Unprintable()

    def unprintable_decoupled(n: Annotated[int, Resolve(_one)]) -> str:  # a resolver: run decoupled
        raise Unprintable()

    tools: list[Callable[..., Any]] = [unprintable, unprintable_in_thread, unprintable_decoupled, echo]
    app, _ = build(settings(max_concurrent_sessions=1), tools=tools)
    async with Client(app) as client:
        with anyio.fail_after(10):
            for name in ("unprintable", "unprintable_in_thread", "unprintable_decoupled"):
                result = await client.call_tool(name, {})
                assert result.is_error and text_of(result) == f"Error executing tool {name}", name
            # The only slot is free again: each failed call's session ended.
            assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
        m = await metrics(client)
    assert (m["total_sessions_error"], m["total_sessions_completed"], m["active_sessions"]) == (3, 1, 0)


async def test_an_async_tool_hanging_gets_a_timeout_result_on_time() -> None:
    app, _ = build(settings(tool_timeouts={"hang_async": 0.3}))
    async with Client(app) as client:
        started = time.monotonic()
        with anyio.fail_after(5):
            result = await client.call_tool("hang_async", {"seconds": 3600})
        elapsed = time.monotonic() - started
        error = error_of(result)
        m = await metrics(client)
    assert error["code"] == "timeout" and error["tool"] == "hang_async" and error["session_id"]
    assert "0.3s" in error["message"]
    # An async call is cancelled; "abandoned" is for threads left running (abandoned_threads).
    assert "was cancelled" in error["message"] and "abandoned" not in error["message"]
    assert 0.3 <= elapsed < 0.3 + ON_TIME_MARGIN, elapsed
    assert (m["total_sessions_timeout"], m["total_sessions_error"], m["abandoned_threads"]) == (1, 0, 0)
    assert m["timeout_rate"] == 1.0 and m["tools"]["hang_async"]["timeouts"] == 1


@pytest.mark.parametrize("deadline_scope", [LateScope, anyio.CancelScope], ids=["late", "plain"])
async def test_an_async_tool_waiting_inside_its_own_scopes_times_out_and_its_shield_is_honoured(
    deadline_scope: Callable[[], Deadline], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline's cancel scope is built only when the deadline comes (server.deadline), and
    # then spliced in above whatever scopes the tool is inside: task groups, nested timeouts
    # and a shielded clean-up must see the cancellation exactly as under a plain CancelScope.
    # The same holds on the fallback where anyio's internals differ: a plain scope per call.
    monkeypatch.setattr(extension_module, "deadline_scope", deadline_scope)
    events: list[str] = []

    async def in_task_group() -> str:
        async def child(i: int) -> None:
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                events.append(f"child {i} cancelled")
                raise

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(child, i)
        return "finished"

    async def in_nested_timeouts() -> str:
        with anyio.fail_after(3600), anyio.move_on_after(1800):
            await anyio.sleep(3600)
        return "finished"

    async def shielded_cleanup() -> str:
        try:
            await anyio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.2)  # a clean-up the deadline must not cut short
                events.append("clean-up done")
        return "finished"

    async def swallows_the_cancellation() -> str:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            return "carried on"  # returns normally: still too late, the session has timed out
        return "finished"

    tools: list[Callable[..., Any]] = [
        in_task_group,
        in_nested_timeouts,
        shielded_cleanup,
        swallows_the_cancellation,
        echo,
    ]
    timeouts = {
        name: 0.2 for name in ("in_task_group", "in_nested_timeouts", "shielded_cleanup", "swallows_the_cancellation")
    }
    app, _ = build(settings(tool_timeouts=timeouts), tools=tools)
    async with Client(app) as client:
        for name in timeouts:
            with anyio.fail_after(5):
                error = error_of(await client.call_tool(name, {}))
            assert error["code"] == "timeout" and error["tool"] == name
        assert text_of(await client.call_tool("echo", {"text": "still serving"})) == "still serving"
        m = await metrics(client)
    assert sorted(events) == ["child 0 cancelled", "child 1 cancelled", "clean-up done"]
    assert (m["total_sessions_timeout"], m["total_sessions_completed"], m["active_sessions"]) == (4, 1, 0)


async def test_a_session_tool_given_an_argument_it_does_not_take_is_refused_naming_the_ones_it_takes() -> None:
    # The SDK drops unknown arguments: `timeout` for `timeout_seconds` would silently become the
    # server's default deadline, and a misspelt `token` a refusal for the wrong reason.
    app, _ = build()
    async with Client(app) as client:
        misspelt = await client.call_tool("session_create", {"timeout": 5, "provider": "acme"})
        extra = await client.call_tool("session_metrics", {"verbose": True, "all": 1})
        fine = await client.call_tool("session_create", {"timeout_seconds": 5})
        m = await metrics(client)

    error = error_of(misspelt)
    assert error["code"] == "invalid_argument" and error["tool"] == "session_create"
    assert error["message"] == (
        "unknown argument 'timeout' for session_create: its arguments are provider, model, timeout_seconds, metadata"
    )
    assert error_of(extra)["message"] == "unknown arguments 'verbose', 'all' for session_metrics: it takes no arguments"
    assert error_of(extra)["tool"] == "session_metrics"  # as the README says of every session tool
    assert not fine.is_error and (fine.structured_content or {})["timeout_seconds"] == 5.0
    assert m["total_sessions_created"] == 1  # the refused call made no session


class HeldOff:
    """An async tool whose clean-up, shielded, holds its deadline's cancellation off until the
    test lets it finish: `cancelled` is set when the cancellation has reached the tool."""

    def __init__(self) -> None:
        self.cancelled = anyio.Event()
        self.release = anyio.Event()
        self.finished = 0

    async def held_off(self) -> str:
        try:
            await anyio.sleep(3600)
        finally:
            self.cancelled.set()
            with anyio.CancelScope(shield=True):
                await self.release.wait()  # a clean-up that outlasts the deadline
                self.finished += 1
        return "finished"

    @asynccontextmanager
    async def past_its_deadline(self, client: Client) -> AsyncIterator[list[CallToolResult]]:
        """Call the tool; inside the block the reaper has cancelled it and its clean-up holds
        that off; leaving the block lets the clean-up end, and the list then has the result."""
        results: list[CallToolResult] = []

        async def call() -> None:
            results.append(await client.call_tool("held_off", {}))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await self.cancelled.wait()  # past the deadline: the reaper has cancelled it
                try:
                    yield results
                finally:
                    self.release.set()


@pytest.mark.parametrize("deadline_scope", [LateScope, anyio.CancelScope], ids=["late", "plain"])
async def test_a_call_holding_its_deadline_off_keeps_its_slot_until_its_work_stops(
    deadline_scope: Callable[[], Deadline], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the deadline the call is cancelled, but a shield in the tool holds that off: its work
    # runs on, so it still counts as active and holds its slot (the caps bound real work), and
    # it ends as `timeout` only when the work stops, with a message that says how late.
    monkeypatch.setattr(extension_module, "deadline_scope", deadline_scope)
    monkeypatch.setattr(outcomes, "HELD_OFF_SECONDS", 0.0)  # any delay is reported
    tool = HeldOff()
    config = settings(max_concurrent_sessions=1, tool_timeouts={"held_off": 0.2})
    app, _ = build(config, tools=[tool.held_off, echo])
    async with Client(app) as client:
        async with tool.past_its_deadline(client) as results:
            during = await metrics(client)
            refused = await client.call_tool("echo", {"text": "a second call"})
        after = await metrics(client)

    assert (during["active_sessions"], during["tools"]["held_off"]["active"]) == (1, 1)
    assert during["total_sessions_timeout"] == 0
    assert code_of(refused) == "capacity_exceeded"  # the slot is still taken by work that runs
    error = error_of(results[0])
    assert error["code"] == "timeout" and tool.finished == 1
    assert "did not finish within its deadline of 0.2s and was cancelled" in error["message"]
    assert (
        "after the deadline, as the tool held the cancellation off (or the event loop was held) until then"
        in error["message"]
    )
    assert (after["active_sessions"], after["total_sessions_timeout"]) == (0, 1)


async def test_a_tool_that_turns_its_deadline_s_cancellation_into_an_error_was_cancelled_not_late() -> None:
    async def converts_the_cancellation() -> str:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            raise ToolError("stopped while fetching") from None
        return "never"

    app, _ = build(settings(tool_timeouts={"converts_the_cancellation": 0.2}), tools=[converts_the_cancellation])
    async with Client(app) as client:
        with anyio.fail_after(10):
            result = await client.call_tool("converts_the_cancellation", {})
    error = error_of(result)
    assert error["code"] == "timeout", result
    assert error["message"].startswith(
        "tool 'converts_the_cancellation' did not finish within its deadline of 0.2s and was cancelled;"
    ), error["message"]


def seconds_late(message: str, before: str, after: str) -> float:
    """The lateness a warning gives, as `before` N.Ns `after`: the tests below hold the loop about
    0.4 s past a deadline, which a busy machine's pauses can make later (past 0.9 s)."""
    found = re.match(re.escape(before) + r"(\d+\.\d)s" + re.escape(after), message)
    assert found is not None, message
    return float(found[1])


@pytest.mark.parametrize(
    ("keys", "passed"),
    [({"timeout_seconds": 0.2}, "deadline"), ({"idle_timeout_seconds": 0.2}, "idle timeout")],
    ids=["deadline", "idle-timeout"],
)
async def test_an_async_tool_that_blocks_the_event_loop_past_its_deadline_is_answered_and_warned_about(
    caplog: pytest.LogCaptureFixture, keys: dict[str, float], passed: str
) -> None:
    # Blocking code in an async tool (time.sleep, a sync HTTP client) holds the whole loop: the
    # reaper cannot run at the deadline and no cancellation reaches the tool. The result, when it
    # comes, is still the call's own (the loop may have been held by another call), so it is
    # answered and counted as it is; the operator is warned, with no tool blamed.
    async def blocks_the_loop() -> str:
        time.sleep(0.6)  # noqa: ASYNC251 - the behaviour under test: the loop is held
        return "late"

    # With an idle timeout (no progress for 0.2 s, under the 30 s deadline) it is what passed, and is named.
    app, _ = build(settings(tools={"blocks_the_loop": keys}), tools=[blocks_the_loop, echo])
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            result = await client.call_tool("blocks_the_loop", {})
            m = await metrics(client)
    assert text_of(result) == "late" and not result.is_error
    assert (m["total_sessions_completed"], m["total_sessions_timeout"], m["active_sessions"]) == (1, 0, 0)
    [warning] = [r.getMessage() for r in caplog.records if f"after its {passed}," in r.getMessage()]
    late = seconds_late(warning, "Tool 'blocks_the_loop' returned ", f" after its {passed}")
    assert 0.3 <= late < 0.4 + ON_TIME_MARGIN, warning
    assert warning.endswith(
        "which nothing could enforce: the event loop was held meanwhile (blocking code in an async tool, this one "
        "or another running at the time; give such code to anyio.to_thread.run_sync or make the tool a sync one; "
        "or a large result serialised on the loop, or CPU-bound or GIL-holding work in sync tools' threads; "
        "or the whole process got no CPU time meanwhile (a host short of CPU, a paused container))"
    ), warning


async def test_a_deadline_the_reaper_reaches_late_as_the_event_loop_was_held_is_warned_about_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # While the loop is held (here by an async tool's blocking code; as well by a large result
    # serialised on it, or by sync tools' threads holding the GIL), the reaper cannot run: another
    # call's deadline passes unenforced and its timeout is answered late. The reaper says so when
    # it gets to run, at most once per period; the rest are counted, and told when it stops.
    release = threading.Event()
    began: list[float] = []

    def waits() -> str:
        began.append(time.monotonic())
        release.wait(10)
        return "released"

    async def holds_the_loop() -> str:
        await until(lambda: bool(began))
        # Hold the loop from before the sync call's 0.5 s deadline until 0.4 s past it.
        time.sleep(max(0.0, began[-1] + 0.9 - time.monotonic()))  # noqa: ASYNC251 - the behaviour under test
        return "held"

    config = settings(tool_timeouts={"waits": 0.5})
    app, _ = build(config, tools=[waits, holds_the_loop])
    results: list[CallToolResult] = []

    async def call(name: str) -> None:
        results.append(await client.call_tool(name, {}))

    try:
        with caplog.at_level(logging.WARNING, logger="server.sessions"):
            async with Client(app) as client:
                for _ in range(2):
                    began.clear()
                    with anyio.fail_after(10):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(call, "waits")
                            tg.start_soon(call, "holds_the_loop")
    finally:
        release.set()
    assert sorted(code_of(r) if r.is_error else text_of(r) for r in results) == ["held", "held", "timeout", "timeout"]
    lines = [r.getMessage() for r in caplog.records if r.name == "server.sessions"]
    assert len(lines) == 2, lines
    first, counted = lines
    late = seconds_late(first, "The deadline of tool 'waits' was enforced ", " late: ")
    assert 0.3 <= late < 0.4 + ON_TIME_MARGIN, first
    assert first.endswith(
        "s late: the event loop was held meanwhile, so nothing could stop the call on time: by a large result "
        "serialised on it, by CPU-bound or GIL-holding work in a sync tool's thread (pure-Python loops, regular "
        "expressions, C code that keeps the GIL), or by blocking code in an async tool; or the whole process got "
        "no CPU time meanwhile (a host short of CPU, a paused container)"
    ), first
    # The second, within the period, was counted and told as the reaper stopped.
    late = seconds_late(counted, "1 more deadline(s) were enforced late since the last report, up to ", " late: ")
    assert 0.3 <= late < 0.4 + ON_TIME_MARGIN, counted


async def test_a_sync_generator_tool_iterated_on_the_event_loop_past_its_deadline_is_warned_about_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sync tool that yields returns its generator from the thread at once; the SDK then iterates
    # it on the event loop, where no deadline reaches it. The warning must not send the operator
    # looking for an async tool.
    def yields_slowly() -> Any:  # a generator (an Iterator annotation gives the SDK no output schema)
        for step in range(2):
            time.sleep(0.3)
            yield step

    app, _ = build(settings(tool_timeouts={"yields_slowly": 0.2}), tools=[yields_slowly])
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            with anyio.fail_after(10):
                result = await client.call_tool("yields_slowly", {})
    assert not result.is_error, result
    [warning] = [r.getMessage() for r in caplog.records if "after its deadline" in r.getMessage()]
    late = seconds_late(warning, "Tool 'yields_slowly' returned ", " after its deadline")
    assert 0.3 <= late < 0.4 + ON_TIME_MARGIN, warning
    assert "generator" in warning, warning
    assert "the SDK iterates" in warning and "return a list" in warning, warning
    assert "GIL-holding work in sync tools' threads" in warning, warning


async def test_shutdown_counts_and_waits_for_a_call_holding_its_deadline_off() -> None:
    tool = HeldOff()
    config = settings(tool_timeouts={"held_off": 0.2})
    app, _ = build(config, tools=[tool.held_off])
    async with Client(app) as client, tool.past_its_deadline(client) as results:
        report = await client.call_tool("server_shutdown", {"timeout_seconds": 0.3})

    numbers = report.structured_content or {}
    # Its work was still running: it is one of the sessions the drain waited for, and cancelled.
    assert (numbers["initial_active_sessions"], numbers["sessions_cancelled_at_deadline"]) == (1, 1)
    assert numbers["timeout_reached"] is True
    assert code_of(results[0]) == "shutting_down"


async def test_a_sync_tool_stuck_in_its_thread_times_out_and_is_counted_until_it_ends() -> None:
    gate = Gate()
    app, sessions = build(settings(default_timeout_seconds=0.3), tools=gate.tools())
    async with Client(app) as client:
        with anyio.fail_after(5):
            result = await client.call_tool("block_sync", {})
        assert code_of(result) == "timeout"
        assert "was abandoned: its thread runs on until the tool returns" in text_of(result)
        assert "cancelled" not in text_of(result)
        m = await metrics(client)
        assert (m["abandoned_threads"], m["total_sessions_timeout"], m["total_sessions_error"]) == (1, 1, 0)
        assert m["active_sessions"] == 0  # the slot is free although the thread still runs
        assert gate.threads_running == 1
        gate.open()
        with anyio.fail_after(5):
            await sessions.manager.wait_no_abandoned_threads()
        m = await metrics(client)
    assert m["abandoned_threads"] == 0 and m["total_sessions_timeout"] == 1 and m["total_sessions_completed"] == 0


async def answer_after_shutdown(
    client: Client, tool: str, running: Callable[[], bool], timeout_seconds: float
) -> CallToolResult:
    """Call `tool`; once `running()` holds, shut the server down with `timeout_seconds`; the
    call's answer (all within 10 s)."""
    results: list[CallToolResult] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                results.append(await client.call_tool(tool, {}))

            tg.start_soon(call)
            await until(running)
            await client.call_tool("server_shutdown", {"timeout_seconds": timeout_seconds})
    return results[0]


async def test_a_tool_that_swallows_the_shutdown_s_cancellation_and_returns_is_told_its_result_was_discarded() -> None:
    async def swallows() -> str:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            return "returned anyway"  # a tool should not do this; its result comes too late
        return "slept"

    app, sessions = build(settings(), tools=[swallows])
    async with Client(app) as client:
        result = await answer_after_shutdown(client, "swallows", lambda: sessions.manager.active_count == 1, 0.1)
    error = error_of(result)
    assert error["code"] == "shutting_down", error
    assert error["message"] == (
        "the server shut down before tool 'swallows' finished; its late result was discarded; retry on a running server"
    )


async def test_a_sync_tool_stuck_in_its_thread_at_the_shutdown_deadline_is_told_its_thread_runs_on() -> None:
    # As at its own deadline: the call is answered, but its work was not cancelled (a thread
    # cannot be), so the answer must not say "cancelled".
    gate = Gate()
    app, sessions = build(settings(), tools=gate.tools())
    async with Client(app) as client:
        error = error_of(await answer_after_shutdown(client, "block_sync", lambda: gate.threads_running == 1, 0.2))
        still_running = gate.threads_running
        gate.open()
        with anyio.fail_after(5):
            await sessions.manager.wait_no_abandoned_threads()
    assert error["code"] == "shutting_down", error
    assert error["message"] == (
        "the server shut down before tool 'block_sync' finished; the call was abandoned: its thread runs on"
        " until the tool returns (a thread cannot be stopped); retry on a running server"
    )
    assert still_running == 1


async def test_per_tool_timeout_overrides_the_default() -> None:
    gate = Gate()
    app, _ = build(settings(default_timeout_seconds=30, tool_timeouts={"block_async": 0.2}), tools=gate.tools())
    async with Client(app) as client:
        started = time.monotonic()
        with anyio.fail_after(5):
            error = error_of(await client.call_tool("block_async", {}))
        elapsed = time.monotonic() - started
    assert error["code"] == "timeout" and "0.2s" in error["message"]
    assert 0.2 <= elapsed < 0.2 + ON_TIME_MARGIN, elapsed


async def test_capacity_five_of_twenty_run_and_fifteen_are_refused_while_metrics_still_answer() -> None:
    gate = Gate()
    gate.expected = 5
    app, _ = build(settings(max_concurrent_sessions=5), tools=gate.tools())
    results: list[CallToolResult] = []
    refused = anyio.Event()

    async with Client(app) as client:

        async def call() -> None:
            result = await client.call_tool("block_async", {})
            results.append(result)
            if sum(r.is_error for r in results) == 15:
                refused.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(call)
                await gate.entered_event.wait()
                await refused.wait()
                m = await metrics(client)  # answered while the server is full
                assert m["active_sessions"] == 5
                gate.open()
        m = await metrics(client)
    codes = [code_of(r) for r in results if r.is_error]
    assert codes == ["capacity_exceeded"] * 15
    assert sum(not r.is_error for r in results) == 5
    assert m["peak_concurrent_sessions"] == 5 and m["sessions_rejected_capacity"] == 15
    assert m["total_sessions_created"] == 5 and m["total_sessions_completed"] == 5


async def test_management_tools_are_never_refused_for_capacity() -> None:
    app, _ = build(settings(max_concurrent_sessions=2))
    async with Client(app) as client:
        ids = []
        for _ in range(2):
            created = await client.call_tool("session_create", {})
            ids.append(created.structured_content["session_id"])
        assert code_of(await client.call_tool("session_create", {})) == "capacity_exceeded"
        assert code_of(await client.call_tool("echo", {"text": "x"})) == "capacity_exceeded"
        m = await metrics(client)
        assert m["active_sessions"] == 2  # the management calls themselves hold no slot
        released = await client.call_tool("session_release", {"session_id": ids[0]})
        assert not released.is_error
        assert text_of(await client.call_tool("echo", {"text": "x"})) == "x"


async def test_session_create_and_release_round_trip() -> None:
    app, _ = build(settings(max_timeout_seconds=60, default_timeout_seconds=10))
    async with Client(app) as client:
        created = await client.call_tool(
            "session_create", {"provider": "acme", "model": "m1", "timeout_seconds": 1000, "metadata": {"k": [1, 2]}}
        )
        assert not created.is_error
        data = created.structured_content
        assert set(data) == {"session_id", "request_id", "state", "timeout_seconds", "expires_at"}
        assert data["state"] == "active" and data["timeout_seconds"] == 60  # capped
        m = await metrics(client)
        assert m["active_sessions"] == 1 and m["current_metadata_bytes"] == len('{"k":[1,2]}')
        released = await client.call_tool("session_release", {"session_id": data["session_id"]})
        body = released.structured_content
        assert body["session_id"] == data["session_id"] and body["state"] == "completed"
        assert body["duration_seconds"] >= 0
        again = error_of(await client.call_tool("session_release", {"session_id": data["session_id"]}))
        assert again["code"] == "already_released" and again["session_id"] == data["session_id"]
        unknown = error_of(await client.call_tool("session_release", {"session_id": "never-issued"}))
        assert unknown["code"] == "unknown_session"
        failed = await client.call_tool("session_create", {})
        fid = failed.structured_content["session_id"]
        ended = await client.call_tool("session_release", {"session_id": fid, "outcome": "error", "error": "x"})
        assert ended.structured_content["state"] == "error"
        m = await metrics(client)
    assert (m["total_sessions_completed"], m["total_sessions_error"], m["current_metadata_bytes"]) == (1, 1, 0)


async def test_session_release_refuses_a_running_tool_call_s_session_which_keeps_its_slot() -> None:
    # A tool call's session id is as easy to guess as the next session_create id (one sequence).
    # Released by a client, the call would lose its slot while it runs, and a second call would
    # run past the cap; the caller would read a false "timeout". It ends only with its call.
    gate = Gate()
    app, sessions = build(settings(max_concurrent_sessions=1), tools=[*gate.tools(), echo])
    async with Client(app) as client:
        made = (await client.call_tool("session_create", {})).structured_content["session_id"]
        await client.call_tool("session_release", {"session_id": made})
        prefix, _, seq = made.partition(".")[0].rpartition("-")  # "s<prefix>-<seq>.<signature>"
        guess = f"{prefix}-{int(seq, 16) + 1:x}"
        results: dict[str, CallToolResult] = {}

        async def run() -> None:
            results["call"] = await client.call_tool("block_async", {})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await gate.entered_event.wait()
                assert sessions.manager.get(guess) is not None, "the guess is the running call's id"
                refused = error_of(await client.call_tool("session_release", {"session_id": guess}))
                still_full = await client.call_tool("echo", {"text": "x"})
                m = await metrics(client)
                gate.open()
        after = await metrics(client)
        # Ended, it was still never a client's to release: the same refusal, not "already ended".
        ended = error_of(await client.call_tool("session_release", {"session_id": guess}))
    assert refused["code"] == "invalid_argument" and refused["session_id"] == guess
    # The call may be another client's: the refusal says what the id is, not which tool runs.
    assert "session of a tool call" in refused["message"] and "session_create" in refused["message"]
    assert "block_async" not in refused["message"]
    assert ended == refused
    assert code_of(still_full) == "capacity_exceeded"
    assert m["active_sessions"] == 1
    assert text_of(results["call"]) == "opened"
    assert after["tools"]["block_async"]["completed"] == 1 and after["active_sessions"] == 0


async def test_a_live_session_id_without_its_signature_is_unknown_not_already_released() -> None:
    # The id cut short at its '.' (copied short, say) was never issued: the session it names
    # part of is still active, so "already ended" would be false.
    app, _ = build()
    async with Client(app) as client:
        made = (await client.call_tool("session_create", {})).structured_content["session_id"]
        base = made.partition(".")[0]
        short = error_of(await client.call_tool("session_release", {"session_id": base}))
        m = await metrics(client)
        released = await client.call_tool("session_release", {"session_id": made})
        short_after = error_of(await client.call_tool("session_release", {"session_id": base}))
    assert (short["code"], short["session_id"]) == ("unknown_session", base)
    assert "signature" in short["message"] and "pass the whole session_id" in short["message"]
    assert m["active_sessions"] == 1, "the session the short id names part of is untouched"
    assert not released.is_error, released
    assert short_after["code"] == "unknown_session"


async def test_metadata_with_an_integer_too_large_to_store_is_refused_in_words_for_the_client() -> None:
    app, _ = build()
    async with Client(app) as client:
        refused = error_of(await client.call_tool("session_create", {"metadata": {"x": 10**5000}}))
        m = await metrics(client)
    assert (refused["code"], refused["tool"]) == ("invalid_argument", "session_create")
    assert refused["message"] == (
        f"metadata holds an integer of more than {sys.get_int_max_str_digits()} digits, "
        "too large to store: send it as a string"
    )
    assert (m["total_sessions_created"], m["current_metadata_bytes"]) == (0, 0)


async def test_session_metadata_at_the_limit_is_accepted_and_one_byte_over_refused() -> None:
    limit = 100
    app, _ = build(settings(max_metadata_bytes=limit))
    base = len('{"v":""}')
    async with Client(app) as client:
        ok = await client.call_tool("session_create", {"metadata": {"v": "a" * (limit - base)}})
        assert not ok.is_error
        m = await metrics(client)
        assert m["current_metadata_bytes"] == limit
        over = error_of(await client.call_tool("session_create", {"metadata": {"v": "a" * (limit - base + 1)}}))
        assert over["code"] == "metadata_too_large" and str(limit) in over["message"]
        await client.call_tool("session_release", {"session_id": ok.structured_content["session_id"]})
        m = await metrics(client)
    assert m["current_metadata_bytes"] == 0 and m["sessions_rejected_metadata_size"] == 1


@pytest.mark.parametrize(
    ("tool", "arguments", "sentence"),
    [
        ("session_create", {"provider": 5}, "provider: input should be a valid string (got 5)"),
        ("session_create", {"metadata": [1, 2]}, "metadata: input should be a valid dictionary (got [1, 2])"),
        ("session_release", {}, "session_id: field required"),
        (
            "session_release",
            {"session_id": "s-1", "outcome": "done"},
            "outcome: input should be 'completed' or 'error' (got \"done\")",
        ),
        (
            "server_shutdown",
            {"timeout_seconds": "30", "token": 7},
            'timeout_seconds: input should be a valid number (got "30"); '
            "token: input should be a valid string (its value is not shown)",
        ),
    ],
)
async def test_session_tool_arguments_the_sdk_refuses_are_one_sentence_naming_each_argument(
    tool: str, arguments: dict[str, Any], sentence: str
) -> None:
    # pydantic's report is several lines with a URL ("1 validation error for session_createArguments
    # ..."): a client (a model) gets one sentence per problem instead, as for the tools' own refusals.
    app, _ = build()
    async with Client(app) as client:
        refused = await client.call_tool(tool, arguments)
    error = error_of(refused)
    assert (error["code"], error["tool"]) == ("invalid_argument", tool)
    assert text_of(refused) == error["message"] == f"invalid arguments for {tool}: {sentence}"


@pytest.mark.parametrize("token", [987654321, 987654321.0, ["987654321"], {"token": "987654321"}])
async def test_an_admin_token_of_the_wrong_type_is_never_quoted_in_the_refusal_or_the_log(
    token: object, caplog: pytest.LogCaptureFixture
) -> None:
    # The right token in the wrong type (a CLI that turns digits into a number, say) is refused;
    # the refusal is logged, and the log must not hand the token to whoever reads it.
    app, _ = build()
    with caplog.at_level(logging.DEBUG):
        async with Client(app) as client:
            refused = await client.call_tool("server_shutdown", {"token": token})
    error = error_of(refused)
    assert error["code"] == "invalid_argument" and "token: input should be a valid string" in error["message"]
    assert "987654321" not in text_of(refused)
    assert caplog.records, "the refusal is logged"
    assert all("987654321" not in record.getMessage() for record in caplog.records)


async def test_without_a_registry_entry_a_refused_token_is_not_quoted_from_pydantics_report() -> None:
    # Where no registry entry can be asked (a host's own tool manager), the SDK's report is all
    # there is, and pydantic quotes each refused value in it (`input_value=...`).
    def server_shutdown(token: str | None = None) -> str:
        return "unreachable"

    bare = MCPServer("bare")
    bare.add_tool(server_shutdown)
    async with Client(bare) as client:
        sdk_report = await client.call_tool("server_shutdown", {"token": 987654321})
    assert "987654321" in text_of(sdk_report), "the SDK's own report quotes the value"
    result = with_error_code(sdk_report, "server_shutdown", None, {"token": 987654321})
    assert isinstance(result, CallToolResult)
    error = error_of(result)
    assert error["code"] == "invalid_argument" and "987654321" not in text_of(result)
    assert "invalid arguments for server_shutdown" in error["message"]


async def test_session_create_at_the_largest_timeout_cap_answers_its_expiry_date() -> None:
    app, _ = build(Settings.model_validate({"limits": {"max_timeout_seconds": MAX_TIMEOUT_SECONDS}}))
    async with Client(app) as client:
        made = await client.call_tool("session_create", {"timeout_seconds": 1e300})  # capped to 1e9 s
        assert not made.is_error, made
        data = made.structured_content or {}
        assert data["timeout_seconds"] == MAX_TIMEOUT_SECONDS
        assert datetime.fromisoformat(data["expires_at"]).year >= datetime.now(UTC).year + 31
        await client.call_tool("session_release", {"session_id": data["session_id"]})
        assert (await metrics(client))["active_sessions"] == 0


async def test_the_session_tools_advertise_hints_a_client_can_base_its_approval_on() -> None:
    # The spec's defaults (open world, destructive, not idempotent) would describe them wrongly.
    app, _ = build()
    async with Client(app) as client:
        hints = {
            tool.name: tool.annotations.model_dump(exclude_none=True, exclude={"title"})
            for tool in (await client.list_tools()).tools
            if tool.name in MANAGEMENT_TOOLS and tool.annotations is not None
        }
    assert hints == {
        "session_create": {"destructive_hint": False, "idempotent_hint": False, "open_world_hint": False},
        "session_release": {"destructive_hint": False, "idempotent_hint": True, "open_world_hint": False},
        "session_metrics": {"read_only_hint": True, "open_world_hint": False},
        "server_shutdown": {"destructive_hint": True, "idempotent_hint": True, "open_world_hint": False},
    }


async def test_session_create_advertises_empty_metadata_by_default_and_takes_null_as_empty() -> None:
    app, _ = build(settings(max_metadata_bytes=0))  # only empty metadata fits
    async with Client(app) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert tools["session_create"].input_schema["properties"]["metadata"]["default"] == {}  # as in DESIGN
        forms: list[dict[str, Any]] = [{}, {"metadata": {}}, {"metadata": None}]  # omitted, empty, null
        made = [await client.call_tool("session_create", arguments) for arguments in forms]
        assert [result.is_error for result in made] == [False, False, False], made
        m = await metrics(client)
        for result in made:
            await client.call_tool("session_release", {"session_id": result.structured_content["session_id"]})
    assert (m["active_sessions"], m["current_metadata_bytes"]) == (3, 0)


async def test_provider_and_model_are_bounded_even_where_metadata_is_refused() -> None:
    # max_metadata_bytes = 0 refuses metadata; provider and model are not metadata, but they are
    # kept with the session all the same, so they have a bound of their own (256 characters).
    app, sessions = build(settings(max_metadata_bytes=0))
    async with Client(app) as client:
        at_bound = await client.call_tool("session_create", {"provider": "p" * 256, "model": "é" * 256})
        assert not at_bound.is_error, at_bound
        refused = {
            field: error_of(await client.call_tool("session_create", {field: "x" * size}))
            for field, size in (("provider", 2_000_000), ("model", 257))
        }
        m = await metrics(client)
        held = [(s.provider, s.model) for s in sessions.manager._active.values()]
    for field, error in refused.items():
        assert error["code"] == "invalid_argument" and error["tool"] == "session_create", error
        assert field in error["message"] and "256" in error["message"], error
        assert len(error["message"]) < 1000, "the refusal does not echo the value"
    assert (m["total_sessions_created"], m["active_sessions"], m["current_metadata_bytes"]) == (1, 1, 0)
    assert held == [("p" * 256, "é" * 256)], "nothing of the refused calls is kept"


async def test_an_unknown_session_id_of_any_length_is_quoted_short_in_the_refusal_and_its_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.refusals")
    app, _ = build()
    huge = "x" * 100_000
    async with Client(app) as client:
        error = error_of(await client.call_tool("session_release", {"session_id": huge}))
    assert error["code"] == "unknown_session"
    assert "x" * 80 + "…" in error["message"] and len(error["message"]) < 300, len(error["message"])
    assert error["session_id"] == "x" * 80 + "…"
    (line,) = [r for r in caplog.records if r.name == "server.refusals"]
    assert len(line.getMessage()) < 400 and len(str(getattr(line, "session_id", ""))) <= 81


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("session_create", {"timeout_seconds": "soon"}),
        ("session_create", {"timeout_seconds": -1}),
        ("session_create", {"timeout_seconds": 0}),
        ("session_create", {"metadata": "not an object"}),
        ("session_release", {}),
        ("session_release", {"session_id": 42}),
        ("session_release", {"session_id": "x", "outcome": "maybe"}),
        ("server_shutdown", {"timeout_seconds": -5}),
    ],
)
async def test_bad_arguments_to_session_tools_are_invalid_argument(tool: str, arguments: dict[str, Any]) -> None:
    app, _ = build()
    async with Client(app) as client:
        error = error_of(await client.call_tool(tool, arguments))
        m = await metrics(client)
    assert error["code"] == "invalid_argument" and error["message"]
    assert m["total_sessions_created"] == 0 and not m["shutdown_requested"]


def test_an_extension_built_with_no_settings_words_a_mistyped_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With no settings it reads the environment as load_settings does: a typo is a ConfigError
    # naming the variable and the likely key, not pydantic's multi-line ValidationError.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURENT_SESSIONS", "5")
    with pytest.raises(ConfigError) as refused:
        SessionsExtension()
    assert refused.value.problems == [
        "environment variable MCP_SESSIONS_LIMITS__MAX_CONCURENT_SESSIONS: limits.max_concurent_sessions: "
        "unknown key; did you mean 'max_concurrent_sessions'?"
    ]
    monkeypatch.delenv("MCP_SESSIONS_LIMITS__MAX_CONCURENT_SESSIONS")
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS", "5")
    assert SessionsExtension().manager.limits.max_concurrent_sessions == 5


def test_the_lifespan_outside_an_asyncio_loop_says_it_needs_the_asyncio_backend() -> None:
    # On trio (or any loop that is not asyncio's) the lifespan would fail deep inside with "no
    # running event loop". Its first step, driven here by hand with no loop at all, says why.
    app, sessions = build()
    enter = sessions.lifespan(app).__aenter__()
    with pytest.raises(RuntimeError, match=r"needs anyio's asyncio backend .* backend='asyncio'"):
        enter.send(None)
    enter.close()


async def test_an_exit_listener_that_raises_does_not_keep_the_next_ones_from_being_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The last listener is often the one that stops the process: a failing metrics flush before it
    # must not leave the server draining and refusing everything, with later calls told "done".
    app, sessions = build()
    called: list[str] = []

    def flush(report: object) -> None:
        called.append("flush")
        raise OSError("metrics sink down")

    sessions.add_exit_listener(flush)
    sessions.add_exit_listener(lambda report: called.append("stop"))
    async with Client(app) as client:
        first = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
        second = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
    assert called == ["flush", "stop"]  # each once, in order
    assert code_of(first) == "internal_error"  # the caller hears that a listener failed
    assert not second.is_error  # a later call joins the shutdown that ran: its report
    [failure] = [r for r in caplog.records if r.getMessage().startswith("Exit listener")]
    assert failure.levelno == logging.ERROR and failure.exc_info is not None


def test_an_async_exit_listener_is_refused_when_added_since_it_would_never_run() -> None:
    _, sessions = build()

    async def on_exit(report: object) -> None:
        pass

    with pytest.raises(TypeError, match="exit listeners are called synchronously"):
        sessions.add_exit_listener(on_exit)  # type: ignore[arg-type]  # what the check is for


async def test_a_session_tool_failing_inside_is_an_internal_error_not_invalid_argument(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A host's exit listener that raises makes `server_shutdown` fail inside, with valid
    # arguments: the SDK answers with its generic crash result, which carries no code.
    app, sessions = build()

    def broken_listener(report: object) -> None:
        raise RuntimeError("the host's exit listener broke")

    sessions.add_exit_listener(broken_listener)
    caplog.set_level(logging.INFO)
    async with Client(app) as client:
        result = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
        error = error_of(result)
        bad = error_of(await client.call_tool("server_shutdown", {"timeout_seconds": "soon"}))
    assert (error["code"], error["tool"]) == ("internal_error", "server_shutdown")
    assert "not a problem with the arguments" in error["message"]
    assert "listener broke" not in error["message"]  # the exception's text stays on the server
    assert bad["code"] == "invalid_argument"  # the SDK's argument validation keeps its code
    ours = [r for r in caplog.records if getattr(r, "code", None) == "internal_error"]
    # The logger README's Logs section names.
    assert [(r.name, r.levelno, r.tool) for r in ours] == [("tools.sessions", logging.ERROR, "server_shutdown")]  # type: ignore[attr-defined]
    refusals = [r for r in caplog.records if r.name == "server.refusals"]
    assert [r.code for r in refusals] == ["invalid_argument"]  # type: ignore[attr-defined]


async def test_a_session_tool_the_host_removed_is_answered_as_an_unknown_tool_with_no_code() -> None:
    app, _ = build()
    app.remove_tool("session_metrics")
    async with Client(app) as client:
        result = await client.call_tool("session_metrics", {})
    assert result.is_error and "Unknown tool" in text_of(result)
    assert ERROR_META_KEY not in (result.meta or {})  # as for any name the server does not have


async def test_a_host_tool_registered_under_a_removed_session_tools_name_is_a_hosted_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The README's advice: remove `server_shutdown` to keep it from clients. A tool of the
    # host's own under that name is then the host's: it runs as a session with its deadline,
    # and its arguments are its own (not policed as the session tool's).
    app, sessions = build(settings(tools={"server_shutdown": {"timeout_seconds": 0.3}}))
    app.remove_tool("server_shutdown")

    async def server_shutdown(reason: str, extra: str = "") -> str:
        await anyio.sleep(3600)
        return f"shut down: {reason}"

    app.add_tool(server_shutdown)
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            with anyio.fail_after(5):
                result = await client.call_tool("server_shutdown", {"reason": "maintenance", "extra": "x"})
            m = await metrics(client)
    assert "[tools.server_shutdown]" not in caplog.text, "its table applies to the host's tool: no warning"
    assert code_of(result) == "timeout" and "0.3s" in text_of(result), text_of(result)
    assert not sessions.manager.shutting_down
    assert (m["total_sessions_created"], m["total_sessions_timeout"]) == (1, 1)
    assert m["tools"]["server_shutdown"]["timeouts"] == 1


async def test_a_removed_session_tools_table_is_kept_for_a_host_tool_added_later_and_not_called_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Removed before the lifespan starts and added while it runs: the table is not "ignored" (as
    # a session tool's is), it waits for the host's tool of that name, and then applies to it.
    app, _ = build(settings(tools={"server_shutdown": {"timeout_seconds": 0.3}}))
    app.remove_tool("server_shutdown")

    async def server_shutdown(reason: str) -> str:
        await anyio.sleep(3600)
        return f"shut down: {reason}"

    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            app.add_tool(server_shutdown)
            with anyio.fail_after(5):
                result = await client.call_tool("server_shutdown", {"reason": "maintenance"})
    warned = [r.getMessage() for r in caplog.records if r.name == "server.extension"]
    assert warned == [
        "[tools.server_shutdown] names no tool of this server (its tools: boom, echo, hang_async): its settings"
        " apply only to a tool of that name added later"
    ]
    assert code_of(result) == "timeout" and "0.3s" in text_of(result), text_of(result)


async def test_a_session_create_session_expires_by_itself_and_frees_its_slot() -> None:
    app, sessions = build(settings(max_concurrent_sessions=1))
    async with Client(app) as client:
        created = await client.call_tool("session_create", {"timeout_seconds": 0.1})
        session = sessions.manager.get(created.structured_content["session_id"])
        assert session is not None
        with anyio.fail_after(5):
            await sessions.manager.wait_ended(session)
        m = await metrics(client)
        assert (m["total_sessions_timeout"], m["active_sessions"]) == (1, 0)
        assert text_of(await client.call_tool("echo", {"text": "slot free"})) == "slot free"
        late = error_of(
            await client.call_tool("session_release", {"session_id": created.structured_content["session_id"]})
        )
    assert late["code"] == "already_released" and "timeout" in late["message"]


async def test_a_session_cancelled_at_a_shutdown_deadline_is_already_released_as_its_tool_description_says() -> None:
    app, _ = build()
    async with Client(app) as client:
        created = await client.call_tool("session_create", {})
        report = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
        late = error_of(
            await client.call_tool("session_release", {"session_id": created.structured_content["session_id"]})
        )
        [release] = [tool for tool in (await client.list_tools()).tools if tool.name == "session_release"]
    assert (report.structured_content or {})["sessions_cancelled_at_deadline"] == 1
    assert late["code"] == "already_released" and "has already ended (cancelled)" in late["message"]
    assert "cancelled" in (release.description or "")


async def test_a_call_the_client_cancels_ends_as_cancelled() -> None:
    gate = Gate()
    app, sessions = build(tools=gate.tools())
    async with Client(app) as client:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def call_then_give_up() -> None:
                    with anyio.CancelScope() as scope:
                        cancel_scopes.append(scope)
                        await client.call_tool("block_async", {})

                cancel_scopes: list[anyio.CancelScope] = []
                tg.start_soon(call_then_give_up)
                await gate.entered_event.wait()
                cancel_scopes[0].cancel()
            await sessions.manager.wait_idle()
        m = await metrics(client)
    assert (m["total_sessions_cancelled"], m["active_sessions"], m["total_sessions_error"]) == (1, 0, 0)


async def test_unknown_tools_get_the_sdk_error_and_create_no_session() -> None:
    app, _ = build()
    async with Client(app) as client:
        result = await client.call_tool("no_such_tool", {})
        assert result.is_error
        m = await metrics(client)
    assert m["total_sessions_created"] == 0 and m["tools"] == {}


async def test_tools_added_removed_and_replaced_while_running_are_seen_at_once() -> None:
    app, sessions = build()
    async with Client(app) as client:
        assert text_of(await client.call_tool("echo", {"text": "a"})) == "a"
        app.remove_tool("echo")
        assert (await client.call_tool("echo", {"text": "b"})).is_error  # the SDK's unknown tool
        assert sessions.manager.metrics().total_sessions_created == 1

        async def shout(text: str) -> str:
            return text.upper()

        app.add_tool(shout, name="echo")  # another function (async now) under the same name
        assert text_of(await client.call_tool("echo", {"text": "c"})) == "C"
        m = await metrics(client)
    assert m["tools"]["echo"]["calls"] == m["tools"]["echo"]["completed"] == 2


def test_the_registry_lookup_asks_a_host_s_own_get_tool() -> None:
    app, _ = build()
    lookup = registry_lookup(app)
    assert lookup is not None and lookup("echo") is app._tool_manager.get_tool("echo") and lookup("nope") is None

    class Aliasing(ToolManager):
        def get_tool(self, name: str) -> Any:
            return super().get_tool("echo" if name == "say" else name)

    app._tool_manager.__class__ = Aliasing  # a host's own tool manager
    lookup = registry_lookup(app)
    assert lookup is not None and lookup("say") is app._tool_manager.get_tool("echo") is not None
    assert registry_lookup(object()) is None


async def test_without_the_lifespan_calls_are_refused_with_not_running() -> None:
    sessions = SessionsExtension(settings())
    app: MCPServer[Any] = MCPServer("no-lifespan", extensions=[sessions])
    app.add_tool(echo)
    async with Client(app) as client:
        error = error_of(await client.call_tool("echo", {"text": "x"}))
        # With no registry to ask (the lifespan hands it over), an unknown name is refused too.
        unknown = error_of(await client.call_tool("no_such_tool", {}))
    assert error["code"] == "not_running" and "lifespan=sessions.lifespan" in error["message"]
    assert (unknown["code"], unknown["tool"]) == ("not_running", "no_such_tool")


async def test_lifespan_composes_with_a_host_lifespan() -> None:
    from contextlib import asynccontextmanager

    sessions = SessionsExtension(settings())
    entered: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        entered.append("host")
        async with sessions.lifespan(app) as state:
            yield {"db": "connected", **state}

    app: MCPServer[Any] = MCPServer("composed", extensions=[sessions], lifespan=host_lifespan)
    app.add_tool(echo)
    async with Client(app) as client:
        assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
    assert entered == ["host"] and sessions.manager.metrics().total_sessions_completed == 1


async def test_server_shutdown_drains_cancels_and_refuses_new_work() -> None:
    gate = Gate()
    gate.expected = 2
    app, sessions = build(settings(), tools=[*gate.tools(), hang_async, echo])
    exits: list[Any] = []
    sessions.add_exit_listener(exits.append)
    async with Client(app) as client:
        finishing: list[CallToolResult] = []
        hanging: list[CallToolResult] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def run(name: str, sink: list[CallToolResult], args: dict[str, Any]) -> None:
                    sink.append(await client.call_tool(name, args))

                tg.start_soon(run, "block_async", finishing, {})
                tg.start_soon(run, "block_async", finishing, {})
                await gate.entered_event.wait()
                tg.start_soon(run, "hang_async", hanging, {"seconds": 3600})
                created = await client.call_tool("session_create", {})
                assert not created.is_error

                async def open_gate_when_shutting_down() -> None:
                    await sessions.manager.wait_shutting_down()
                    refused = await client.call_tool("echo", {"text": "late"})
                    assert code_of(refused) == "shutting_down"
                    gate.open()

                tg.start_soon(open_gate_when_shutting_down)
                result = await client.call_tool("server_shutdown", {"timeout_seconds": 0.5})
        report = result.structured_content
        m = await metrics(client)
    assert not result.is_error
    assert report["initial_active_sessions"] == 4
    assert report["sessions_completed_during_shutdown"] == 2
    assert report["sessions_cancelled_at_deadline"] == 2
    assert report["final_active_sessions"] == 0 and report["timeout_reached"] is True
    assert report["total_sessions_at_shutdown"] == 4
    assert [r.is_error for r in finishing] == [False, False]
    assert code_of(hanging[0]) == "shutting_down"
    assert len(exits) == 1
    assert m["shutdown_requested"] and m["sessions_rejected_shutdown"] == 1
    assert (m["total_sessions_completed"], m["total_sessions_cancelled"]) == (2, 2)


async def test_a_call_its_client_cancels_during_the_drain_is_reported_cancelled_not_finished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = Gate()
    app, sessions = build(settings(), tools=[*gate.tools(), hang_async])
    async with Client(app) as client:
        with anyio.fail_after(10), caplog.at_level(logging.INFO, logger="server.extension"):
            async with anyio.create_task_group() as tg:
                finished: list[CallToolResult] = []

                async def finishing() -> None:
                    finished.append(await client.call_tool("block_async", {}))

                async def given_up(scope: anyio.CancelScope) -> None:
                    with scope:
                        await client.call_tool("hang_async", {"seconds": 3600})

                tg.start_soon(finishing)
                await gate.entered_event.wait()
                scope = anyio.CancelScope()
                tg.start_soon(given_up, scope)
                await until(lambda: sessions.manager.metrics().active_sessions == 2)
                tg.start_soon(sessions.shutdown, 5.0)
                await sessions.manager.wait_shutting_down()
                scope.cancel()  # its client gives up on the call while the drain runs
                await until(lambda: sessions.manager.metrics().active_sessions == 1)
                gate.open()
                report = await sessions.shutdown(5.0)  # joins: the same report
    assert not finished[0].is_error
    assert (report.initial_active_sessions, report.sessions_completed_during_shutdown) == (2, 1)
    assert (report.sessions_cancelled_during_shutdown, report.sessions_cancelled_at_deadline) == (1, 0)
    assert report.timeout_reached is False and report.final_active_sessions == 0
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Shutdown finished")]
    assert len(summary) == 1 and summary[0].endswith(
        ": 1 of 2 session(s) finished, 1 cancelled during the drain (by their clients), 0 cancelled at the deadline"
    ), summary


async def test_a_server_shutdown_call_the_client_cancels_still_drains_cancels_and_notifies_its_listeners() -> None:
    # A client whose timeout is shorter than the drain cancels its own `server_shutdown`. The
    # shutdown, once begun, must still run to its end: the work left at the deadline cancelled,
    # the exit listeners told (the standalone server exits on them), and any later shutdown
    # answered with that report, not left waiting for one that never comes.
    app, sessions = build(settings(), tools=[hang_async])
    exits: list[Any] = []
    sessions.add_exit_listener(exits.append)
    async with Client(app) as client:
        hanging: list[CallToolResult] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def hang() -> None:
                    hanging.append(await client.call_tool("hang_async", {"seconds": 3600}))

                async def impatient_shutdown(scope: anyio.CancelScope) -> None:
                    with scope:
                        await client.call_tool("server_shutdown", {"timeout_seconds": 0.5})

                tg.start_soon(hang)
                await until(lambda: sessions.manager.metrics().active_sessions == 1)
                scope = anyio.CancelScope()
                tg.start_soon(impatient_shutdown, scope)
                await sessions.manager.wait_shutting_down()
                scope.cancel()  # the client gives up on its call while the drain runs
                await until(lambda: bool(exits))
            again = await sessions.shutdown(0)
        m = await metrics(client)
    assert code_of(hanging[0]) == "shutting_down"
    assert len(exits) == 1 and again is exits[0]
    assert exits[0].sessions_cancelled_at_deadline == 1 and exits[0].final_active_sessions == 0
    assert m["active_sessions"] == 0 and m["total_sessions_cancelled"] == 1


async def test_server_shutdown_with_nothing_running_returns_at_once() -> None:
    app, _ = build(settings(shutdown_timeout_seconds=60))  # a drain that waited would outlast the bound
    async with Client(app) as client:
        with anyio.fail_after(5):
            result = await client.call_tool("server_shutdown", {})
    report = result.structured_content
    assert report["initial_active_sessions"] == 0 and report["timeout_reached"] is False
    assert report["shutdown_duration"] < 1.0, report


async def test_a_shutdown_notifies_its_exit_listeners_and_logs_its_summary_once_however_many_calls_join(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Counted(SessionsExtension):
        """Counts the calls that have entered `shutdown`, so the test knows the second has joined."""

        entered = 0

        async def shutdown(self, timeout_seconds: float | None = None) -> Any:
            self.entered += 1
            return await super().shutdown(timeout_seconds)

    gate = Gate()
    sessions = Counted(settings())
    app: MCPServer[Any] = MCPServer("joined", extensions=[sessions], lifespan=sessions.lifespan)
    for fn in gate.tools():
        app.add_tool(fn)
    exits: list[Any] = []
    sessions.add_exit_listener(exits.append)
    caplog.set_level(logging.INFO, logger="server.extension")
    results: list[CallToolResult] = []

    async def shut_down() -> None:
        results.append(await client.call_tool("server_shutdown", {"timeout_seconds": 5}))

    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "block_async", {})
                await gate.entered_event.wait()
                tg.start_soon(shut_down)
                await sessions.manager.wait_shutting_down()
                tg.start_soon(shut_down)  # joins the running shutdown
                await until(lambda: sessions.entered == 2)
                gate.open()
            await shut_down()  # after it finished
    reports = [r.structured_content for r in results]
    assert len(reports) == 3 and reports[0] == reports[1] == reports[2], reports
    assert len(exits) == 1 and exits[0].model_dump() == reports[0]
    summaries = [r for r in caplog.records if r.getMessage().startswith("Shutdown finished")]
    assert len(summaries) == 1


async def test_mixed_workload_keeps_the_invariant() -> None:
    gate = Gate()
    app, sessions = build(
        settings(
            max_concurrent_sessions=8, max_metadata_bytes=1000, tool_timeouts={"hang_async": 0.2, "block_sync": 0.2}
        ),
        tools=[echo, boom, hang_async, *gate.tools()],
    )
    async with Client(app) as client:
        with anyio.fail_after(15):
            for _ in range(5):
                assert not (await client.call_tool("echo", {"text": "a"})).is_error
            for _ in range(3):
                assert (await client.call_tool("boom", {})).is_error
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(client.call_tool, "hang_async", {"seconds": 3600})
                tg.start_soon(client.call_tool, "block_sync", {})  # stays stuck in its thread
            for _ in range(2):
                big = await client.call_tool("session_create", {"metadata": {"big": "x" * 2000}})
                assert code_of(big) == "metadata_too_large"
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def cancelled_call() -> None:
                    with scope:
                        await client.call_tool("block_async", {})

                tg.start_soon(cancelled_call)
                await gate.entered_event.wait()
                scope.cancel()
            await sessions.manager.wait_idle()
            ids = [(await client.call_tool("session_create", {})).structured_content["session_id"] for _ in range(8)]
            for _ in range(3):
                assert code_of(await client.call_tool("echo", {"text": "full"})) == "capacity_exceeded"
            for session_id in ids:
                assert not (await client.call_tool("session_release", {"session_id": session_id})).is_error
            gate.open()
            await sessions.manager.wait_no_abandoned_threads()
        m = await metrics(client)
    assert m["total_sessions_created"] == 5 + 3 + 2 + 1 + 1 + 8
    assert (m["total_sessions_completed"], m["total_sessions_error"]) == (13, 3)
    assert (m["total_sessions_timeout"], m["total_sessions_cancelled"]) == (3, 1)
    assert (m["sessions_rejected_capacity"], m["sessions_rejected_metadata_size"]) == (3, 2)
    assert m["active_sessions"] == 0 and m["abandoned_threads"] == 0


async def test_without_the_lifespan_session_create_is_refused_but_metrics_answer() -> None:
    sessions = SessionsExtension(settings())
    app: MCPServer[Any] = MCPServer("no-lifespan", extensions=[sessions])
    async with Client(app) as client:
        assert code_of(await client.call_tool("session_create", {})) == "not_running"
        assert not (await client.call_tool("session_metrics", {})).is_error


async def test_a_tool_table_naming_no_tool_of_the_host_is_warned_about_at_start_and_on_apply_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The standalone server refuses such a table; a host may add tools later, so here it is a
    # warning, naming the tools there are and the likely one meant.
    caplog.set_level(logging.WARNING, logger="server.extension")
    config = settings(tool_timeouts={"ecko": 1.0, "echo": 2.0, "session_metrics": 1.0})
    app, sessions = build(config)
    async with Client(app):
        warnings = [r.getMessage() for r in caplog.records if r.name == "server.extension"]
    caplog.clear()
    async with Client(app) as client:  # the lifespan starts again: said once is enough
        assert not [r for r in caplog.records if r.name == "server.extension"]
        sessions.apply_settings(settings(tool_timeouts={"ecko": 1.0, "echo": 3.0}))  # a reload keeping the typo
        assert not [r for r in caplog.records if r.name == "server.extension"], "said once is enough"
        sessions.apply_settings(settings(tool_timeouts={"hang_asnyc": 1.0}))
        reloaded = [r.getMessage() for r in caplog.records if r.name == "server.extension"]
        assert text_of(await client.call_tool("echo", {"text": "still served"})) == "still served"
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("[tools.ecko] names no tool of this server (its tools: boom, echo, hang_async):")
    assert warnings[0].endswith("its settings apply only to a tool of that name added later; did you mean 'echo'?")
    assert warnings[1] == (
        "[tools.session_metrics] is ignored: per-tool settings do not apply to the session tools: no per-tool"
        " deadline, cap or idle timeout holds them (they answer even when the server is full); remove it"
    )
    assert reloaded == [
        "[tools.hang_asnyc] names no tool of this server (its tools: boom, echo, hang_async): its settings apply"
        " only to a tool of that name added later; did you mean 'hang_async'?"
    ]


async def test_an_embedding_host_is_told_its_prometheus_port_is_not_served_and_the_standalone_server_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `metrics.prometheus_port` is served by the standalone server; in a host nothing serves it,
    # and a host sharing the standalone server's config file would wait for metrics that never come.
    from server import load_settings
    from server.app import build_app

    settings = load_settings(None, {"metrics": {"prometheus_port": 9109}})
    app, _ = build(settings, tools=[echo])
    standalone = build_app(settings)
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        for _ in range(2):  # once per extension, however many lifespans
            async with Client(app) as client:
                await client.call_tool("echo", {"text": "x"})
        async with Client(standalone.server) as client:
            await client.call_tool("session_metrics", {})
    warned = [r.getMessage() for r in caplog.records if "prometheus_port" in r.getMessage()]
    assert warned == [
        "metrics.prometheus_port = 9109 is not served here: the standalone server serves it, and an embedding "
        "host serves its own metrics (server.prometheus.build_registry(sessions.manager) is a prometheus_client "
        "registry of them)"
    ], warned
