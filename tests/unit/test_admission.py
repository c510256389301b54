"""SessionManager admission on its own (no MCP): the queue's hand-over, per-tool and
per-client limits, stuck-thread refusals, new limits at run time, and the accounting of
every refusal under many concurrent tasks."""

from __future__ import annotations

import gc
import math
import random
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest
from pydantic_core import ErrorDetails

from server import ErrorCode, SessionError, SessionManager, SessionState, admission
from server.admission import Waiter
from server.cluster import ClusterSessionManager
from server.config import LimitsSettings, Settings, ToolSettings
from server.session import Session
from tests.helpers import until
from tests.unit.test_sessions import assert_invariant
from tools.sessions import argument_problems

if TYPE_CHECKING:
    from _typeshed import TraceFunction


def manager(tool_caps: dict[str, int] | None = None, **limits: float) -> SessionManager:
    return SessionManager(LimitsSettings(**limits), tool_caps)  # type: ignore[arg-type]


async def test_a_released_slot_goes_to_the_oldest_waiter_not_to_a_newcomer() -> None:
    sessions = manager(max_concurrent_sessions=1, max_queued=5)
    held = await sessions.create(tool="t")
    admitted: list[str] = []
    async with anyio.create_task_group() as tg:

        async def wait_for_slot(label: str) -> None:
            session = await sessions.create(tool="t")
            admitted.append(label)
            await sessions.release(session.id)

        for n, label in enumerate(["first", "second"], start=1):
            tg.start_soon(wait_for_slot, label)
            await until(lambda n=n: sessions.metrics().queued_sessions == n)  # type: ignore[misc]
        await sessions.release(held.id)
        # The slot was handed over under the lock: a newcomer finds the server full.
        with pytest.raises(SessionError) as refused:
            sessions.create_nowait(tool="t")
        assert refused.value.code is ErrorCode.CAPACITY_EXCEEDED
    assert admitted == ["first", "second"]
    m = sessions.metrics()
    assert (m.total_sessions_created, m.total_sessions_completed, m.sessions_rejected_capacity) == (3, 3, 1)
    assert_invariant(m)


async def served_in_turn(sessions: SessionManager, tool: str, order: list[str]) -> None:
    """A call of `tool` that waits for its slot, notes in `order` when it got it, and ends."""
    session = await sessions.create(tool=tool)
    order.append(tool)
    await sessions.release(session.id)


async def test_a_waiter_for_a_full_tool_is_skipped_not_a_blocker() -> None:
    sessions = manager({"slow": 1}, max_concurrent_sessions=3, max_queued=5)
    slow = await sessions.create(tool="slow")
    order: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(served_in_turn, sessions, "slow", order)
        await until(lambda: sessions.metrics().queued_sessions == 1)
        fast = await sessions.create(tool="fast")  # the global cap has room: admitted at once
        order.append("fast-direct")
        await sessions.release(fast.id)
        await sessions.release(slow.id)
    assert order == ["fast-direct", "slow"]
    assert sessions.metrics().tools["slow"].active == 0


async def _lines_run_by_a_release(blocked: int) -> int:
    """Lines of this package run to end a call of one tool while `blocked` calls of another,
    capped tool at its cap wait in the queue (a count of work, not a time)."""
    sessions = manager({"capped": 1}, max_concurrent_sessions=10, max_queued=blocked)
    held = await sessions.create(tool="capped")
    async with anyio.create_task_group() as tg:
        for _ in range(blocked):
            tg.start_soon(lambda: sessions.create(tool="capped"))
        await until(lambda: sessions.metrics().queued_sessions == blocked)
        other = await sessions.create(tool="other")
        ours = held.__class__.__module__.split(".")[0]
        lines = _lines_run(ours, lambda: sessions.end(other, SessionState.COMPLETED))
        tg.cancel_scope.cancel()
    return lines


async def test_a_release_does_not_look_at_every_waiter_of_a_full_tool() -> None:
    # Admission is O(1): the release of another tool's call must not walk the full tool's backlog.
    assert await _lines_run_by_a_release(1000) == await _lines_run_by_a_release(10)


def _lines_run(ours: str, work: Callable[[], object]) -> int:
    """Lines of the package `ours` run by `work()` (a count of work, not a time)."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> TraceFunction:
        nonlocal lines
        if event == "line" and frame.f_globals.get("__name__", "").startswith(ours):
            lines += 1
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        work()
    finally:
        sys.settrace(before)
    return lines


async def _lines_run_by_a_release_beside_full_tools(tools: int) -> int:
    """Lines run to end a call of an uncapped tool while `tools` capped tools, each at its cap,
    have a call waiting: one line of the queue per tool, none of which can take the slot."""
    sessions = manager({f"t{n}": 1 for n in range(tools)}, max_concurrent_sessions=10 * tools, max_queued=tools)
    for n in range(tools):
        await sessions.create(tool=f"t{n}")
    async with anyio.create_task_group() as tg:
        for n in range(tools):
            tg.start_soon(lambda n=n: sessions.create(tool=f"t{n}"))  # type: ignore[misc]
        await until(lambda: sessions.metrics().queued_sessions == tools)
        counts = []
        for _ in range(2):  # the first release and the next cost the same: nothing is put off
            other = await sessions.create(tool="other")
            counts.append(_lines_run("server", lambda other=other: sessions.end(other, SessionState.COMPLETED)))  # type: ignore[misc]
        assert counts[0] == counts[1], counts
        assert sessions.metrics().queued_sessions == tools
        tg.cancel_scope.cancel()
    return counts[0]


async def test_a_release_does_not_look_at_the_line_of_every_full_tool() -> None:
    # A slot freed while every waiting call's tool is full admits nobody, and finds that out
    # without a look at each tool's line (measured: 0.4 ms a release with 4000 such tools).
    assert await _lines_run_by_a_release_beside_full_tools(400) == await _lines_run_by_a_release_beside_full_tools(4)


async def _lines_run_by_slots_freed_together(waiters: int) -> int:
    """Lines run to end `waiters` sessions one after another, each handing its slot to one of
    `waiters` calls of as many capped tools (none running), which wait for the server's slots."""
    sessions = manager({f"t{n}": 1 for n in range(waiters)}, max_concurrent_sessions=waiters, max_queued=waiters)
    held = [await sessions.create(expire=False) for _ in range(waiters)]
    admitted: list[int] = []
    async with anyio.create_task_group() as tg:

        async def queued(n: int) -> None:
            await sessions.create(tool=f"t{n}")
            admitted.append(n)

        for n in range(waiters):
            tg.start_soon(queued, n)
            await until(lambda n=n: sessions.metrics().queued_sessions == n + 1)  # type: ignore[misc]

        def end_all() -> None:
            for session in held:
                sessions.end(session, SessionState.COMPLETED)

        lines = _lines_run("server", end_all)
        await until(lambda: len(admitted) == waiters)
    assert admitted == list(range(waiters)), "in arrival order"
    return lines


async def test_slots_freed_one_after_another_are_handed_over_without_a_look_at_every_line() -> None:
    # Each hand-over finds the oldest call that fits without a look at every tool's line: ending
    # 4 times as many sessions runs 4 times as many lines, not 16 (a mass expiry of 4000
    # sessions with 4000 tools' calls waiting took 1.5 s on the event loop).
    few, many = await _lines_run_by_slots_freed_together(50), await _lines_run_by_slots_freed_together(200)
    assert many <= 4 * few * 1.2, (few, many)


async def test_the_queue_hands_slots_over_in_arrival_order_past_full_tools_and_stuck_threads() -> None:
    sessions = manager({"a": 1, "b": 1}, max_concurrent_sessions=3, max_queued=20, max_abandoned_threads=1)
    running = [await sessions.create(tool=tool) for tool in ("a", "b", "c")]
    got: list[str] = []
    async with anyio.create_task_group() as tg:

        async def queued(label: str, tool: str, needs_thread: bool = False) -> None:
            try:
                session = await sessions.create(tool=tool, needs_thread=needs_thread)
            except SessionError as refused:
                assert refused.code is ErrorCode.CAPACITY_EXCEEDED and "stuck" in refused.message
                got.append(f"{label} refused")
                return
            got.append(label)
            await sessions.wait_ended(session)

        arrivals = [("a1", "a", False), ("t1", "c", True), ("b1", "b", False), ("c1", "c", False)]
        arrivals += [("a2", "a", False), ("t2", "b", True), ("c2", "c", False), ("b2", "b", False)]
        for n, (label, tool, needs_thread) in enumerate(arrivals, start=1):
            tg.start_soon(queued, label, tool, needs_thread)
            await until(lambda n=n: sessions.metrics().queued_sessions == n)  # type: ignore[misc]
        sessions.thread_abandoned()  # from now on, a queued call that needs a thread is refused on its turn
        sessions.end(running[2], SessionState.COMPLETED)  # a free slot; "a" and "b" are full
        await until(lambda: len(got) == 2)
        assert sorted(got) == ["c1", "t1 refused"], (
            "the stuck-thread call ahead is refused, the first that fits admitted"
        )
        sessions.end(running[0], SessionState.COMPLETED)  # "a" has room again
        await until(lambda: len(got) == 3)
        sessions.thread_ended()
        sessions.end(running[1], SessionState.COMPLETED)  # "b" has room again: b1 (t2 needs a thread, behind it)
        await until(lambda: len(got) == 4)
        assert got[2:] == ["a1", "b1"]
        assert [w.session.tool for w in sessions._queue] == ["a", "b", "c", "b"]
        sessions.set_limits(LimitsSettings(max_concurrent_sessions=5, max_queued=20), {"a": 1, "b": 2})
        await until(lambda: len(got) == 6)
        assert sorted(got[4:]) == ["c2", "t2"], "new caps: the oldest that fit"
        tg.cancel_scope.cancel()


async def test_calls_that_give_up_waiting_while_the_server_is_full_leave_the_hand_over_no_trail() -> None:
    # Each call that queues and gives up leaves an entry behind in the hand-over's heap of lines
    # (dropped when it comes to the top, which it does not while the server is full): the heap is
    # made again before those outnumber the lines, and the next slot still goes to the oldest.
    sessions = manager({"a": 2}, max_concurrent_sessions=1, max_queued=10)
    held = await sessions.create()
    order: list[str] = []
    async with anyio.create_task_group() as tg:

        async def gives_up(scope: anyio.CancelScope) -> None:
            with scope:
                await sessions.create(tool="a")

        tg.start_soon(served_in_turn, sessions, "other", order)
        await until(lambda: sessions.metrics().queued_sessions == 1)
        for _ in range(300):
            scope = anyio.CancelScope()
            tg.start_soon(gives_up, scope)
            await until(lambda: sessions.metrics().queued_sessions == 2)
            scope.cancel()
            await until(lambda: sessions.metrics().queued_sessions == 1)
            assert len(sessions._ready) <= 100, "bounded by the lines (2), not by the calls that came and went"
        assert sessions.metrics().queued_calls_cancelled == 300
        tg.start_soon(served_in_turn, sessions, "a", order)
        await until(lambda: sessions.metrics().queued_sessions == 2)
        await sessions.release(held.id)
        await until(lambda: len(order) == 2)
    assert order == ["other", "a"]


class _ScanningManager(SessionManager):
    """The hand-over as it was first written, a look at the head of every line for each slot:
    the reference the manager's own hand-over must agree with, call for call."""

    def _hand_over_locked(self) -> list[Waiter]:
        cap = self.limits.max_concurrent_sessions
        if len(self._active) >= cap or not self._queue:
            return []
        stuck = self._abandoned >= self.limits.max_abandoned_threads
        woken: list[Waiter] = []
        last = 0
        while len(self._active) < cap:
            first: Waiter | None = None
            for key, line in self._lines.items():
                if key is not None and self._tool_active.get(key, 0) >= self.tool_caps.get(key, math.inf):
                    continue
                head = next(iter(line))
                if first is None or head.seq < first.seq:
                    first = head
            if first is None:
                break
            if stuck and first.session.needs_thread:
                self._refuse_threads_locked(first)
            else:
                self._admit_waiter_locked(first)
                last = first.seq
            woken.append(first)
        if stuck and self._thread_waiters:
            turned = last if len(self._active) >= cap else self._queued_count
            while self._thread_waiters:
                waiter = next(iter(self._thread_waiters))
                if waiter.seq > turned:
                    break
                self._refuse_threads_locked(waiter)
                woken.append(waiter)
        return woken


async def _queue_history(sessions: SessionManager, seed: int) -> list[tuple[object, ...]]:
    """What happens to every call of a random run (arrivals, ends one by one and several at
    once, cancelled waiters, stuck threads, caps raised, lowered, added and taken away), as
    the sequence of what is running, waiting and refused after each step."""
    rng = random.Random(seed)
    outcome: dict[int, str] = {}
    running: dict[int, Session] = {}
    waiting: dict[int, Waiter] = {}
    scopes: dict[int, anyio.CancelScope] = {}
    history: list[tuple[object, ...]] = []
    async with anyio.create_task_group() as tg:

        async def call(n: int, tool: str | None, needs_thread: bool) -> None:
            with anyio.CancelScope() as scope:
                scopes[n] = scope
                try:
                    session = await sessions.create(tool=tool, needs_thread=needs_thread, timeout_seconds=300.0)
                except SessionError as refused:
                    outcome[n] = f"refused {refused.code.value}"
                    return
                running[n] = session
                outcome[n] = "admitted"
            if scope.cancelled_caught:
                outcome[n] = "cancelled"

        def settled() -> bool:
            return all(w in sessions._queue or n in outcome for n, w in waiting.items())

        for n in range(300):
            step = rng.random()
            if step < 0.45:  # a call arrives
                tool = rng.choice(["a", "a", "b", "c", "d", None])
                queued = len(sessions._queue)
                tg.start_soon(call, n, tool, rng.random() < 0.2)
                await until(lambda n=n, queued=queued: n in outcome or len(sessions._queue) > queued)  # type: ignore[misc]
                if n not in outcome:
                    waiting[n] = next(reversed(sessions._queue))
            elif step < 0.75 and running:  # one ends, or several at once
                for m in rng.sample(sorted(running), min(len(running), rng.choice([1, 1, 1, 3]))):
                    sessions.end(running.pop(m), SessionState.COMPLETED)
            elif step < 0.82 and waiting:  # a waiting call is cancelled
                m = rng.choice(sorted(waiting))
                if m not in outcome:
                    scopes[m].cancel()
                    await until(lambda m=m: m in outcome)  # type: ignore[misc]
            elif step < 0.9:  # a thread gets stuck, or comes back
                if sessions._abandoned and rng.random() < 0.5:
                    sessions.thread_ended()
                else:
                    sessions.thread_abandoned()
            else:  # new limits: caps added, raised, lowered, taken away
                caps = {tool: rng.choice([1, 2, 3]) for tool in ("a", "b", "c", "d") if rng.random() < 0.6}
                sessions.set_limits(
                    LimitsSettings(
                        max_concurrent_sessions=rng.choice([2, 3, 5]), max_queued=40, max_abandoned_threads=1
                    ),
                    caps,
                )
            await until(settled)
            for m in [m for m in running if running[m].state is not SessionState.ACTIVE]:
                del running[m]
            history.append(
                (
                    n,
                    sorted(running),
                    [m for m, w in waiting.items() if w in sessions._queue],
                    sorted(outcome.items()),
                )
            )
        await sessions.shutdown(0)
        await until(settled)
        history.append(("shutdown", sorted(outcome.items())))
        metrics = sessions.metrics()
        assert_invariant(metrics)
        assert (metrics.queued_sessions, sessions._client_load, sessions._tool_active) == (0, {}, {})
    return history


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_hand_over_admits_and_refuses_exactly_as_a_look_at_every_line_would(seed: int) -> None:
    def build(kind: type[SessionManager]) -> SessionManager:
        limits = LimitsSettings(max_concurrent_sessions=3, max_queued=40, max_abandoned_threads=1)
        return kind(limits, {"a": 1, "b": 2})

    ours, reference = build(SessionManager), build(_ScanningManager)
    assert await _queue_history(ours, seed) == await _queue_history(reference, seed)


async def test_raising_the_limits_at_run_time_admits_waiters_and_lowering_never_ends_sessions() -> None:
    sessions = manager(max_concurrent_sessions=2, max_queued=5)
    running = [await sessions.create(tool="t") for _ in range(2)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(sessions.create)
        await until(lambda: sessions.metrics().queued_sessions == 1)
        sessions.set_limits(LimitsSettings(max_concurrent_sessions=3, max_queued=5))
        await until(lambda: sessions.metrics().queued_sessions == 0)
    assert sessions.metrics().active_sessions == 3
    sessions.set_limits(LimitsSettings(max_concurrent_sessions=1))
    assert all(s.state is SessionState.ACTIVE for s in running), "lowering the cap ends nothing"
    with pytest.raises(SessionError):
        sessions.create_nowait()
    for s in running:
        await sessions.release(s.id)
    with pytest.raises(SessionError):  # still 1 active (the one admitted from the queue): at the new cap
        sessions.create_nowait()


async def test_the_client_share_counts_queued_calls_and_frees_when_sessions_end() -> None:
    sessions = manager(max_concurrent_sessions=1, max_queued=5, max_sessions_per_client=2)
    mine = await sessions.create(client="a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sessions.create(client="a"))
        await until(lambda: sessions.metrics().queued_sessions == 1)
        with pytest.raises(SessionError) as refused:
            await sessions.create(client="a")
        assert "max_sessions_per_client" in refused.value.message
        tg.cancel_scope.cancel()
    m = sessions.metrics()
    assert (m.sessions_rejected_client_limit, m.queued_calls_cancelled, m.queued_sessions) == (1, 1, 0)
    await sessions.release(mine.id)
    for _ in range(2):  # the share is free again
        await sessions.release((await sessions.create(client="a")).id)
    assert sessions._client_load == {}, "no per-client entry outlives its sessions"


async def test_sync_work_is_refused_at_once_while_too_many_threads_are_stuck() -> None:
    sessions = manager(max_abandoned_threads=1)
    sessions.thread_abandoned()
    with pytest.raises(SessionError) as refused:
        await sessions.create(tool="blocking", needs_thread=True)
    assert (
        refused.value.code is ErrorCode.CAPACITY_EXCEEDED
        and "1 thread is stuck in a sync tool call" in refused.value.message
    )
    await sessions.release((await sessions.create(tool="async")).id)  # no thread needed: admitted
    sessions.thread_ended()
    await sessions.release((await sessions.create(tool="blocking", needs_thread=True)).id)
    m = sessions.metrics()
    assert (m.sessions_rejected_threads, m.total_sessions_created, m.max_abandoned_threads) == (1, 2, 1)


async def test_a_queued_sync_call_is_refused_at_once_when_a_slot_frees_after_a_thread_got_stuck() -> None:
    # The call waits for tool "a" (full); a thread gets stuck; another session frees a server
    # slot that "a" cannot use. The waiting sync call is refused on that hand-over, not left to
    # its queue timeout (60 s here, past the 5 s `until` allows).
    sessions = manager(
        {"a": 1}, max_concurrent_sessions=3, max_queued=5, queue_timeout_seconds=60, max_abandoned_threads=1
    )
    await sessions.create(tool="a")
    other = await sessions.create(tool="b")
    refused: list[SessionError] = []
    async with anyio.create_task_group() as tg:

        async def sync_call() -> None:
            with pytest.raises(SessionError) as raised:
                await sessions.create(tool="a", needs_thread=True)
            refused.append(raised.value)

        tg.start_soon(sync_call)
        await until(lambda: sessions.metrics().queued_sessions == 1)
        sessions.thread_abandoned()
        await sessions.release(other.id)  # a slot frees; tool "a" is still full
        await until(lambda: len(refused) == 1)
    assert refused[0].code is ErrorCode.CAPACITY_EXCEEDED
    assert "1 thread is stuck in a sync tool call" in refused[0].message, refused[0].message
    m = sessions.metrics()
    assert (m.queued_sessions, m.sessions_rejected_threads) == (0, 1)


async def test_progress_moves_the_idle_deadline_and_silence_times_out() -> None:
    sessions = manager()
    async with sessions.running():
        # The chatty one's idle timeout is half the quiet one's: without its progress every 0.05 s
        # it would time out first; 0.45 s of slack for a busy machine's pauses.
        quiet = await sessions.create(tool="t", timeout_seconds=30, idle_timeout_seconds=1.0)
        chatty = await sessions.create(tool="t", timeout_seconds=30, idle_timeout_seconds=0.5)
        with anyio.fail_after(5):
            while quiet.state is SessionState.ACTIVE:
                sessions.progress(chatty)
                await anyio.sleep(0.05)
        assert quiet.state is SessionState.TIMEOUT and quiet.idle_expired
        assert chatty.state is SessionState.ACTIVE
        with anyio.fail_after(5):
            assert await sessions.wait_ended(chatty) is SessionState.TIMEOUT
        assert chatty.idle_expired and chatty.error is not None and "no progress" in chatty.error


async def test_counters_add_up_under_many_concurrent_callers_with_every_kind_of_limit() -> None:
    caps = {"a": 2, "b": 3}
    sessions = manager(
        caps,
        max_concurrent_sessions=6,
        max_queued=20,
        queue_timeout_seconds=0.05,
        max_sessions_per_client=5,
    )
    rng = random.Random(7)
    attempts = 600
    outcomes = {"admitted": 0, "refused": 0, "cancelled": 0}
    seen_tool_peak: dict[str, int] = {}

    async def caller(n: int) -> None:
        tool = rng.choice(["a", "b", "c"])
        try:
            with anyio.CancelScope() as scope:
                if n % 17 == 0:
                    scope.deadline = anyio.current_time() + 0.01
                session = await sessions.create(tool=tool, client=n % 4, queue=n % 5 != 0)
        except SessionError:
            outcomes["refused"] += 1
            return
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1
            return
        outcomes["admitted"] += 1
        active = sessions.metrics().tools[tool].active
        seen_tool_peak[tool] = max(seen_tool_peak.get(tool, 0), active)
        await anyio.sleep(rng.random() * 0.01)
        await _end(sessions, session, rng)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for n in range(attempts):
                tg.start_soon(caller, n)
                if n % 10 == 0:
                    await anyio.lowlevel.checkpoint()
    m = sessions.metrics()
    assert_invariant(m)
    assert sum(outcomes.values()) == attempts
    rejected = (
        m.sessions_rejected_capacity
        + m.sessions_rejected_queue_timeout
        + m.sessions_rejected_tool_limit
        + m.sessions_rejected_client_limit
    )
    assert rejected == outcomes["refused"]
    assert m.total_sessions_created == outcomes["admitted"] + m.total_sessions_cancelled
    assert m.queued_calls_cancelled + m.total_sessions_cancelled == outcomes["cancelled"]
    assert m.peak_concurrent_sessions <= 6
    assert all(seen_tool_peak.get(tool, 0) <= cap for tool, cap in caps.items())
    assert (m.active_sessions, m.queued_sessions) == (0, 0)
    assert sessions._client_load == {} and sessions._tool_active == {}


async def _end(sessions: SessionManager, session: Session, rng: random.Random) -> None:
    await sessions.release(session.id, rng.choice(["completed", "error"]))


async def test_a_refusal_keeps_no_reference_to_the_refused_call_without_the_cyclic_gc() -> None:
    # A refusal held in a local of the frame that raises it forms a cycle (error -> traceback ->
    # frame -> error) that keeps the refused metadata alive until the cyclic GC happens to run:
    # with 10 MB of metadata per call, that showed as the server's memory climbing.
    sessions = manager(max_concurrent_sessions=1, max_queued=1, max_metadata_bytes=10)
    metadata = {"blob": "x" * 100}
    held = await sessions.create()
    gc.disable()
    try:
        before = sys.getrefcount(metadata)
        try:
            await sessions.create(metadata=metadata)
        except SessionError:
            pass
        assert sys.getrefcount(metadata) == before, "create"
        try:
            sessions.create_nowait(metadata=metadata)
        except SessionError:
            pass
        assert sys.getrefcount(metadata) == before, "create_nowait"
        small = {"k": "v"}
        small_before = sys.getrefcount(small)
        async with anyio.create_task_group() as tg:

            async def queued_then_refused() -> None:
                try:
                    await sessions.create(metadata=small)
                except SessionError:
                    pass

            tg.start_soon(queued_then_refused)
            await until(lambda: sessions.metrics().queued_sessions == 1)
            await sessions.shutdown(0)
        assert sys.getrefcount(small) == small_before
    finally:
        gc.enable()
    assert held.state is SessionState.CANCELLED


@pytest.mark.parametrize(
    ("server_full", "tool_full", "tool_cap", "says"),
    [
        (True, False, 1, "the server is at its limit of 100 concurrent sessions (limits.max_concurrent_sessions)"),
        (False, True, 1, "tool 'slow' is at its limit of 1 concurrent call (tools.slow.max_concurrent)"),
        (
            True,
            True,
            1,
            "the server is at its limit of 100 concurrent sessions (limits.max_concurrent_sessions), and tool 'slow'",
        ),
        # Neither seen full (cluster mode: other replicas' calls count): both caps that may have kept it.
        (
            False,
            False,
            1,
            "neither the server (limits.max_concurrent_sessions, 100) nor tool 'slow' (tools.slow.max_concurrent, 1)",
        ),
        # Neither seen full, and the tool has no cap: only the server's can have kept it.
        (
            False,
            False,
            None,
            "without getting a slot: the server is at its limit of 100 concurrent sessions"
            " (limits.max_concurrent_sessions); retry later",
        ),
    ],
)
def test_a_queue_timeout_names_what_the_call_waited_for(
    server_full: bool, tool_full: bool, tool_cap: int | None, says: str
) -> None:
    refusal = admission.refuse_queue_timeout(
        "slow", 0.5, "the server", 100, server_full=server_full, tool_cap=tool_cap, tool_full=tool_full
    )
    assert refusal.code is ErrorCode.CAPACITY_EXCEEDED
    assert refusal.message.startswith(
        "waited 0.5s in the queue (limits.queue_timeout_seconds) without getting a slot: "
    )
    assert says in refusal.message and refusal.message.endswith("; retry later"), refusal.message


def test_a_cluster_queue_timeout_reads_as_one_sentence() -> None:
    # In cluster mode neither cap is seen full here (other replicas' calls count): the sentence
    # names the cluster's cap and the tool's, with no parentheses back to back.
    refusal = admission.refuse_queue_timeout(
        "slow", 0.5, ClusterSessionManager.CAPACITY_SCOPE, 100, server_full=False, tool_cap=1, tool_full=False
    )
    assert (
        "without getting a slot: neither the cluster of replicas sharing the session store "
        "(limits.max_concurrent_sessions, 100) nor tool 'slow' (tools.slow.max_concurrent, 1) had room for it"
    ) in refusal.message, refusal.message
    assert ") (" not in refusal.message


def test_argument_problems_words_values_that_are_no_json_without_raising() -> None:
    # Through a transport the arguments are JSON; a host calling handle_tool_call itself can pass
    # anything, and the sentence must still come out (not a TypeError from json.dumps).
    looped: dict[str, object] = {}
    looped["self"] = looped
    errors: list[ErrorDetails] = [
        {
            "type": "dict_type",
            "loc": ("metadata",),
            "msg": "Input should be a valid dictionary",
            "input": {(1, 2): "x"},
        },
        {"type": "string_type", "loc": ("provider",), "msg": "Input should be a valid string", "input": looped},
    ]
    assert argument_problems(errors) == (
        "metadata: input should be a valid dictionary (got {(1, 2): 'x'}); "
        "provider: input should be a valid string (got {'self': {...}})"
    )


def test_a_tool_limit_the_store_reported_for_a_cap_a_reload_took_away_is_the_servers_refusal() -> None:
    # Cluster mode: the store said the tool was full, and a reload took its cap away during the
    # round trip. The refusal is worded and counted as the server's, not a KeyError.
    sessions = manager({"a": 1})
    sessions.set_limits(sessions.limits, {})
    refusal = sessions._full_locked(Session("", None, "a", 30.0), tool_full=True)
    assert refusal.code is ErrorCode.CAPACITY_EXCEEDED and "tools.a.max_concurrent" not in refusal.message
    m = sessions.metrics()
    assert (m.sessions_rejected_capacity, m.sessions_rejected_tool_limit) == (1, 0)


async def test_an_unhashable_client_is_refused_before_it_takes_a_slot() -> None:
    sessions = manager(max_concurrent_sessions=1)
    with pytest.raises(TypeError, match="client must be hashable"):
        await sessions.create(tool="t", client=["conn", 1])  # type: ignore[arg-type]
    assert sessions.metrics().active_sessions == 0
    admitted = await sessions.create(tool="t", client=("conn", 1))  # the one slot is still free
    await sessions.release(admitted.id)


def test_set_limits_takes_what_the_constructor_takes_and_refuses_the_rest_changing_nothing() -> None:
    sessions = manager({"a": 1}, max_concurrent_sessions=3)
    file = Settings(limits=LimitsSettings(max_concurrent_sessions=7), tools={"b": ToolSettings(max_concurrent=2)})
    sessions.set_limits(file)  # a whole Settings: its [limits], and its tools' caps
    assert (sessions.limits.max_concurrent_sessions, sessions.tool_caps) == (7, {"b": 2})
    sessions.set_limits(None)  # the defaults; the caps in force are kept
    assert (sessions.limits, sessions.tool_caps) == (LimitsSettings(), {"b": 2})
    for wrong in ({"max_concurrent_sessions": 2}, "config.toml"):
        with pytest.raises(TypeError, match=r"set_limits\(\) takes a Settings"):
            sessions.set_limits(wrong)  # type: ignore[arg-type]
    assert sessions.limits == LimitsSettings() and sessions.metrics().limits["max_concurrent_sessions"] == 100


def test_a_refusal_names_the_cap_of_a_tool_with_a_dot_in_its_name_as_toml_writes_it() -> None:
    assert '(tools."my.tool".max_concurrent)' in admission.refuse_tool_limit("my.tool", 2).message
    assert "(tools.echo.max_concurrent)" in admission.refuse_tool_limit("echo", 2).message


async def test_the_hand_over_keeps_no_heap_entries_once_nothing_waits() -> None:
    # Calls that give up waiting leave entries behind them in the heap (dropped when they come to
    # its top); once the queue is empty none of them may stay, however many calls came and went.
    sessions = manager(max_concurrent_sessions=1, max_queued=10)
    held = await sessions.create(tool="busy")
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lambda: sessions.create(tool="waits"))
        await until(lambda: sessions.metrics().queued_sessions == 3)
        assert sessions._ready != []
        tg.cancel_scope.cancel()  # all three give up
    assert sessions.metrics().queued_sessions == 0 and sessions._ready == []
    sessions.end(held, SessionState.COMPLETED)
