"""server.deadline: a call's deadline scope, built only when it is cancelled.

Every case runs twice: on `LateScope` (the scope spliced into anyio's tree at cancel time)
and on a plain `anyio.CancelScope` (the fallback, and the behaviour to match). Both must
behave as a `with anyio.CancelScope()` block around the same code would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from server import deadline as deadline_module
from server.deadline import Deadline, LateScope

Enter = Callable[[], Deadline]
Cancelled = asyncio.CancelledError  # the asyncio backend: what anyio.get_cancelled_exc_class() returns


@pytest.fixture(params=[LateScope, anyio.CancelScope], ids=["late", "plain"])
def enter(request: pytest.FixtureRequest) -> Enter:
    factory: Enter = request.param
    return factory


async def guarded(enter: Enter, body: Callable[[], Awaitable[str]], box: dict[str, Any]) -> str:
    """Run `body` inside a deadline the way the extension does; "cancelled" if it swallowed one."""
    with enter() as deadline:
        box["deadline"] = deadline
        return await body()
    return "cancelled"


def hangs(started: anyio.Event) -> Callable[[], Awaitable[str]]:
    """A body that sets `started`, then waits far longer than any test runs."""

    async def body() -> str:
        started.set()
        await anyio.sleep(30)
        return "done"

    return body


async def spin(times: int = 20) -> None:
    """Let other tasks (and anyio's cancellation retries) run, a bounded number of loop turns."""
    for _ in range(times):
        await anyio.lowlevel.checkpoint()


async def run_and_cancel(enter: Enter, body: Callable[[], Awaitable[str]], started: anyio.Event) -> dict[str, Any]:
    """Start `body` in a task, cancel its deadline once `started` is set, return what happened."""
    box: dict[str, Any] = {}

    async def run() -> None:
        box["effective_deadline_before"] = anyio.current_effective_deadline()
        box["out"] = await guarded(enter, body, box)
        # The scope tree is whole again: nothing is still cancelled, and scopes nest as before.
        await anyio.lowlevel.checkpoint()
        with anyio.CancelScope() as after:
            await anyio.lowlevel.checkpoint()
        box["after_ok"] = not after.cancel_called
        box["effective_deadline"] = anyio.current_effective_deadline()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            box["deadline"].cancel()
    return box


def test_anyio_has_the_shape_it_splices_into() -> None:
    # Where this fails (a new anyio), deadline_scope falls back to plain scopes: still correct,
    # only slower. Update LateScope, or pin anyio below the version that changed.
    assert deadline_module.available()
    assert deadline_module.deadline_scope == LateScope


async def test_without_cancel_the_body_runs_to_its_end_and_nothing_is_built(enter: Enter) -> None:
    box: dict[str, Any] = {}

    async def body() -> str:
        await anyio.lowlevel.checkpoint()
        return "done"

    assert await guarded(enter, body, box) == "done"
    if isinstance(box["deadline"], LateScope):
        assert box["deadline"].scope is None  # the point of it: no scope unless cancelled
    assert not box["deadline"].cancel_called
    await anyio.lowlevel.checkpoint()


async def test_cancel_while_the_body_waits_directly_inside(enter: Enter) -> None:
    started = anyio.Event()

    body = hangs(started)

    box = await run_and_cancel(enter, body, started)
    assert box["out"] == "cancelled" and box["after_ok"] and box["deadline"].cancel_called
    assert box["effective_deadline"] == box["effective_deadline_before"]  # back under the same scopes


async def test_cancel_reaches_a_body_waiting_inside_its_own_nested_scopes(enter: Enter) -> None:
    started = anyio.Event()
    reached: list[str] = []

    async def body() -> str:
        with anyio.CancelScope():
            with anyio.move_on_after(60) as inner:
                started.set()
                try:
                    await anyio.sleep(30)
                except Cancelled:
                    reached.append("inner")
                    raise
        reached.append(f"after inner, caught={inner.cancelled_caught}")  # must not be reached
        await anyio.sleep(30)
        return "done"

    box = await run_and_cancel(enter, body, started)
    assert box["out"] == "cancelled" and box["after_ok"]
    assert reached == ["inner"]  # the inner scopes let the cancellation through, none caught it


async def test_cancel_reaches_every_task_of_a_task_group_in_the_body(enter: Enter) -> None:
    started = anyio.Event()
    children_cancelled: list[int] = []
    children_started = 0

    async def child(i: int) -> None:
        nonlocal children_started
        children_started += 1
        if children_started == 3:
            started.set()
        try:
            await anyio.sleep(30)
        except Cancelled:
            children_cancelled.append(i)
            raise

    async def body() -> str:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(child, i)
        return "done"

    box = await run_and_cancel(enter, body, started)
    assert box["out"] == "cancelled" and box["after_ok"]
    assert sorted(children_cancelled) == [0, 1, 2]


async def test_a_shield_in_the_body_holds_the_cancellation_off_until_it_ends(enter: Enter) -> None:
    started = anyio.Event()
    finish_shielded = anyio.Event()
    steps: list[str] = []

    async def body() -> str:
        with anyio.CancelScope(shield=True):
            started.set()
            await finish_shielded.wait()
            steps.append("shielded part finished")
        try:
            await anyio.sleep(30)
        except Cancelled:
            steps.append("cancelled after the shield")
            raise
        return "done"

    box: dict[str, Any] = {}

    async def run() -> None:
        box["out"] = await guarded(enter, body, box)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            box["deadline"].cancel()
            await spin()
            assert steps == [] and "out" not in box  # the shield holds
            finish_shielded.set()
    assert steps == ["shielded part finished", "cancelled after the shield"]
    assert box["out"] == "cancelled"


async def test_a_body_that_swallows_the_cancellation_returns_its_value(enter: Enter) -> None:
    started = anyio.Event()

    async def body() -> str:
        started.set()
        try:
            await anyio.sleep(30)
        except Cancelled:
            return "caught"
        return "done"

    box = await run_and_cancel(enter, body, started)
    assert box["out"] == "caught" and box["after_ok"] and box["deadline"].cancel_called


async def test_cancel_called_by_the_body_itself_lands_at_its_next_wait(enter: Enter) -> None:
    box: dict[str, Any] = {}
    steps: list[str] = []

    async def body() -> str:
        box["deadline"].cancel()
        steps.append("still running")  # a cancel never interrupts code between two waits
        await anyio.sleep(30)
        return "done"

    with anyio.fail_after(5):
        assert await guarded(enter, body, box) == "cancelled"
    assert steps == ["still running"]
    await anyio.lowlevel.checkpoint()


async def test_an_enclosing_cancellation_is_not_swallowed(enter: Enter) -> None:
    started = anyio.Event()
    box: dict[str, Any] = {}

    body = hangs(started)

    async def run() -> None:
        with anyio.CancelScope() as outer:
            box["outer"] = outer
            box["out"] = await guarded(enter, body, box)
            box["reached"] = True  # must not be: the enclosing scope is cancelled too

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            box["deadline"].cancel()
            box["outer"].cancel()  # same loop turn: both are pending when the body wakes
    assert "out" not in box and "reached" not in box
    assert box["outer"].cancelled_caught


@pytest.mark.parametrize("native_first", [False, True], ids=["deadline-first", "native-first"])
async def test_a_native_task_cancel_is_not_swallowed(enter: Enter, native_first: bool) -> None:
    started = anyio.Event()
    box: dict[str, Any] = {}

    body = hangs(started)

    async def run() -> None:
        box["task"] = asyncio.current_task()
        try:
            box["out"] = await guarded(enter, body, box)
        except asyncio.CancelledError:
            box["native_cancel_seen"] = True
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            # Someone else's plain asyncio cancel, in the same loop turn as the deadline's.
            if native_first:
                box["task"].cancel()
                box["deadline"].cancel()
            else:
                box["deadline"].cancel()
                box["task"].cancel()
    assert box.get("native_cancel_seen") and "out" not in box


async def test_a_task_that_swallowed_a_native_cancel_earlier_still_swallows_its_deadline(enter: Enter) -> None:
    # An earlier plain asyncio cancel, caught without uncancel(), leaves cancelling() at 1; the
    # deadline's own cancellation must still end at its scope, as a plain scope entered then does.
    started = anyio.Event()
    box: dict[str, Any] = {}

    body = hangs(started)

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass
        assert task.cancelling() == 1
        box["out"] = await guarded(enter, body, box)

    task = asyncio.get_running_loop().create_task(run())  # a plain task: its cancelling() is its own
    with anyio.fail_after(5):
        await started.wait()
        box["deadline"].cancel()
        await task
    assert box["out"] == "cancelled"


async def test_a_plain_asyncio_task_that_never_entered_an_anyio_scope(enter: Enter) -> None:
    started = anyio.Event()
    box: dict[str, Any] = {}

    body = hangs(started)

    async def run() -> str:
        out = await guarded(enter, body, box)
        with anyio.CancelScope():  # the task's anyio state is whole afterwards
            await anyio.lowlevel.checkpoint()
        return out

    task = asyncio.get_running_loop().create_task(run())  # not an anyio task: no state yet
    with anyio.fail_after(5):
        await started.wait()
        box["deadline"].cancel()
        box["deadline"].cancel()  # a second cancel changes nothing
        assert await task == "cancelled"


async def test_cancel_after_the_task_ended_does_nothing(enter: Enter) -> None:
    box: dict[str, Any] = {}

    async def body() -> str:
        return "done"

    task = asyncio.get_running_loop().create_task(guarded(enter, body, box))
    with anyio.fail_after(5):
        assert await task == "done"
    box["deadline"].cancel()  # must not raise, nor touch the ended task's scopes
    if isinstance(box["deadline"], LateScope):
        assert box["deadline"].scope is None


@pytest.mark.parametrize("first", ["outer", "inner"])
async def test_nested_deadlines_of_one_task_keep_their_order(enter: Enter, first: str) -> None:
    # Two deadlines begun at the same place (as two extensions on one server would make): both
    # cancelled, in either order, each scope lands where its block is, and the outer one, whose
    # cancellation the inner one must not swallow, catches it.
    started = anyio.Event()
    box: dict[str, Any] = {}
    caught: list[str] = []
    body = hangs(started)

    async def run() -> None:
        with enter() as outer:
            box["outer"] = outer
            caught.append(await guarded(enter, body, box))  # box["deadline"]: the inner one
            await anyio.sleep(30)
            caught.append("not cancelled")
        caught.append("outer")
        with anyio.CancelScope():  # the task's scope tree is whole afterwards
            await anyio.lowlevel.checkpoint()
        box["after_ok"] = True

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            order = ["outer", "deadline"] if first == "outer" else ["deadline", "outer"]
            for name in order:
                box[name].cancel()
    assert caught == ["outer"] and box["after_ok"]


async def test_calling_a_late_scope_cancels_it() -> None:
    """The extension hands the scope itself on as the session's cancel callback."""
    started = anyio.Event()
    box: dict[str, Any] = {}
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                box["out"] = await guarded(LateScope, hangs(started), box)

            tg.start_soon(run)
            await started.wait()
            box["deadline"]()
    assert box["out"] == "cancelled" and box["deadline"].cancel_called


def _other_loop_inside_a_task(inside: threading.Event, release: threading.Event) -> None:
    """Run a loop in this thread whose task blocks (without awaiting) until `release` is set:
    meanwhile asyncio counts that task as running on its loop."""

    async def blocked() -> None:
        inside.set()
        release.wait(10)

    asyncio.run(blocked())


async def test_a_late_scope_notes_its_own_task_while_another_loop_runs_a_task() -> None:
    """With one loop running a task, the scope takes the task from asyncio's table of running
    tasks (no system call); with two, it must not take the other loop's."""
    assert LateScope()._task is asyncio.current_task()
    inside, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=_other_loop_inside_a_task, args=(inside, release))
    thread.start()
    try:
        assert await anyio.to_thread.run_sync(inside.wait, 10)
        assert LateScope()._task is asyncio.current_task()
    finally:
        release.set()
        await anyio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()


async def test_a_scope_tree_that_does_not_lead_back_to_the_base_is_logged_and_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken scope tree (here: the scope the LateScope began in was left first) is refused,
    and the log says the call runs past its deadline and what likely broke it."""
    with anyio.CancelScope():
        deadline = LateScope()
        await anyio.lowlevel.checkpoint()
    deadline.cancel()
    assert not deadline.cancel_called and deadline.scope is None
    assert [r.getMessage() for r in caplog.records if r.name == "server.deadline"] == [
        "cannot cancel a tool call: its task's cancel scopes do not lead back to where the call began, so the "
        "call runs on past its deadline; the likely cause is an anyio version other than the ones this server "
        "was tested with (see the anyio pin in its pyproject.toml)"
    ]
