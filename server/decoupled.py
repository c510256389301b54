"""Decoupled calls: a tool call whose work runs in a task of the extension's own, so that its
caller's wait ends at the deadline even when the work does not.

Tier: MCP integration (a base class of `server.extension.SessionsExtension`). The extension
runs a call this way when the call may be stuck in a thread no cancellation reaches (a tool
whose parameters resolvers fill, async or sync, or one of unknown kind: see
`SessionsExtension._plan_for`). The work runs in a plain asyncio task, in no task group, and
at the deadline only the caller's wait ends (as it does when the client cancels the call, or at
shutdown's drain deadline). The work is told to stop and gets one turn of the loop to take it;
then `DecoupledCalls._wait_out` tells three cases apart. Work that ended is done with. Work stuck
in a thread (its task, or a task it started, holds a token of anyio's default thread limiter:
`_in_a_thread`) is abandoned: its caller is answered on time, and it is counted in
`abandoned_threads` until the thread returns; as its thread keeps its token, the limiter is lent
one more while it is stuck (`DecoupledCalls._give_up`). Work still running on the event loop
(async work holding its cancellation off with a shield) is waited for, as a call run in place
is: its session keeps its slot until the work stops (`DecoupledCalls._wait_for_work`). On
lifespan exit the extension stops the work still running and waits for it at most
`WORK_EXIT_GRACE_SECONDS` (`DecoupledCalls._stop_works`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from mcp.server.context import HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams

from server.deadline import Deadline, LateScope, deadline_scope
from server.errors import describe
from server.outcomes import CANCELLED, LATE, MAYBE_ABANDONED, completed, failed, idle_advice, stopped
from server.sdk_seams import ToolCallHandler
from server.session import Session, SessionState
from server.sessions import SessionManager

try:  # anyio's asyncio backend: its cancel scopes know the tasks running in them
    from anyio._backends import _asyncio as _anyio_asyncio
except ImportError:  # pragma: no cover - anyio without its asyncio backend
    _anyio_asyncio = None  # type: ignore[assignment]

#: How long lifespan exit waits for cancelled work to wind down before leaving stuck threads behind.
WORK_EXIT_GRACE_SECONDS = 2.0
#: How many of a work's cancel scopes `_tasks_under` looks into for the tasks it started.
MAX_SCOPES = 1000


@dataclass(slots=True, eq=False)
class _Work:
    """One tool call's work, running in a task of its own that the extension owns."""

    session: Session
    #: Resolved (with None) when the work ends or the caller must stop waiting, whichever is
    #: first; a new one for each wait of the caller's.
    wake: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    #: The work's deadline scope, entered by the work's task when it starts; cancelled when the
    #: caller stops waiting (deadline, shutdown) or the lifespan ends.
    scope: Deadline | None = None
    #: Set by `stop`: a work stopped before it starts never calls the tool.
    stopped: bool = False
    done: bool = False
    #: The work ended by its own cancellation (or never started): no result to give.
    cancelled: bool = False
    result: HandlerResult = None
    raised: BaseException | None = None
    #: Stuck in a thread when its caller stopped waiting: counted, and lent a thread token.
    abandoned: bool = False
    #: Left running by lifespan exit (`DecoupledCalls._stop_works`): its caller waits no more.
    left: bool = False

    def wake_caller(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def cancel(self) -> None:
        """The deadline passed, or shutdown reached its own: stop waiting, stop the work."""
        self.wake_caller()
        self.stop()

    def stop(self) -> None:
        """Cancel the work (an anyio cancel: a thread's shielded wait still holds its task)."""
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()


class DecoupledCalls:
    """The extension's decoupled calls: it runs one with `_call_decoupled`, and stops the ones
    still running with `_stop_works` when its last lifespan ends."""

    manager: SessionManager
    #: Decoupled work still running. Plain asyncio tasks, not tasks of an anyio task
    #: group: `start_soon` costs about 40 µs per call here, `create_task` about 5 µs.
    _works: dict[asyncio.Task[None], _Work]

    async def _call_decoupled(
        self,
        session: Session,
        name: str,
        ctx: ServerRequestContext[Any, Any],
        params: CallToolRequestParams,
        handler: ToolCallHandler,
        sync: bool | None,
    ) -> HandlerResult:
        """A call that may be stuck in a thread no cancellation reaches (see
        `SessionsExtension._plan_for`): the caller's wait ends at the deadline even if the work
        does not. `sync`: whether the tool is a sync one (None: unknown)."""
        loop = asyncio.get_running_loop()
        work = _Work(session, loop.create_future())
        session.on_cancel = work.cancel  # the manager's reaper calls it at the deadline
        work.task = task = loop.create_task(self._run(work, ctx, params, handler))
        self._works[task] = work  # until `_run` ends
        try:
            await work.wake
            ran_to_end = work.done and not work.cancelled  # (a late stop does not undo that)
            if not ran_to_end:
                # Woken by `work.cancel` (the deadline, or shutdown's), which stopped the work.
                await self._wait_out(work, sync)
        except anyio.get_cancelled_exc_class():
            # The client cancelled the request or went away, or the server is stopping: the work
            # is judged the same way, and the session ends once the caller stops waiting (in a
            # shield: as a call run in place, it waits while its work holds the cancellation off).
            with anyio.CancelScope(shield=True):
                await self._wait_out(work, sync)
            self.manager.end(session, SessionState.CANCELLED, "cancelled by the client")
            raise
        finally:
            session.on_cancel = None  # nobody waits any more; and no cycle session -> work -> session

        if ran_to_end:
            return self._finish(work, name)
        return self._stopped(work, name, sync)

    async def _wait_out(self, work: _Work, sync: bool | None) -> None:
        """The caller must stop waiting: stop the work, give it one turn of the loop to take its
        cancellation, then tell apart how it is doing.

        Work that ended is done with. Work stuck in a thread is abandoned (`_give_up`): the
        caller stops waiting now. Work still running on the event loop (async work holding the
        cancellation off: a shielded clean-up) is waited for, as the same tool run in place
        would be: its session keeps its slot until the work stops (`_wait_for_work`)."""
        work.stop()
        if not work.done:
            await asyncio.sleep(0)
        if not self._give_up(work, sync):
            await self._wait_for_work(work)
            # Left running (shutdown ended its session, lifespan exit gave up on it): abandoned
            # if it is in a thread by now (once: `_give_up` does nothing for abandoned work).
            self._give_up(work, sync)

    async def _wait_for_work(self, work: _Work) -> None:
        """Wait for the work to stop while its session still holds its slot: the reaper left its
        ending to this call. Shutdown ending the session at its drain deadline, or lifespan exit
        leaving the work behind (`_stop_works`), ends the wait, so neither waits on it for ever.

        A thread the work enters meanwhile (its shielded clean-up's `anyio.to_thread.run_sync`)
        is waited for too, as in place: such a thread is the tool's own, as an async tool's is."""
        session = work.session
        loop = asyncio.get_running_loop()
        while not work.done and not work.left and session.state is SessionState.ACTIVE:
            work.wake = wake = loop.create_future()
            session.on_cancel = work.wake_caller  # shutdown's end of the session calls it
            await wake

    async def _run(
        self, work: _Work, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams, handler: ToolCallHandler
    ) -> None:
        # A plain task, in no task group: whatever the tool raises (a GeneratorExit from its
        # thread included) ends here as the session's error and can fail nothing shared.
        deadline: Deadline | None = None
        try:
            if work.stopped:
                work.cancelled = True  # stopped before it began: the tool is not called at all
                return
            work.scope = deadline = deadline_scope()
            with deadline:
                work.result = await handler(ctx, params)
                return
            work.cancelled = True  # the block swallowed the deadline's (or a stop's) cancellation
        except BaseException as exc:  # noqa: BLE001 - any failure of the tool is the session's error
            if deadline is not None and deadline.cancel_called and isinstance(exc, anyio.get_cancelled_exc_class()):
                work.cancelled = True
            else:
                work.raised = exc
        finally:
            work.done = True
            work.wake_caller()
            del self._works[work.task]  # type: ignore[arg-type]  # set before the task first runs
            if work.abandoned:
                _thread_limiter().total_tokens -= 1  # its token is back: take the loan back
                self.manager.thread_ended()

    def _give_up(self, work: _Work, sync: bool | None) -> bool:
        """For a stopped work: False if it still runs on the event loop, True if it ended or is
        stuck in a thread, where it is abandoned: counted, and lent a thread token.

        A thread cannot be cancelled, so the work keeps its token of anyio's default thread
        limiter (which the SDK runs sync tools and sync resolvers with) until the thread returns.
        Unanswered, enough stuck calls would hold every token and starve every later sync call;
        so each abandoned call lends the limiter one more token while it is stuck.
        `limits.max_abandoned_threads` bounds how many there can be (the manager refuses sync
        tools past it).
        """
        if work.done or work.abandoned:
            return True
        if not _in_a_thread(work, sync):
            return False
        work.abandoned = True
        _thread_limiter().total_tokens += 1
        self.manager.thread_abandoned()
        return True

    def _stopped(self, work: _Work, name: str, sync: bool | None) -> HandlerResult:
        """The caller's answer for work that was stopped (it ended, or was left running)."""
        fate = MAYBE_ABANDONED if work.abandoned else CANCELLED
        if work.done and not work.cancelled and not work.abandoned:
            # It ended on its own after the stop, as a call run in place can (a shield in it).
            if work.raised is not None:
                return self._finish(work, name)
            result = work.result
            if result is not None and not getattr(result, "is_error", False):
                fate = LATE
        return stopped(self.manager, work.session, name, fate, idle_advice(sync))

    def _finish(self, work: _Work, name: str) -> HandlerResult:
        session = work.session
        raised = work.raised
        if raised is None:
            return completed(self.manager, session, name, work.result)
        if isinstance(raised, MCPError):
            # A protocol error the tool chose to raise stays a protocol error.
            self.manager.end(session, SessionState.ERROR, describe(raised))
            raise raised
        return failed(self.manager, session, name, raised)

    async def _stop_works(self) -> None:
        """Stop the work still running, and wait for it to end, at most `WORK_EXIT_GRACE_SECONDS`.

        Decoupled work runs in plain tasks, so that lifespan exit can leave a call stuck in a
        thread behind instead of waiting for it forever."""
        for work in self._works.values():
            work.stop()
        if self._works:
            await asyncio.wait(list(self._works), timeout=WORK_EXIT_GRACE_SECONDS)
        for work in self._works.values():  # left behind: a caller still waiting for it stops
            work.left = True
            work.wake_caller()


def _thread_limiter() -> anyio.CapacityLimiter:
    return anyio.to_thread.current_default_thread_limiter()


def _scope_tree_known() -> bool:
    """Whether anyio's cancel scopes have the shape `_tasks_under` reads (checked, not assumed):
    each scope's `_tasks` (the tasks running directly in it) and `_child_scopes` (the scopes
    entered in it, a task group's among them), the fields `server.deadline` splices into."""
    scope_class = getattr(_anyio_asyncio, "CancelScope", None)
    return all(name in getattr(scope_class, "__slots__", ()) for name in ("_tasks", "_child_scopes"))


#: Whether `_in_a_thread` can see the tasks a work started (else its fallback: see there).
_TASK_TREE = _scope_tree_known()


def _in_a_thread(work: _Work, sync: bool | None) -> bool:
    """Whether a stopped work's task, or a task it started, holds a token of anyio's default
    thread limiter: the work waits for a thread (a sync tool's, a sync resolver's) that no
    cancellation reaches. Read only when a work outlives its one turn past a stop: never on a
    call's way."""
    borrowers = _thread_limiter().statistics().borrowers
    if work.task in borrowers:
        return True
    if not borrowers:
        return False  # no thread of the limiter's runs at all
    scope = work.scope
    if scope is None:
        return False  # stopped before its handler began: no thread of its own
    if isinstance(scope, LateScope):
        scope = scope.scope  # the scope its stop spliced in, around all the work entered since
    if scope is None or not _TASK_TREE:
        # Where anyio's scopes have another shape (or the stop could not splice a scope in: see
        # `LateScope.cancel`), the tasks a work started (an inner interceptor's task group)
        # cannot be found: a sync tool (or one of unknown kind) is taken to be in a thread while
        # any thread runs, as the extension did before it looked; an async tool only when its
        # own task holds one.
        return sync is not False
    return not _tasks_under(scope).isdisjoint(borrowers)


def _tasks_under(root: Any) -> set[object]:
    """The tasks running in anyio scope `root` or in a scope entered within it: the work's own
    task and those its task groups started (each begins in its group's scope). Bounded by
    `MAX_SCOPES` scopes; the walk costs the work's own scopes, not every task's."""
    tasks: set[object] = set()
    stack = [root]
    for _ in range(MAX_SCOPES):
        if not stack:
            break
        scope = stack.pop()
        tasks.update(scope._tasks)
        stack.extend(scope._child_scopes)
    return tasks
