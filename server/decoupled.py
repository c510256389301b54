"""Decoupled calls: a tool call whose work runs in a task of the extension's own, so that its
caller's wait ends at the deadline even when the work does not.

Tier: MCP integration (a base class of `server.extension.SessionsExtension`). The extension
runs a call this way when the call may be stuck in a thread no cancellation reaches (a tool
whose parameters resolvers fill, async or sync, or one of unknown kind: see
`SessionsExtension._plan_for`). The work runs in a plain asyncio task, in no task group, and
only the caller's wait is cancelled at the deadline: the caller gets its `timeout` result on
time, and work stuck in a thread is counted in `abandoned_threads` until the thread returns.
Such a thread keeps its token of anyio's default thread limiter, so the limiter is lent one
more token while it is stuck (`DecoupledCalls._give_up`). On lifespan exit the extension stops
the work still running and waits for it at most `WORK_EXIT_GRACE_SECONDS`
(`DecoupledCalls._stop_works`).
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

from server.deadline import Deadline, deadline_scope
from server.errors import describe
from server.outcomes import CANCELLED, MAYBE_ABANDONED, completed, failed, idle_advice, stopped
from server.sdk_seams import ToolCallHandler
from server.session import Session, SessionState
from server.sessions import SessionManager

#: How long lifespan exit waits for cancelled work to wind down before leaving stuck threads behind.
WORK_EXIT_GRACE_SECONDS = 2.0


@dataclass(slots=True, eq=False)
class _Work:
    """One tool call's work, running in a task of its own that the extension owns."""

    session: Session
    #: Resolved (with None) when the work ends or the caller must stop waiting, whichever is first.
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
    abandoned: bool = False

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
            if not work.done:
                # Woken by `work.cancel`, which stopped the work: one turn of the loop for it to
                # take its cancellation. Async work ends in it (cancelled, not abandoned); work
                # stuck in a thread does not.
                await asyncio.sleep(0)
        except anyio.get_cancelled_exc_class():
            # The client cancelled the request or went away, or the server is stopping.
            self.manager.end(session, SessionState.CANCELLED, "cancelled by the client")
            self._give_up(work, sync)
            raise
        finally:
            session.on_cancel = None  # nobody waits any more; and no cycle session -> work -> session

        if ran_to_end:
            return self._finish(work, name)
        self._give_up(work, sync)
        fate = MAYBE_ABANDONED if work.abandoned else CANCELLED
        return stopped(self.manager, session, name, fate, idle_advice(sync))

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

    def _give_up(self, work: _Work, sync: bool | None) -> None:
        """The caller stops waiting: cancel the work; count it if it stays stuck in a thread.

        A thread cannot be cancelled, so the work keeps its token of anyio's default thread
        limiter (which the SDK runs sync tools with) until the thread returns. Unanswered, enough
        stuck calls would hold every token and starve every later sync call; so each abandoned
        call lends the limiter one more token while it is stuck. `limits.max_abandoned_threads`
        bounds how many there can be (the manager refuses sync tools past it).
        """
        work.stop()
        if work.done or work.abandoned:
            return
        limiter = _thread_limiter()
        # A sync tool's work (or one of unknown kind) still running is stuck in a thread, which
        # may be held by a task the work started (an inner interceptor's task group). An async
        # tool's work is stuck in one only while its own task holds a token (the SDK runs sync
        # resolvers with `anyio.to_thread.run_sync` in it); otherwise its cancellation merely
        # takes longer (a shielded clean-up) on the event loop: neither counted nor lent a token.
        if sync is False and work.task not in limiter.statistics().borrowers:
            return
        work.abandoned = True
        limiter.total_tokens += 1
        self.manager.thread_abandoned()

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


def _thread_limiter() -> anyio.CapacityLimiter:
    return anyio.to_thread.current_default_thread_limiter()
