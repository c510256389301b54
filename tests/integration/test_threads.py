"""Stuck sync tools must not take the server down: a stuck thread's capacity goes back to
live work (a sync tool's thread wait ends at its deadline and returns the limiter token; work
the extension runs decoupled keeps its token and the limiter is lent one more), the stuck ones
are bounded and sync tools are refused at once past the bound, until the stuck threads end."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskGroup
from mcp import Client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Resolve
from mcp_types import CallToolRequestParams, CallToolResult

from server import SessionsExtension, Settings, threads
from server.decoupled import _Work
from tests.helpers import build, code_of, settings, text_of, until
from tests.integration.test_extension import metrics

#: A small thread limiter makes exhaustion quick to reach; the mechanism is the same at 40.
TOKENS = 3


@contextmanager
def thread_limiter(tokens: int) -> Iterator[anyio.CapacityLimiter]:
    limiter = anyio.to_thread.current_default_thread_limiter()
    before = limiter.total_tokens
    limiter.total_tokens = tokens
    try:
        yield limiter
    finally:
        limiter.total_tokens = before


def _one() -> int:
    return 1


def stuck_tools(release: threading.Event) -> list[Any]:
    def stuck() -> str:
        release.wait(timeout=60)  # bounded: a failing test cannot leave it behind for good
        return "unstuck"

    # A parameter filled by a resolver (which the SDK may run in a shielded thread of its own):
    # the extension leaves such a tool's function alone and runs its work decoupled.
    def stuck_resolved(n: Annotated[int, Resolve(_one)]) -> str:
        release.wait(timeout=60)
        return f"unstuck {n}"

    def quick_sync() -> str:
        return "quick"

    def quick_resolved(n: Annotated[int, Resolve(_one)]) -> str:
        return f"quick {n}"

    async def echo_async(text: str) -> str:
        return text

    return [stuck, stuck_resolved, quick_sync, quick_resolved, echo_async]


@pytest.mark.parametrize(
    ("tool", "live", "held"),
    [("stuck", "quick_sync", 0), ("stuck_resolved", "quick_resolved", TOKENS)],
    ids=["thread-wait-ends-at-the-deadline", "decoupled-work-keeps-its-token"],
)
async def test_stuck_threads_do_not_starve_live_sync_calls(tool: str, live: str, held: int) -> None:
    # A sync tool's thread comes from the extension's limiter (no bound of its own: admission,
    # here TOKENS sessions, bounds it), a decoupled call's from anyio's default one (the SDK's
    # wait), TOKENS tokens here.
    release = threading.Event()
    timeouts = {tool: 0.2, live: 2.0}
    config = settings(tool_timeouts=timeouts, max_abandoned_threads=TOKENS + 2, max_concurrent_sessions=TOKENS)
    app, sessions = build(config, tools=stuck_tools(release))
    try:
        with thread_limiter(TOKENS) as default:
            async with Client(app) as client:
                limiter = default if held else sessions._tool_threads
                tokens = TOKENS if held else math.inf
                assert limiter is not None and limiter.total_tokens == tokens
                # As many stuck calls as the limiter has tokens, each still in its thread.
                for _ in range(TOKENS):
                    result = await client.call_tool(tool, {})
                    assert code_of(result) == "timeout" and "was abandoned" in text_of(result)
                m = await metrics(client)
                assert m["abandoned_threads"] == TOKENS
                assert limiter.borrowed_tokens == held
                assert limiter.total_tokens == tokens + held, "each token still held is lent back once"
                # Live sync work still gets a thread at once.
                with anyio.fail_after(1.5):
                    result = await client.call_tool(live, {})
                assert not result.is_error and text_of(result).startswith("quick")
                release.set()
                with anyio.fail_after(5):
                    await sessions.manager.wait_no_abandoned_threads()
                assert limiter.total_tokens == tokens, "the extra capacity goes when the stuck threads end"
                assert (await metrics(client))["abandoned_threads"] == 0
    finally:
        release.set()


async def test_a_hosts_own_calls_of_a_sync_tool_take_no_thread_sized_for_the_sessions() -> None:
    # The host calls a sync tool itself (`MCPServer.call_tool`: no session): its threads come from
    # anyio's default limiter, so the extension's, one per session, is all there for admitted calls.
    entered, release = threading.Semaphore(0), threading.Event()

    def parked() -> str:
        entered.release()
        release.wait(timeout=60)  # bounded: a failing test cannot leave it behind for good
        return "parked"

    def quick_sync() -> str:
        return "quick"

    async def wait_entered() -> None:  # in a thread of a limiter of its own: it takes none of the others'
        assert await anyio.to_thread.run_sync(entered.acquire, True, 5.0, limiter=anyio.CapacityLimiter(1))

    app, sessions = build(
        settings(max_concurrent_sessions=2, tool_timeouts={"quick_sync": 1.0}), tools=[parked, quick_sync]
    )
    try:
        async with Client(app) as client, anyio.create_task_group() as tg:
            release.set()
            assert text_of(await client.call_tool("parked", {})) == "parked"  # its entry now runs the stand-in
            await wait_entered()
            release.clear()
            for _ in range(2):
                tg.start_soon(app.call_tool, "parked", {})
                await wait_entered()
            pool = sessions._tool_threads
            assert pool is not None and pool.borrowed_tokens == 0
            with anyio.fail_after(1.5):
                result = await client.call_tool("quick_sync", {})
            assert text_of(result) == "quick", text_of(result)
            release.set()
    finally:
        release.set()


def start_calls(tg: TaskGroup, client: Client, tool: str, calls: int, results: list[CallToolResult]) -> None:
    """Start `calls` calls of `tool` at once in `tg`, each adding its result to `results`."""

    async def call() -> None:
        results.append(await client.call_tool(tool, {}))

    for _ in range(calls):
        tg.start_soon(call)


@pytest.mark.parametrize("when", ["at-start", "after-a-reload"])
async def test_every_admitted_sync_call_gets_a_thread_at_once_past_anyios_default_limiter(when: str) -> None:
    # anyio's default limiter has 40 tokens. Calls admitted past them used to wait for a thread
    # with their deadline running: 100 calls of 1.5 s under a 2 s deadline, 56 timed out and
    # left their threads stuck. Here every call must be in its thread at once to pass the barrier.
    calls = int(anyio.to_thread.current_default_thread_limiter().total_tokens) + 5
    together = threading.Barrier(calls)

    def meet() -> str:
        together.wait(timeout=5)  # BrokenBarrierError (a tool error) unless all are in at once
        return "met"

    first = settings(max_concurrent_sessions=calls if when == "at-start" else 1, tool_timeouts={"meet": 20.0})
    app, sessions = build(first, tools=[meet])
    results: list[CallToolResult] = []
    async with Client(app) as client:
        if when == "after-a-reload":
            sessions.apply_settings(settings(max_concurrent_sessions=calls, tool_timeouts={"meet": 20.0}))
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                start_calls(tg, client, "meet", calls, results)
    assert [text_of(result) for result in results] == ["met"] * calls


class _Gate(Extension):
    """An inner interceptor that holds each call, admitted, until `opened` is set."""

    identifier = "io.github.mcp-session-manager/test-gate"

    def __init__(self) -> None:
        self.opened = anyio.Event()

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        await self.opened.wait()
        return await call_next(ctx)


async def test_calls_admitted_before_a_reload_lowers_the_cap_still_get_their_threads_at_once() -> None:
    # Running sessions keep their limits: the calls admitted before the cap went down to 1 must
    # each get a thread at once (all five meet at the barrier), not one at a time.
    calls = 5
    together = threading.Barrier(calls)

    def meet() -> str:
        together.wait(timeout=5)  # BrokenBarrierError (a tool error) unless all are in at once
        return "met"

    sessions = SessionsExtension(settings(max_concurrent_sessions=calls, tool_timeouts={"meet": 20.0}))
    gate = _Gate()
    app: MCPServer[Any] = MCPServer("t", extensions=[sessions, gate], lifespan=sessions.lifespan)
    app.add_tool(meet)
    results: list[CallToolResult] = []
    async with Client(app) as client:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                start_calls(tg, client, "meet", calls, results)
                await until(lambda: sessions.manager.metrics().active_sessions == calls)
                sessions.apply_settings(settings(max_concurrent_sessions=1, tool_timeouts={"meet": 20.0}))
                gate.opened.set()
    assert [text_of(result) for result in results] == ["met"] * calls


class _RetryOnce(Extension):
    """An inner interceptor that runs the call again when its first attempt is an error result."""

    identifier = "io.github.mcp-session-manager/test-retry-once"

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        result = await call_next(ctx)
        return await call_next(ctx) if getattr(result, "is_error", False) else result


async def test_a_call_retried_by_an_inner_interceptor_gets_a_thread_at_once_each_time() -> None:
    # Every thread of anyio's default limiter is taken (by the host's own work): each attempt of
    # an admitted call must still get its thread at once, from the extension's limiter.
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    sessions = SessionsExtension(settings(tool_timeouts={"flaky": 2.0}))
    app: MCPServer[Any] = MCPServer("t", extensions=[sessions, _RetryOnce()], lifespan=sessions.lifespan)
    app.add_tool(flaky)
    default = anyio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(default.total_tokens))]
    for holder in holders:
        default.acquire_on_behalf_of_nowait(holder)
    try:
        async with Client(app) as client:
            with anyio.fail_after(5):
                result = await client.call_tool("flaky", {})
    finally:
        for holder in holders:
            default.release_on_behalf_of(holder)
    assert (text_of(result), attempts) == ("ok", [0, 1]), text_of(result)


#: Holds `stuck_resolver` in its thread until set (module level: the SDK evaluates a tool's and
#: a resolver's annotations from their module).
_resolver_release = threading.Event()


def stuck_resolver() -> int:
    _resolver_release.wait(timeout=60)  # bounded: a failing test cannot leave it behind for good
    return 1


async def resolved_async(n: Annotated[int, Resolve(stuck_resolver)]) -> str:
    return f"resolved {n}"


async def test_an_async_tool_whose_resolver_hangs_in_a_thread_still_times_out() -> None:
    # The SDK runs a sync resolver in a thread wait that no cancellation reaches, before the
    # tool body runs, even for an async tool: the caller must still get `timeout` on time.
    _resolver_release.clear()
    app, sessions = build(settings(tool_timeouts={"resolved_async": 0.2}), tools=[resolved_async])
    try:
        async with Client(app) as client:
            with anyio.fail_after(2):
                assert code_of(await client.call_tool("resolved_async", {})) == "timeout"
            assert (await metrics(client))["abandoned_threads"] == 1
            _resolver_release.set()
            with anyio.fail_after(5):
                await sessions.manager.wait_no_abandoned_threads()
                # The resolver returns at once now: the next call completes.
                assert text_of(await client.call_tool("resolved_async", {})) == "resolved 1"
    finally:
        _resolver_release.set()


async def resolved_hang(n: Annotated[int, Resolve(_one)]) -> str:
    await anyio.sleep(3600)
    return f"woke {n}"


async def test_a_decoupled_async_tool_past_its_deadline_is_cancelled_not_abandoned() -> None:
    # Run decoupled (a resolver fills a parameter), but it is async and the cancellation
    # reaches it: no thread is left behind, and the message says so.
    app, sessions = build(settings(tool_timeouts={"resolved_hang": 0.2}), tools=[resolved_hang])
    async with Client(app) as client:
        with anyio.fail_after(5):
            result = await client.call_tool("resolved_hang", {})
            await sessions.manager.wait_no_abandoned_threads()
    assert code_of(result) == "timeout"
    assert "was cancelled" in text_of(result) and "abandoned" not in text_of(result)


class _InTaskGroup(Extension):
    """An inner interceptor that runs the rest of the call in a task of its own."""

    identifier = "io.github.mcp-session-manager/test-in-task-group"

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        out: dict[str, HandlerResult] = {}

        async def run() -> None:
            out["result"] = await call_next(ctx)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
        return out["result"]


async def test_a_decoupled_sync_tool_stuck_in_a_thread_a_child_task_holds_is_counted_and_lent_a_token() -> None:
    # The thread's limiter token is held by a task the call's work started (an inner
    # interceptor's), not by the work's own task: the call is still stuck in a thread.
    release = threading.Event()

    def stuck_resolved(n: Annotated[int, Resolve(_one)]) -> str:
        release.wait(timeout=60)  # bounded: a failing test cannot leave it behind for good
        return f"unstuck {n}"

    sessions = SessionsExtension(settings(tool_timeouts={"stuck_resolved": 0.3}))
    app: MCPServer[Any] = MCPServer("t", extensions=[sessions, _InTaskGroup()], lifespan=sessions.lifespan)
    app.add_tool(stuck_resolved)
    try:
        with thread_limiter(TOKENS) as limiter:
            async with Client(app) as client:
                with anyio.fail_after(5):
                    result = await client.call_tool("stuck_resolved", {})
                stuck_then = sessions.manager.metrics().abandoned_threads
                lent = limiter.total_tokens
                release.set()
                with anyio.fail_after(5):
                    await sessions.manager.wait_no_abandoned_threads()
                returned = limiter.total_tokens
    finally:
        release.set()
    assert code_of(result) == "timeout" and "abandoned" in text_of(result), text_of(result)
    assert (stuck_then, lent, returned) == (1, TOKENS + 1, TOKENS)


async def test_a_sync_tool_left_running_in_a_child_tasks_thread_is_called_abandoned_in_its_timeout() -> None:
    # The stand-in runs in a task an inner interceptor started: what it notes of its thread must
    # reach the caller's timeout message, not stay in the child task's copy of the context.
    release = threading.Event()
    sessions = SessionsExtension(settings(tool_timeouts={"stuck": 0.2}))
    app: MCPServer[Any] = MCPServer("t", extensions=[sessions, _InTaskGroup()], lifespan=sessions.lifespan)
    for tool in stuck_tools(release):
        app.add_tool(tool)
    try:
        async with Client(app) as client:
            with anyio.fail_after(5):
                result = await client.call_tool("stuck", {})
                echoed = await client.call_tool("echo_async", {"text": "after"})
            stuck_then = sessions.manager.metrics().abandoned_threads
            release.set()
            with anyio.fail_after(5):
                await sessions.manager.wait_no_abandoned_threads()
    finally:
        release.set()
    assert code_of(result) == "timeout" and "was abandoned: its thread runs on" in text_of(result), text_of(result)
    assert stuck_then == 1
    assert not echoed.is_error


async def test_past_the_bound_sync_tools_are_refused_at_once_and_served_again_later() -> None:
    release = threading.Event()
    config = settings(tool_timeouts={"stuck": 0.2, "quick_sync": 2.0}, max_abandoned_threads=2)
    app, sessions = build(config, tools=stuck_tools(release))
    try:
        with thread_limiter(TOKENS):
            async with Client(app) as client:
                for _ in range(2):
                    assert code_of(await client.call_tool("stuck", {})) == "timeout"
                with anyio.fail_after(1.5):  # refused at once, not after its 2.0 s timeout
                    refused = await client.call_tool("quick_sync", {})
                assert code_of(refused) == "capacity_exceeded"
                assert "stuck" in text_of(refused) and "2" in text_of(refused)
                assert text_of(refused).endswith(
                    "sync tools are refused until they end: retry later (async tools are still served), "
                    "or ask the operator to raise limits.max_abandoned_threads"
                ), "the refusal says what to do about it"
                # Async tools are still served: they need no thread.
                echo_result = await client.call_tool("echo_async", {"text": "async still served"})
                assert text_of(echo_result) == "async still served"
                m = await metrics(client)
                assert m["sessions_rejected_threads"] == 1
                assert m["max_abandoned_threads"] == 2 and m["abandoned_threads"] == 2
                assert m["total_sessions_created"] == 3, "a refused call creates no session"
                release.set()
                with anyio.fail_after(5):
                    await sessions.manager.wait_no_abandoned_threads()
                assert text_of(await client.call_tool("quick_sync", {})) == "quick"
    finally:
        release.set()


async def test_with_no_stuck_thread_allowed_sync_tools_are_refused_saying_retrying_will_not_help() -> None:
    release = threading.Event()
    release.set()
    app, _ = build(settings(max_abandoned_threads=0), tools=stuck_tools(release))
    async with Client(app) as client:
        refused = await client.call_tool("quick_sync", {})
        served = await client.call_tool("echo_async", {"text": "async"})
        m = await metrics(client)
    assert code_of(refused) == "capacity_exceeded", refused
    assert text_of(refused) == (
        "sync tools are turned off on this server (limits.max_abandoned_threads is 0): retrying will not help "
        "(async tools are still served); ask the operator to set limits.max_abandoned_threads to 1 or more"
    )
    assert text_of(served) == "async"
    assert (m["sessions_rejected_threads"], m["abandoned_threads"]) == (1, 0)


async def test_the_bound_gates_admission_only_so_sync_calls_already_running_can_all_be_left_stuck() -> None:
    # What the README states: limits.max_abandoned_threads refuses new sync calls; the calls
    # admitted while fewer threads were stuck each leave their thread at their deadline.
    release = threading.Event()
    config = settings(tool_timeouts={"stuck": 1.0}, max_abandoned_threads=2)
    app, sessions = build(config, tools=stuck_tools(release))
    results: list[str] = []

    async def call_stuck(client: Client) -> None:
        results.append(code_of(await client.call_tool("stuck", {})))

    try:
        async with Client(app) as client:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(call_stuck, client)
                    await until(lambda: sessions.manager.metrics().active_sessions == 4)
                    assert sessions.manager.metrics().abandoned_threads == 0, "all four admitted in time"
            refused = await client.call_tool("quick_sync", {})
            m = await metrics(client)
            release.set()
            with anyio.fail_after(5):
                await sessions.manager.wait_no_abandoned_threads()
    finally:
        release.set()
    assert results == ["timeout"] * 4
    assert (m["abandoned_threads"], m["max_abandoned_threads"]) == (4, 2), "the bound was passed by the calls in flight"
    assert code_of(refused) == "capacity_exceeded" and text_of(refused).startswith("4 threads are stuck")
    assert m["sessions_rejected_threads"] == 1


def start_work(call_next: Callable[[Any, Any], Awaitable[str]]) -> tuple[SessionsExtension, _Work]:
    """A sync call's work as the extension starts it, with `call_next` standing in for the
    SDK's handler (the one that would start the thread); its task has not run yet."""
    sessions = SessionsExtension(Settings())
    session = sessions.manager.open_call("block_sync", 30.0, None, True, None)
    assert session is not None
    loop = asyncio.get_running_loop()
    work = _Work(session, loop.create_future())
    work.task = loop.create_task(sessions._run(work, None, None, call_next))  # type: ignore[arg-type]
    sessions._works[work.task] = work
    return sessions, work


async def test_a_sync_call_stopped_before_its_work_starts_never_runs_the_tool() -> None:
    # The caller can give up (a client cancel, a deadline of nearly nothing) in the same loop
    # turn that created the work's task: then the tool is not started in a thread at all.
    called: list[object] = []

    async def call_next(ctx: Any, params: Any) -> str:
        called.append(ctx)
        return "ran"

    sessions, work = start_work(call_next)
    work.cancel()  # before the task's first step
    assert work.task is not None
    with anyio.fail_after(5):
        await work.task
    assert called == [] and work.done and work.cancelled and work.raised is None
    assert work.wake.done() and work.task not in sessions._works


async def test_a_sync_call_whose_thread_returns_after_a_stop_keeps_its_result() -> None:
    # Lifespan exit stops every running work; one whose thread still returns in time (its wait
    # is shielded, as the SDK's thread wait is) has a real result, which must not be lost.
    in_thread, thread_returns = anyio.Event(), anyio.Event()

    async def call_next(ctx: Any, params: Any) -> str:
        with anyio.CancelScope(shield=True):  # what anyio.to_thread.run_sync does around its wait
            in_thread.set()
            await thread_returns.wait()
        return "ran"

    _, work = start_work(call_next)
    assert work.task is not None
    with anyio.fail_after(5):
        await in_thread.wait()
        work.stop()
        thread_returns.set()
        await work.task
    assert work.done and not work.cancelled and work.raised is None
    assert work.result == "ran"  # type: ignore[comparison-overlap]  # call_next here returns a str


async def test_threads_an_async_tool_starts_itself_answer_on_time_but_are_not_counted_as_abandoned() -> None:
    # What the README's table says: only the SDK's sync-tool threads are tracked. An async tool
    # that hands blocking work to a thread of its own times out on time, and its thread runs on
    # without a count (or a bound).
    release = threading.Event()
    entered = threading.Semaphore(0)

    def blocking() -> str:
        entered.release()
        release.wait(timeout=60)
        return "unstuck"

    async def via_asyncio_to_thread() -> str:
        return await asyncio.to_thread(blocking)

    async def via_anyio_abandoning() -> str:
        return await anyio.to_thread.run_sync(blocking, abandon_on_cancel=True)

    timeouts = {"via_asyncio_to_thread": 0.2, "via_anyio_abandoning": 0.2}
    app, sessions = build(settings(tool_timeouts=timeouts), tools=[via_asyncio_to_thread, via_anyio_abandoning])
    try:
        async with Client(app) as client:
            with anyio.fail_after(5):  # on time: not when the threads return (they never do here)
                results = [await client.call_tool(name, {}) for name in timeouts]
            m = await metrics(client)
    finally:
        release.set()
    assert [code_of(r) for r in results] == ["timeout", "timeout"]
    assert all("was cancelled" in text_of(r) for r in results)
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5), "both threads ran"
    assert m["abandoned_threads"] == 0 and m["total_sessions_timeout"] == 2


async def test_a_sync_tool_whose_thread_returned_as_its_deadline_passed_says_its_late_result_was_discarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The thread ran the tool to its end, but its result had not reached the event loop when the
    # deadline cancelled the wait (under GIL contention, or a held loop, the hand-over lags): the
    # work was done, so the answer must not say "was cancelled", which invites a retry of work
    # that a non-idempotent tool has already done. Made deterministic by holding the worker thread
    # between the end of the work and the hand-over of its result until the answer has come.
    handed_over = threading.Event()
    real_thread_returns = threads._thread_returns

    def thread_returns_then_waits(*args: Any) -> bool:
        abandoned = real_thread_returns(*args)
        handed_over.wait(10)  # bounded: a failing test cannot leave the thread behind for good
        return abandoned

    monkeypatch.setattr(threads, "_thread_returns", thread_returns_then_waits)
    ran: list[str] = []

    def books_a_flight() -> str:
        ran.append("booked")
        return "booked"

    app, _ = build(settings(tool_timeouts={"books_a_flight": 0.3}), tools=[books_a_flight])
    try:
        async with Client(app) as client:
            with anyio.fail_after(10):
                result = await client.call_tool("books_a_flight", {})
            m = await metrics(client)
    finally:
        handed_over.set()
    assert ran == ["booked"]
    assert code_of(result) == "timeout", result
    assert text_of(result).startswith(
        "tool 'books_a_flight' did not finish within its deadline of 0.3s and its late result was discarded;"
    ), text_of(result)
    assert (m["total_sessions_timeout"], m["abandoned_threads"]) == (1, 0), "its thread was not left running"
