"""Admission beyond one global cap, through the SDK's in-memory Client: the FIFO queue
(order, timeout, overflow, cancel, shutdown), per-tool caps, per-client fair share, and
deadlines that understand progress."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import anyio.from_thread
import pytest
from mcp import Client
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Resolve
from mcp_types import CallToolResult, ElicitRequestParams, ElicitResult
from pydantic import BaseModel

from server.extension import APPLY_WAIT_SECONDS
from tests.helpers import Gate, build, code_of, echo, error_of, settings, text_of, until
from tests.integration.test_extension import metrics


def _one() -> int:
    return 1


class Recorder:
    """Tools that record the order in which calls start, and one held by a gate."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.started: list[str] = []

    def tools(self) -> list[Any]:
        recorder = self

        async def hold() -> str:
            recorder.gate._enter()
            await recorder.gate.async_open.wait()
            return "released"

        async def record(label: str) -> str:
            recorder.started.append(label)
            return label

        async def echo_async(text: str) -> str:
            return text

        return [hold, record, echo_async]


async def _call(client: Client, results: dict[str, CallToolResult], key: str, tool: str, args: dict[str, Any]) -> None:
    results[key] = await client.call_tool(tool, args)


async def test_queued_calls_are_served_in_fifo_order_and_the_wait_is_reported() -> None:
    recorder = Recorder()
    app, sessions = build(settings(max_concurrent_sessions=1, max_queued=5), tools=recorder.tools())
    manager = sessions.manager
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_call, client, results, "hold", "hold", {})
                await recorder.gate.entered_event.wait()
                for n, label in enumerate("abcd", start=1):
                    tg.start_soon(_call, client, results, label, "record", {"label": label})
                    await until(lambda n=n: manager.metrics().queued_sessions == n)  # type: ignore[misc]
                m = await metrics(client)
                assert (m["queued_sessions"], m["active_sessions"], m["total_sessions_created"]) == (4, 1, 1)
                recorder.gate.open()
        m = await metrics(client)
    assert recorder.started == ["a", "b", "c", "d"]
    assert all(not results[label].is_error for label in "abcd")
    assert (m["queued_sessions"], m["total_sessions_completed"], m["peak_concurrent_sessions"]) == (0, 5, 1)
    assert m["queue_wait_p95"] > 0 and m["sessions_rejected_capacity"] == 0


async def test_a_queued_call_times_out_with_capacity_exceeded_saying_how_long_it_waited() -> None:
    recorder = Recorder()
    config = settings(max_concurrent_sessions=1, max_queued=1, queue_timeout_seconds=0.3)
    app, _ = build(config, tools=recorder.tools())
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                started = time.monotonic()
                refused = await client.call_tool("record", {"label": "late"})
                waited = time.monotonic() - started
                recorder.gate.open()
        m = await metrics(client)
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and "waited" in error["message"] and "queue" in error["message"]
    assert "the server is at its limit of 1 concurrent session (limits.max_concurrent_sessions)" in error["message"]
    assert 0.3 <= waited < 2.0
    assert recorder.started == [], "a call that waited out the queue never runs"
    assert m["sessions_rejected_queue_timeout"] == 1 and m["sessions_rejected_capacity"] == 0
    assert m["total_sessions_created"] == 1, "a refused call creates no session"
    assert 0.25 <= m["queue_wait_p95"] <= 1.0


async def test_the_queue_never_grows_past_max_queued() -> None:
    recorder = Recorder()
    app, sessions = build(settings(max_concurrent_sessions=1, max_queued=2), tools=recorder.tools())
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_call, client, results, "hold", "hold", {})
                await recorder.gate.entered_event.wait()
                for label in "ab":
                    tg.start_soon(_call, client, results, label, "record", {"label": label})
                await until(lambda: sessions.manager.metrics().queued_sessions == 2)
                started = time.monotonic()
                overflow = await client.call_tool("record", {"label": "overflow"})
                assert time.monotonic() - started < 1.0, "refused at once, not after the queue timeout"
                recorder.gate.open()
        m = await metrics(client)
    error = error_of(overflow)
    assert error["code"] == "capacity_exceeded" and "queue holds 2 of 2" in error["message"]
    assert recorder.started == ["a", "b"]
    assert (m["sessions_rejected_capacity"], m["total_sessions_created"], m["total_sessions_completed"]) == (1, 3, 3)


async def test_a_call_refused_with_its_tool_at_its_cap_and_the_queue_full_is_told_of_both() -> None:
    recorder = Recorder()
    config = settings(max_queued=2, tools={"hold": {"max_concurrent": 1}})
    app, sessions = build(config, tools=recorder.tools())
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_call, client, results, "running", "hold", {})
                await recorder.gate.entered_event.wait()
                for key in ("first", "second"):
                    tg.start_soon(_call, client, results, key, "hold", {})
                await until(lambda: sessions.manager.metrics().queued_sessions == 2)
                refused = await client.call_tool("hold", {})
                recorder.gate.open()
        m = await metrics(client)
    error = error_of(refused)
    assert (error["code"], error["tool"]) == ("capacity_exceeded", "hold")
    assert error["message"] == (
        "tool 'hold' is at its limit of 1 concurrent call (tools.hold.max_concurrent) and the server's queue "
        "holds 2 of 2 waiting calls (limits.max_queued); retry after one of its calls ends"
    )
    assert [text_of(results[key]) for key in ("running", "first", "second")] == ["released"] * 3
    assert (m["sessions_rejected_tool_limit"], m["sessions_rejected_capacity"]) == (1, 0)


async def test_session_create_on_a_full_server_is_refused_without_talk_of_the_queue_it_never_uses() -> None:
    app, _ = build(settings(max_concurrent_sessions=2, max_queued=2))
    async with Client(app) as client:
        for _ in range(2):
            assert not (await client.call_tool("session_create", {})).is_error
        with anyio.fail_after(5):
            refused = await client.call_tool("session_create", {})
        m = await metrics(client)
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and error["tool"] == "session_create"
    assert error["message"] == (
        "the server is at its limit of 2 concurrent sessions (limits.max_concurrent_sessions); "
        "retry after a session ends"
    ), "session_create never queues: its refusal must not mention the queue"
    assert (m["sessions_rejected_capacity"], m["queued_sessions"]) == (1, 0)


async def test_a_call_cancelled_while_queued_leaves_the_queue_at_once() -> None:
    recorder = Recorder()
    app, sessions = build(settings(max_concurrent_sessions=1, max_queued=5), tools=recorder.tools())
    manager = sessions.manager
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                tg.start_soon(client.call_tool, "record", {"label": "stays"})
                await until(lambda: manager.metrics().queued_sessions == 1)
                given_up = anyio.CancelScope()
                async with anyio.create_task_group() as caller:

                    async def queued_then_cancelled() -> None:
                        with given_up:
                            await client.call_tool("record", {"label": "cancelled"})

                    caller.start_soon(queued_then_cancelled)
                    await until(lambda: manager.metrics().queued_sessions == 2)
                    given_up.cancel()
                await until(lambda: manager.metrics().queued_sessions == 1)
                m = await metrics(client)
                assert m["queued_calls_cancelled"] == 1 and m["active_sessions"] == 1
                recorder.gate.open()
        m = await metrics(client)
    assert recorder.started == ["stays"], "only the call still queued ran"
    assert (m["total_sessions_created"], m["total_sessions_cancelled"], m["queued_sessions"]) == (2, 0, 0)


async def test_a_freed_slot_refused_to_a_queued_sync_call_for_stuck_threads_goes_to_the_next_waiter() -> None:
    # One slot frees as a sync call times out and leaves its thread stuck. The oldest waiter is
    # a sync call, now refused for the stuck thread; the slot goes to the async call behind it
    # at once, not after the other slot frees or the async call's queue timeout.
    recorder = Recorder()
    stuck_open = threading.Event()

    def stuck() -> str:
        stuck_open.wait(timeout=60)  # bounded: a failing test leaves no thread for good
        return "late"

    def quick_sync() -> str:
        return "never"

    config = settings(
        max_concurrent_sessions=2,
        max_queued=4,
        queue_timeout_seconds=30.0,
        max_abandoned_threads=1,
        tool_timeouts={"stuck": 0.3},
    )
    app, sessions = build(config, tools=[*recorder.tools(), stuck, quick_sync])
    manager = sessions.manager
    results: dict[str, CallToolResult] = {}
    try:
        async with Client(app) as client:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.call_tool, "hold", {})
                    await recorder.gate.entered_event.wait()
                    tg.start_soon(_call, client, results, "stuck", "stuck", {})
                    await until(lambda: manager.active_count == 2)
                    tg.start_soon(_call, client, results, "sync", "quick_sync", {})
                    await until(lambda: manager.metrics().queued_sessions == 1)
                    tg.start_soon(_call, client, results, "async", "record", {"label": "behind"})
                    await until(lambda: manager.metrics().queued_sessions == 2)
                    # `hold` keeps its slot throughout: only the stuck call's slot is free.
                    await until(lambda: "async" in results, within=5.0)
                    m = await metrics(client)
                    recorder.gate.open()
    finally:
        stuck_open.set()
    assert code_of(results["stuck"]) == "timeout"
    refused = error_of(results["sync"])
    assert refused["code"] == "capacity_exceeded" and "stuck" in refused["message"]
    assert text_of(results["async"]) == "behind" and recorder.started == ["behind"]
    assert (m["active_sessions"], m["queued_sessions"], m["abandoned_threads"]) == (1, 0, 1)
    assert (m["sessions_rejected_threads"], m["sessions_rejected_queue_timeout"]) == (1, 0)


async def test_time_spent_queued_does_not_count_against_the_tools_deadline() -> None:
    recorder = Recorder()

    async def work() -> str:
        await anyio.sleep(0.2)
        return "done"

    config = settings(max_concurrent_sessions=1, max_queued=1, tool_timeouts={"work": 1.0})
    app, sessions = build(config, tools=[*recorder.tools(), work])
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                tg.start_soon(_call, client, results, "work", "work", {})
                await until(lambda: sessions.manager.metrics().queued_sessions == 1)
                await anyio.sleep(0.9)  # queued for most of its 1.0 s deadline; then 0.2 s of work
                recorder.gate.open()
    assert text_of(results["work"]) == "done"


async def test_shutdown_refuses_the_calls_still_queued() -> None:
    recorder = Recorder()
    app, sessions = build(settings(max_concurrent_sessions=1, max_queued=5), tools=recorder.tools())
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                tg.start_soon(_call, client, results, "queued", "record", {"label": "queued"})
                await until(lambda: sessions.manager.metrics().queued_sessions == 1)
                report = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
                assert not report.is_error
        m = sessions.manager.metrics()
    assert code_of(results["queued"]) == "shutting_down"
    assert recorder.started == []
    assert (m.queued_sessions, m.sessions_rejected_shutdown, m.total_sessions_created) == (0, 1, 1)


async def test_a_tool_at_its_cap_does_not_take_the_slots_other_tools_need() -> None:
    recorder = Recorder()
    config = settings(max_concurrent_sessions=3, tools={"hold": {"max_concurrent": 1}})
    app, _ = build(config, tools=recorder.tools())
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                refused = await client.call_tool("hold", {})
                served = [await client.call_tool("echo_async", {"text": str(n)}) for n in range(5)]
                m = await metrics(client)
                recorder.gate.open()
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and error["tool"] == "hold"
    assert "tools.hold.max_concurrent" in error["message"]
    assert [text_of(r) for r in served] == ["0", "1", "2", "3", "4"]
    assert m["sessions_rejected_tool_limit"] == 1 and m["sessions_rejected_capacity"] == 0
    hold = m["tools"]["hold"]
    assert (hold["active"], hold["max_concurrent"], hold["rejected_tool_limit"], hold["calls"]) == (1, 1, 1, 1)


async def test_a_call_refused_with_both_the_server_and_its_tool_full_counts_as_capacity_and_for_its_tool() -> None:
    # One reason per refusal in the sessions_rejected_* counters: the server's, named first as the
    # cluster's store does; the tool's own count says its cap was full too, as the sentence does.
    recorder = Recorder()
    config = settings(max_concurrent_sessions=1, tools={"hold": {"max_concurrent": 1}})
    app, _ = build(config, tools=recorder.tools())
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                refused = await client.call_tool("hold", {})
                other = await client.call_tool("echo_async", {"text": "x"})
                m = await metrics(client)
                recorder.gate.open()
    assert error_of(refused)["message"] == (
        "the server is at its limit of 1 concurrent session (limits.max_concurrent_sessions), and tool 'hold' is "
        "at its limit of 1 concurrent call (tools.hold.max_concurrent); retry after one of its calls ends"
    )
    assert error_of(other)["message"] == (
        "the server is at its limit of 1 concurrent session (limits.max_concurrent_sessions); "
        "retry after a session ends"
    )
    assert (m["sessions_rejected_capacity"], m["sessions_rejected_tool_limit"]) == (2, 0)
    assert m["tools"]["hold"]["rejected_tool_limit"] == 1


async def test_a_call_that_waits_out_the_queue_for_its_tool_s_cap_is_told_so_not_blamed_on_the_server() -> None:
    recorder = Recorder()
    config = settings(max_queued=5, queue_timeout_seconds=0.3, tools={"hold": {"max_concurrent": 1}})
    app, sessions = build(config, tools=recorder.tools())
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                refused = await client.call_tool("hold", {})  # queued for the tool's cap, then waited out
                recorder.gate.open()
        m = await metrics(client)
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and error["tool"] == "hold"
    assert error["message"].startswith("waited 0.3"), error
    assert (
        "without getting a slot: tool 'hold' is at its limit of 1 concurrent call (tools.hold.max_concurrent); "
        "retry later" in error["message"]
    ), error
    assert "server" not in error["message"], "99 of the server's 100 slots were free"
    assert m["sessions_rejected_queue_timeout"] == 1 and m["active_sessions"] == 0


async def test_a_server_with_one_slot_says_one_concurrent_session() -> None:
    app, _ = build(settings(max_concurrent_sessions=1))
    async with Client(app) as client:
        assert not (await client.call_tool("session_create", {})).is_error
        error = error_of(await client.call_tool("session_create", {}))
    assert error["message"] == (
        "the server is at its limit of 1 concurrent session (limits.max_concurrent_sessions); "
        "retry after a session ends"
    )


async def test_a_call_queued_for_its_tool_does_not_block_calls_of_other_tools_behind_it() -> None:
    recorder = Recorder()
    config = settings(max_concurrent_sessions=2, max_queued=5, tools={"hold": {"max_concurrent": 1}})
    app, sessions = build(config, tools=recorder.tools())
    results: dict[str, CallToolResult] = {}
    async with Client(app) as client:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                recorder.gate.expected = 2
                tg.start_soon(client.call_tool, "hold", {})
                await until(lambda: recorder.gate.entered == 1)
                tg.start_soon(_call, client, results, "second_hold", "hold", {})
                await until(lambda: sessions.manager.metrics().queued_sessions == 1)
                # The global cap has room: another tool is served at once, past the queued call.
                assert text_of(await client.call_tool("record", {"label": "other"})) == "other"
                recorder.gate.open()
        m = await metrics(client)
    assert not results["second_hold"].is_error
    assert (m["total_sessions_completed"], m["sessions_rejected_tool_limit"]) == (3, 0)


async def test_one_client_flooding_is_refused_while_another_is_served() -> None:
    recorder = Recorder()
    config = settings(max_concurrent_sessions=10, max_sessions_per_client=2)
    app, sessions = build(config, tools=recorder.tools())
    # Handshake-era clients: each has its own connection (the 2026 era is stateless per request).
    async with Client(app, mode="legacy") as flooder, Client(app, mode="legacy") as polite:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                recorder.gate.expected = 2
                for _ in range(2):
                    tg.start_soon(flooder.call_tool, "hold", {})
                await recorder.gate.entered_event.wait()
                refused = await flooder.call_tool("echo_async", {"text": "more"})
                created = await flooder.call_tool("session_create", {})
                served = await polite.call_tool("echo_async", {"text": "served"})
                recorder.gate.open()
        assert text_of(await flooder.call_tool("echo_async", {"text": "again"})) == "again"
        m = await metrics(polite)
    error = error_of(refused)
    assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"]
    assert "retry after one of its calls ends" in error["message"]
    assert code_of(created) == "capacity_exceeded", "session_create counts against the client's share too"
    assert text_of(served) == "served"
    assert m["sessions_rejected_client_limit"] == 2 and m["sessions_rejected_capacity"] == 0
    assert m["total_sessions_created"] == 4


async def test_session_create_refused_for_the_client_s_share_is_told_to_release_one_with_session_release() -> None:
    app, _ = build(settings(max_sessions_per_client=2))
    async with Client(app, mode="legacy") as client:
        held = [await client.call_tool("session_create", {}) for _ in range(2)]
        refused = error_of(await client.call_tool("session_create", {}))
        # Following the advice works: release one, and the next reservation is admitted.
        await client.call_tool("session_release", {"session_id": held[0].structured_content["session_id"]})
        again = await client.call_tool("session_create", {})
    assert refused["code"] == "capacity_exceeded" and refused["tool"] == "session_create"
    assert refused["message"] == (
        "this client already holds or waits for 2 sessions, the per-client limit (limits.max_sessions_per_client); "
        "release a session it no longer needs with session_release, or retry after one of its calls ends"
    )
    assert not again.is_error


async def long_job(steps: int, ctx: Context) -> str:
    for step in range(steps):
        await anyio.sleep(0.1)
        await ctx.report_progress(step + 1, steps)
    return "finished"


def long_sync_job(steps: int, ctx: Context) -> str:
    # A sync tool has a Context too: from its worker thread it reports progress through the event
    # loop (anyio.from_thread.run), which keeps its idle deadline moving as an async tool's does.
    for step in range(steps):
        time.sleep(0.1)  # the tool's work
        anyio.from_thread.run(ctx.report_progress, step + 1, steps)
    return "finished"


@pytest.mark.parametrize("tool", [long_job, long_sync_job], ids=["async", "sync-from-its-thread"])
async def test_a_tool_that_keeps_reporting_progress_outlives_its_idle_timeout(tool: Callable[..., Any]) -> None:
    name = tool.__name__
    # Progress every 0.1 s against a 1.0 s idle timeout: 0.9 s of slack for a busy machine's pauses.
    config = settings(tools={name: {"timeout_seconds": 10.0, "idle_timeout_seconds": 1.0}})
    app, _ = build(config, tools=[tool])
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with Client(app) as client:
        started = time.monotonic()
        with anyio.fail_after(20):  # 3.2 s of steps; about twice that under pauses
            result = await client.call_tool(name, {"steps": 32}, progress_callback=on_progress)
        elapsed = time.monotonic() - started
        m = await metrics(client)
    assert text_of(result) == "finished" and elapsed >= 3.0, "ran three times its idle timeout"
    assert seen == [float(n) for n in range(1, 33)], "the progress still reaches the client"
    assert m["total_sessions_completed"] == 1 and m["total_sessions_timeout"] == 0


class Confirmation(BaseModel):
    ok: bool


async def asks_the_user(ctx: Context) -> str:
    answer = await ctx.elicit("Run it?", Confirmation)
    return answer.action


async def asks_the_user_keeping_alive(ctx: Context) -> str:
    # The README's pattern: progress while waiting for the person at the other end.
    async def keep_alive() -> None:
        while True:
            await anyio.sleep(0.1)  # well within the idle timeout
            await ctx.report_progress(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_alive)
        answer = await ctx.elicit("Run it?", Confirmation)
        tg.cancel_scope.cancel()
    return answer.action


async def test_waiting_for_the_client_counts_as_no_progress_unless_the_tool_reports_some_meanwhile() -> None:
    idle = {"timeout_seconds": 10.0, "idle_timeout_seconds": 1.0}
    config = settings(tools={"asks_the_user": idle, "asks_the_user_keeping_alive": idle})
    app, _ = build(config, tools=[asks_the_user, asks_the_user_keeping_alive])

    async def slow_person(context: Any, params: ElicitRequestParams) -> ElicitResult:
        await anyio.sleep(3.0)  # three times the idle timeout
        return ElicitResult(action="accept", content={"ok": True})

    async with Client(app, mode="legacy", elicitation_callback=slow_person) as client:
        with anyio.fail_after(20):
            waited = await client.call_tool("asks_the_user", {})
            kept_alive = await client.call_tool("asks_the_user_keeping_alive", {})
    assert code_of(waited) == "timeout" and "no progress" in error_of(waited)["message"], waited
    assert text_of(kept_alive) == "accept", kept_alive


async def test_progress_a_sync_tools_abandoned_thread_reports_after_the_calls_answer_is_dropped() -> None:
    # Progress may reference only an operation in progress: once the call is answered (timed out,
    # its thread abandoned), the progress its thread still reports is not sent to the client.
    go, reported = threading.Event(), threading.Event()

    def reports_after_its_answer(ctx: Context) -> str:
        go.wait(10)  # bounded: a failing test cannot leave the thread behind for good
        try:
            anyio.from_thread.run(ctx.report_progress, 1, 2)
        finally:
            reported.set()
        return "late"

    config = settings(tools={"reports_after_its_answer": {"timeout_seconds": 0.3, "idle_timeout_seconds": 5.0}})
    app, _ = build(config, tools=[reports_after_its_answer, echo])
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    try:
        async with Client(app) as client:
            with anyio.fail_after(10):
                result = await client.call_tool("reports_after_its_answer", {}, progress_callback=on_progress)
                go.set()
                assert await anyio.to_thread.run_sync(reported.wait, 10)
                after = await client.call_tool("echo", {"text": "after"})  # what was sent before it has come
    finally:
        go.set()
    assert code_of(result) == "timeout" and "was abandoned" in text_of(result), result
    assert text_of(after) == "after"
    assert seen == [], "progress came after the call's answer"


async def test_progress_never_carries_a_call_past_its_hard_deadline() -> None:
    # Progress every 0.1 s keeps moving the 0.6 s idle deadline on; the 1.5 s deadline stays put.
    async def keeps_reporting(ctx: Context) -> str:
        for step in range(100):  # 10 s of progress: far past the deadline
            await anyio.sleep(0.1)
            await ctx.report_progress(step + 1)
        return "finished"

    config = settings(tools={"keeps_reporting": {"timeout_seconds": 1.5, "idle_timeout_seconds": 0.6}})
    app, _ = build(config, tools=[keeps_reporting])
    async with Client(app) as client:
        started = time.monotonic()
        with anyio.fail_after(30):
            result = await client.call_tool("keeps_reporting", {})
        elapsed = time.monotonic() - started
        m = await metrics(client)
    error = error_of(result)
    assert error["code"] == "timeout", f"the call ran on past its deadline: {result}"
    assert "within its deadline of 1.5s" in error["message"] and "no progress" not in error["message"]
    assert 1.5 <= elapsed < 1.5 + 4.0, "timed out at its hard deadline, however much progress it reported"
    assert m["total_sessions_timeout"] == 1 and m["total_sessions_completed"] == 0


async def test_a_tool_that_stops_reporting_progress_times_out_at_its_idle_timeout() -> None:
    async def stalls(ctx: Context) -> str:
        for step in range(3):
            await anyio.sleep(0.1)
            await ctx.report_progress(step + 1)
        await anyio.sleep(3600)
        return "never"

    def stalls_in_a_thread() -> str:
        time.sleep(4.0)  # reports no progress: the idle timeout fires from the start
        return "never"

    idle = {"timeout_seconds": 30.0, "idle_timeout_seconds": 0.4}
    config = settings(tools={"stalls": idle, "stalls_in_a_thread": idle})
    app, _ = build(config, tools=[stalls, stalls_in_a_thread])
    async with Client(app) as client:  # no progress callback: progress still counts as alive
        started = time.monotonic()
        with anyio.fail_after(10):
            result = await client.call_tool("stalls", {})
        elapsed = time.monotonic() - started
        started = time.monotonic()
        with anyio.fail_after(10):
            in_thread = await client.call_tool("stalls_in_a_thread", {})
        thread_elapsed = time.monotonic() - started
        m = await metrics(client)
    error = error_of(result)
    assert error["code"] == "timeout" and "no progress" in error["message"] and "0.4s" in error["message"]
    # Upper bounds with seconds of slack for a loaded machine, still well short of what a broken
    # idle timeout would take: the 30 s deadline, or the 4 s the thread sleeps.
    assert 0.3 + 0.4 <= elapsed < 0.3 + 0.4 + 2.5, "timed out at the idle timeout after the last progress"
    assert code_of(in_thread) == "timeout" and 0.4 <= thread_elapsed < 0.4 + 2.5
    assert "must report progress to stay alive" in error["message"]
    # A sync tool reports progress from its thread: the advice says how (or to ask the operator).
    assert "a sync one from its thread with anyio.from_thread.run(ctx.report_progress" in text_of(in_thread)
    assert "ask the operator to raise or remove its idle timeout" in text_of(in_thread)
    assert "cannot report progress" not in text_of(in_thread)
    assert m["total_sessions_timeout"] == 2


async def test_the_idle_timeout_advice_follows_the_tools_kind_when_its_call_runs_decoupled() -> None:
    # A resolver fills a parameter: the call runs decoupled, as one that may be stuck in a thread,
    # but the tool is async and can report progress, so that is the advice.
    async def stalls_resolved(ctx: Context, n: Annotated[int, Resolve(_one)]) -> str:
        await ctx.report_progress(n)
        await anyio.sleep(3600)
        return "never"

    def stalls_resolved_in_a_thread(n: Annotated[int, Resolve(_one)]) -> str:
        time.sleep(1.5)
        return "never"

    idle = {"timeout_seconds": 30.0, "idle_timeout_seconds": 0.3}
    config = settings(tools={"stalls_resolved": idle, "stalls_resolved_in_a_thread": idle})
    app, _ = build(config, tools=[stalls_resolved, stalls_resolved_in_a_thread])
    async with Client(app) as client:
        with anyio.fail_after(10):
            async_result = await client.call_tool("stalls_resolved", {})
            sync_result = await client.call_tool("stalls_resolved_in_a_thread", {})
    assert code_of(async_result) == "timeout" and "no progress" in text_of(async_result)
    assert "must report progress to stay alive" in text_of(async_result)
    assert "sync tool" not in text_of(async_result)
    assert code_of(sync_result) == "timeout"
    assert "a sync one from its thread with anyio.from_thread.run(ctx.report_progress" in text_of(sync_result)


async def test_apply_settings_from_another_thread_admits_a_queued_call_at_once() -> None:
    # A host's config watcher in a thread of its own raises the cap while a call waits in the
    # queue: the call is admitted then, not when an unrelated call next wakes the event loop.
    gate = Gate()
    app, sessions = build(settings(max_concurrent_sessions=1, max_queued=5), tools=[*gate.tools(), echo])
    answered = anyio.Event()
    async with Client(app) as client, anyio.create_task_group() as tg:

        async def queued() -> None:
            assert text_of(await client.call_tool("echo", {"text": "admitted"})) == "admitted"
            answered.set()

        tg.start_soon(client.call_tool, "block_async", {})
        with anyio.fail_after(5):
            await gate.entered_event.wait()
        tg.start_soon(queued)
        await until(lambda: sessions.manager.metrics().queued_sessions == 1)
        # Applied 0.3 s on, from the timer's thread: by then the loop sleeps, with nothing due.
        watcher = threading.Timer(0.3, sessions.apply_settings, args=(settings(max_concurrent_sessions=2),))
        watcher.start()
        with anyio.fail_after(2):
            await answered.wait()
        gate.open()
    watcher.join(timeout=5)
    assert not watcher.is_alive()


async def test_apply_settings_from_a_thread_the_loop_is_joining_does_not_deadlock() -> None:
    # The host's shutdown joins its config watcher from the event loop while the watcher applies
    # settings: the watcher's wait for the loop is bounded, and the change is applied once the
    # loop runs again.
    app, sessions = build(settings(max_concurrent_sessions=1))
    async with Client(app):
        watcher = threading.Thread(target=sessions.apply_settings, args=(settings(max_concurrent_sessions=3),))
        watcher.start()
        watcher.join(timeout=APPLY_WAIT_SECONDS + 5)  # noqa: ASYNC - blocking the loop is the host's doing under test
        assert not watcher.is_alive(), "the watcher waited for the loop that was waiting for it"
        await until(lambda: sessions.manager.limits.max_concurrent_sessions == 3)


async def test_apply_settings_failing_on_the_loop_after_its_thread_stopped_waiting_is_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody is left to raise it to: the failure is logged when the loop runs the change.
    app, sessions = build(settings(max_concurrent_sessions=1))

    def refuse(*args: object) -> None:
        raise RuntimeError("the manager refused the limits")

    async with Client(app):
        monkeypatch.setattr(sessions.manager, "set_limits", refuse)
        watcher = threading.Thread(target=sessions.apply_settings, args=(settings(max_concurrent_sessions=3),))
        with caplog.at_level(logging.ERROR, logger="server.extension"):
            watcher.start()
            watcher.join(timeout=APPLY_WAIT_SECONDS + 5)  # noqa: ASYNC - blocking the loop is the host's doing under test
            assert not watcher.is_alive()
            await until(lambda: any("failed on the event loop" in r.getMessage() for r in caplog.records))
    [record] = [r for r in caplog.records if "failed on the event loop" in r.getMessage()]
    assert record.exc_info is not None and "the manager refused the limits" in str(record.exc_info[1])
