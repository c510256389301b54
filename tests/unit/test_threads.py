"""`server.threads`: a sync tool's function run in a worker thread whose wait a cancellation
ends; the thread left running is reported once when abandoned and once when it returns."""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any

import anyio
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Resolve
from pydantic import BaseModel, ConfigDict

from server.threads import (
    _ABANDONED,
    _RETURNED,
    ORIGINAL_ATTRIBUTE,
    _caller_leaves,
    _thread_begins,
    _thread_returns,
    cancellable,
    make_cancellable,
    runs_in_thread,
)

#: Bound on every wait for a thread here; the threads themselves wait at most this long too.
WAIT = 5.0


class Reports:
    """What a stand-in reported, and on which thread; `returned` wakes a waiting test."""

    def __init__(self) -> None:
        self.abandoned = 0
        self.returned = 0
        self.threads: set[int] = set()
        self._changed = anyio.Event()

    def on_abandoned(self) -> None:
        self.abandoned += 1
        self.threads.add(threading.get_ident())

    def on_returned(self) -> None:
        self.returned += 1
        self.threads.add(threading.get_ident())
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_returned(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while self.returned < count:
                await self._changed.wait()


def _one() -> int:
    return 1


def sync_tool(text: str) -> str:
    """Echoes `text`."""
    return text


async def async_tool(text: str) -> str:
    return text


def resolved_tool(n: Annotated[int, Resolve(_one)]) -> int:
    return n


def registry_entry(fn: Any) -> Any:
    server = MCPServer("threads")
    server.add_tool(fn)
    return server._tool_manager.get_tool(fn.__name__)


def test_a_sync_tool_entry_is_made_cancellable_once() -> None:
    reports = Reports()
    tool = registry_entry(sync_tool)
    assert runs_in_thread(tool) and not tool.is_async

    assert make_cancellable(tool, reports.on_abandoned, reports.on_returned)
    stand_in = tool.fn
    assert tool.is_async and getattr(stand_in, ORIGINAL_ATTRIBUTE) is sync_tool
    assert stand_in.__name__ == "sync_tool" and stand_in.__doc__ == sync_tool.__doc__
    assert runs_in_thread(tool), "still a sync tool: it needs a thread"

    assert make_cancellable(tool, reports.on_abandoned, reports.on_returned)
    assert tool.fn is stand_in, "not wrapped twice"


@pytest.mark.parametrize("fn", [async_tool, resolved_tool], ids=["async", "resolver-filled"])
def test_entries_it_does_not_apply_to_are_left_alone(fn: Any) -> None:
    tool = registry_entry(fn)
    before = (tool.fn, tool.is_async)
    assert not make_cancellable(tool, lambda: None, lambda: None)
    assert (tool.fn, tool.is_async) == before


def test_an_entry_that_refuses_the_change_is_left_alone() -> None:
    class Frozen(BaseModel):
        model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
        fn: Any
        is_async: bool

    tool = Frozen(fn=sync_tool, is_async=False)
    assert not make_cancellable(tool, lambda: None, lambda: None)
    assert tool.fn is sync_tool and tool.is_async is False
    assert not make_cancellable(object(), lambda: None, lambda: None), "no fn: nothing to run"


async def test_the_stand_in_returns_and_raises_what_the_function_does() -> None:
    reports = Reports()
    caller = threading.get_ident()
    ran_in: list[int] = []

    def work(value: int) -> int:
        ran_in.append(threading.get_ident())
        if value < 0:
            raise ValueError("negative")
        return value * 2

    stand_in = cancellable(work, reports.on_abandoned, reports.on_returned)
    assert await stand_in(value=21) == 42
    with pytest.raises(ValueError, match="negative"):
        await stand_in(value=-1)
    assert len(ran_in) == 2 and caller not in ran_in, "the function runs in a worker thread"
    assert (reports.abandoned, reports.returned) == (0, 0)


async def test_a_generator_exit_from_the_thread_is_the_tools_error_not_the_callers_close() -> None:
    # Thrown as it is into the waiting coroutine, GeneratorExit ends the caller's whole task
    # ("coroutine ignored GeneratorExit"); the stand-in turns it into an ordinary error.
    def exits() -> None:
        raise GeneratorExit

    stand_in = cancellable(exits, lambda: None, lambda: None)
    with pytest.raises(RuntimeError, match="'exits' raised GeneratorExit") as raised:
        await stand_in()
    assert isinstance(raised.value.__cause__, GeneratorExit)
    await anyio.lowlevel.checkpoint()  # the caller's task goes on


async def test_a_cancellation_ends_the_wait_and_the_thread_is_reported_until_it_returns() -> None:
    reports = Reports()
    started, release = threading.Event(), threading.Event()

    def stuck() -> str:
        started.set()
        release.wait(WAIT)
        return "late"

    stand_in = cancellable(stuck, reports.on_abandoned, reports.on_returned)
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stand_in)
                await anyio.to_thread.run_sync(started.wait, WAIT)
                tg.cancel_scope.cancel()  # the wait ends now, with the thread still in `stuck`
        assert (reports.abandoned, reports.returned) == (1, 0)
    finally:
        release.set()
    await reports.wait_returned(1)
    assert (reports.abandoned, reports.returned) == (1, 1)
    assert reports.threads == {threading.get_ident()}, "both reports come on the event loop's thread"


async def test_a_call_cancelled_before_its_thread_begins_never_runs_the_function() -> None:
    reports = Reports()
    ran: list[int] = []
    stand_in = cancellable(lambda: ran.append(1), reports.on_abandoned, reports.on_returned)

    with anyio.CancelScope() as scope:
        scope.cancel()
        await stand_in()
    assert scope.cancelled_caught
    await anyio.to_thread.run_sync(lambda: None)  # a worker thread has had its turn since
    assert ran == [] and (reports.abandoned, reports.returned) == (0, 0)


async def test_the_thread_and_its_caller_agree_in_every_order() -> None:
    # The orders the race can take, step by step: who goes first decides, once.
    loop = asyncio.get_running_loop()
    left_first: dict[str, Any] = {}
    assert _caller_leaves(left_first, loop) is None, "not begun: nothing is abandoned"
    assert not _thread_begins(left_first), "the caller has left: the work never begins"

    abandoned: dict[str, Any] = {}
    assert _thread_begins(abandoned)
    assert _caller_leaves(abandoned, loop) == _ABANDONED, "left while the work runs: abandoned"
    assert _thread_returns(abandoned), "so its return is reported"
    assert abandoned["loop"] is loop

    returned_first: dict[str, Any] = {}
    assert _thread_begins(returned_first)
    assert not _thread_returns(returned_first), "returned with its caller waiting: nothing to report"
    assert _caller_leaves(returned_first, loop) == _RETURNED, "the work is over, its result lost: not abandoned"

    raised_first: dict[str, Any] = {}
    assert _thread_begins(raised_first)
    assert not _thread_returns(raised_first, "raised")
    assert _caller_leaves(raised_first, loop) is None, "the work failed: no result was lost"


async def test_each_thread_that_began_is_reported_abandoned_and_returned_exactly_once() -> None:
    # Cancel calls at different points around the hand-over to the worker thread (before it is
    # queued, right after, while it runs): whichever side wins each race, a function that
    # began is abandoned and later returned once each, and one that did not begin never runs.
    reports = Reports()
    release = threading.Event()
    began = 0
    lock = threading.Lock()
    beginning = threading.Semaphore(0)

    def stuck() -> None:
        nonlocal began
        with lock:
            began += 1
        beginning.release()
        release.wait(WAIT)

    stand_in = cancellable(stuck, reports.on_abandoned, reports.on_returned)
    try:
        with anyio.fail_after(WAIT):
            for i in range(120):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stand_in)
                    if i % 8 == 7:  # surely running in its thread
                        assert await anyio.to_thread.run_sync(beginning.acquire, True, WAIT)
                    for _ in range(i % 8):
                        await anyio.lowlevel.checkpoint()
                    tg.cancel_scope.cancel()
    finally:
        release.set()
    await reports.wait_returned(reports.abandoned)
    with lock:
        assert began == reports.abandoned == reports.returned
    assert 0 < began < 120, "both outcomes occurred (else the race was not exercised)"
