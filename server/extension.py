"""SessionsExtension: the `tools/call` interceptor that makes every call a tracked session.

Tier: MCP integration. An `mcp.server.extension.Extension` for any `MCPServer`: it contributes
the four session tools and wraps every other `tools/call` in a session with a deadline.

Every call's session is registered with the manager's reaper, which cancels the call's scope
at its deadline (one timer for all calls, not one per call). An async tool runs in place
inside that scope. For a sync tool the caller's wait and the work are decoupled: the work
runs as a task in a task group the extension owns, and only the caller's wait is cancelled.
So at the deadline the caller gets a `timeout` result on time even when the work is stuck in
a thread (which no cancellation reaches); such a thread is counted in `abandoned_threads`
until it really returns.

Example:
    ```python
    settings = load_settings("config/default.toml")
    sessions = SessionsExtension(settings)
    app = MCPServer("my-tools", extensions=[sessions], lifespan=sessions.lifespan)
    ```
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, ToolBinding
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams, CallToolResult, TextContent

from server.config import Settings
from server.errors import ERROR_META_KEY, EXTENSION_ID, ErrorCode, SessionError
from server.metrics import ShutdownReport
from server.sessions import Session, SessionManager, SessionState
from tools.sessions import MANAGEMENT_TOOLS, session_tool_bindings

logger = logging.getLogger(__name__)

#: How long lifespan exit waits for cancelled work to wind down before leaving stuck threads behind.
WORK_EXIT_GRACE_SECONDS = 2.0


def error_result(error: SessionError) -> CallToolResult:
    """A tool result for a refusal or failure: `isError`, a sentence, the code in `_meta`."""
    return CallToolResult(
        content=[TextContent(type="text", text=error.message)],
        is_error=True,
        _meta={ERROR_META_KEY: error.to_meta()},
    )


@dataclass(eq=False)
class _Work:
    """One tool call's work, running in a task of its own that the extension owns."""

    session: Session
    sync: bool | None
    #: Cancelled when the caller stops waiting (deadline, shutdown) or the lifespan ends.
    scope: anyio.CancelScope
    #: Resolved (with None) when the work ends or the caller must stop waiting, whichever is first.
    wake: asyncio.Future[None]
    done: bool = False
    result: HandlerResult = None
    raised: BaseException | None = None
    abandoned: bool = False

    def wake_caller(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)


class SessionsExtension(Extension):
    """Tracks every tool call as a session; adds `session_create`, `session_release`,
    `session_metrics` and `server_shutdown`.

    Wire `lifespan` into the server (`MCPServer(..., lifespan=sessions.lifespan)`, or enter
    `sessions.lifespan(app)` from your own lifespan): it runs the reaper and owns the tasks
    that do the tools' work. Until it runs, tool calls are refused with `not_running`.
    """

    identifier = EXTENSION_ID

    def __init__(self, settings: Settings | None = None, *, manager: SessionManager | None = None) -> None:
        self.config = settings if settings is not None else Settings()
        self.manager = manager if manager is not None else SessionManager(self.config.limits)
        self._task_group: TaskGroup | None = None
        self._app: Any = None
        #: The server's tool registry lookup (`name -> Tool | None`), None when it has none we know.
        self._get_tool: Callable[[str], Any] | None = None
        #: Makes a cancel scope: `anyio.CancelScope` until the lifespan runs, then the running
        #: backend's own class, which skips the per-call backend dispatch (and second
        #: `__init__`) of `anyio.CancelScope()`.
        self._new_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope
        self._exit_listeners: list[Callable[[ShutdownReport], None]] = []
        #: Work of sync tools still running. Plain asyncio tasks, not tasks of an anyio task
        #: group: `start_soon` costs about 40 us per call, `create_task` about 5 us.
        self._works: dict[asyncio.Task[None], _Work] = {}

    # -- Extension contributions -----------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        limits = self.config.limits
        return {
            "maxConcurrentSessions": limits.max_concurrent_sessions,
            "defaultTimeoutSeconds": limits.default_timeout_seconds,
        }

    def tools(self) -> Sequence[ToolBinding]:
        return session_tool_bindings(self)

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Start the session runtime for `app` (an `MCPServer`); stop it on exit.

        Usable as `MCPServer(lifespan=sessions.lifespan)` or nested in a host's own lifespan.
        """
        self._app = app
        self._get_tool = getattr(getattr(app, "_tool_manager", None), "get_tool", None)
        self._new_scope = type(anyio.CancelScope())
        ready = anyio.Event()
        stop = anyio.Event()

        async def own_work_tasks() -> None:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                ready.set()
                await stop.wait()
                tg.cancel_scope.cancel()
            for work in self._works.values():
                work.scope.cancel()  # an anyio cancel: a thread's shielded wait still holds its task
            while self._works:
                await asyncio.wait(list(self._works))

        async with self.manager.running():
            # The work's task group lives in its own task so that lifespan exit can leave a
            # sync tool stuck in a thread behind instead of waiting for it forever.
            owner = asyncio.ensure_future(own_work_tasks())
            await ready.wait()
            try:
                yield {"sessions": self}
            finally:
                self._task_group = None
                stop.set()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({owner}, timeout=WORK_EXIT_GRACE_SECONDS)
                if not owner.done():
                    logger.warning(
                        "Leaving %s stuck thread(s) behind: sync tools still running past their deadline",
                        self.manager.metrics().abandoned_threads,
                    )

    # -- shutdown --------------------------------------------------------------------------

    def add_exit_listener(self, listener: Callable[[ShutdownReport], None]) -> None:
        """Call `listener(report)` when a graceful shutdown has finished (the host then exits)."""
        self._exit_listeners.append(listener)

    async def shutdown(self, timeout_seconds: float | None = None) -> ShutdownReport:
        """Graceful shutdown: stop admitting, drain, cancel the rest, notify exit listeners."""
        timeout = self.config.shutdown.timeout_seconds if timeout_seconds is None else timeout_seconds
        report = await self.manager.shutdown(timeout)
        logger.info(
            "Shutdown finished in %.3fs: %s of %s session(s) finished, %s cancelled at the deadline",
            report.shutdown_duration,
            report.sessions_completed_during_shutdown,
            report.initial_active_sessions,
            report.sessions_cancelled_at_deadline,
        )
        for listener in self._exit_listeners:
            listener(report)
        return report

    # -- the interceptor -------------------------------------------------------------------

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        name = params.name
        if name in MANAGEMENT_TOOLS:
            if name == "session_create" and self._task_group is None:
                return self._not_running(name)  # nothing would expire the session
            return _with_invalid_argument_code(await call_next(ctx), name)
        # One registry lookup per call: whether the tool exists, and whether it runs in a thread.
        get_tool = self._get_tool
        sync: bool | None = None  # no registry to ask: it may run in a thread
        if get_tool is not None:
            tool = get_tool(name)
            if tool is None:
                return await call_next(ctx)  # the SDK answers "unknown tool"; no session for it
            sync = not getattr(tool, "is_async", True)
        task_group = self._task_group
        if task_group is None:
            return self._not_running(name)
        try:
            session = self.manager.create_nowait(
                tool=name,
                timeout_seconds=self.config.timeout_for(name),
                request_id=None if ctx.request_id is None else str(ctx.request_id),
            )
        except SessionError as exc:
            return error_result(exc)

        if sync is False:
            return await self._call_in_place(session, name, ctx, call_next)
        return await self._call_decoupled(session, name, sync, ctx, call_next)

    async def _call_in_place(
        self, session: Session, name: str, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """An async tool: cancellation reaches it, so its deadline is a cancel scope around it."""
        scope = self._new_scope()  # the manager's reaper cancels it at the deadline
        session.on_cancel = scope.cancel
        try:
            with scope:
                result = await call_next(ctx)
        except anyio.get_cancelled_exc_class():
            self.manager.end(session, SessionState.CANCELLED, "cancelled by the client")
            raise
        except MCPError as exc:
            self.manager.end(session, SessionState.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever the tool raised ends its session as error
            return self._failed(session, name, exc)
        if not scope.cancel_called:
            return self._completed(session, name, result)
        return self._stopped(session, name)

    async def _call_decoupled(
        self, session: Session, name: str, sync: bool | None, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """A sync tool (or one of unknown kind): the caller's wait ends at the deadline even if
        the work, stuck in a thread, does not."""
        task_group = self._task_group
        if task_group is None:  # pragma: no cover - checked by the caller; the lifespan is ending
            raise RuntimeError("the session runtime stopped")
        loop = asyncio.get_running_loop()
        work = _Work(session, sync, self._new_scope(), loop.create_future())

        def cancel() -> None:  # the deadline passed, or shutdown reached its own
            work.wake_caller()
            work.scope.cancel()

        session.on_cancel = cancel  # the manager's reaper calls it at the deadline
        task = loop.create_task(self._run(work, ctx, call_next))
        works = self._works
        works[task] = work
        task.add_done_callback(works.pop)
        try:
            await work.wake
        except anyio.get_cancelled_exc_class():
            # The client cancelled the request or went away, or the server is stopping.
            self.manager.end(session, SessionState.CANCELLED, "cancelled by the client")
            self._give_up(work)
            raise

        if work.done:
            return self._finish(work, name)
        self._give_up(work)
        return self._stopped(session, name)

    def _stopped(self, session: Session, name: str) -> CallToolResult:
        """The call's deadline passed, or shutdown cancelled it: the matching error result."""
        if session.state is SessionState.CANCELLED:
            return error_result(
                SessionError(
                    ErrorCode.SHUTTING_DOWN,
                    f"the server shut down before tool {name!r} finished; the call was cancelled",
                    session_id=session.id,
                    tool=name,
                )
            )
        timeout = session.timeout_seconds
        self.manager.end(session, SessionState.TIMEOUT, f"deadline of {timeout:g}s reached")
        return error_result(
            SessionError(
                ErrorCode.TIMEOUT,
                f"tool {name!r} did not finish within its deadline of {timeout:g}s and was abandoned; "
                "retry with a smaller request, or ask the operator to raise its timeout",
                session_id=session.id,
                tool=name,
            )
        )

    def _failed(self, session: Session, name: str, raised: BaseException) -> CallToolResult:
        """The tool raised something the SDK did not turn into a result (a BaseException)."""
        detail = f"{type(raised).__name__}: {raised}"
        self.manager.end(session, SessionState.ERROR, detail)
        logger.error("Tool %r raised %s", name, detail)
        return CallToolResult(content=[TextContent(type="text", text=f"Error executing tool {name}")], is_error=True)

    def _not_running(self, name: str) -> CallToolResult:
        return error_result(
            SessionError(
                ErrorCode.NOT_RUNNING,
                "the session runtime is not running: construct the server with "
                "MCPServer(..., lifespan=sessions.lifespan) or enter sessions.lifespan(app) in yours",
                tool=name,
            )
        )

    async def _run(self, work: _Work, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> None:
        try:
            with work.scope:
                work.result = await call_next(ctx)
        except BaseException as exc:  # noqa: BLE001 - any failure of the tool is the session's error
            if isinstance(exc, anyio.get_cancelled_exc_class()) and work.scope.cancel_called:
                return  # pragma: no cover - the scope absorbs its own cancellation
            work.raised = exc
        finally:
            work.done = True
            work.wake_caller()
            if work.abandoned:
                self.manager.thread_ended()

    def _give_up(self, work: _Work) -> None:
        """The caller stops waiting: cancel the work; count it if it stays stuck in a thread."""
        work.scope.cancel()
        if not work.done and work.sync is not False and not work.abandoned:
            work.abandoned = True
            self.manager.thread_abandoned()

    def _finish(self, work: _Work, name: str) -> HandlerResult:
        session = work.session
        raised = work.raised
        if raised is not None:
            detail = f"{type(raised).__name__}: {raised}"
            self.manager.end(session, SessionState.ERROR, detail)
            if isinstance(raised, MCPError):
                raise raised  # a protocol error the tool chose to raise stays a protocol error
            logger.error("Tool %r raised %s", name, detail)
            return CallToolResult(
                content=[TextContent(type="text", text=f"Error executing tool {name}")], is_error=True
            )
        return self._completed(session, name, work.result)

    def _completed(self, session: Session, name: str, result: HandlerResult) -> HandlerResult:
        """The tool returned: its result, unless its deadline or shutdown ended the session first."""
        failed = bool(getattr(result, "is_error", False))
        if self.manager.end(session, SessionState.ERROR if failed else SessionState.COMPLETED):
            return result
        return self._stopped(session, name)  # too late: answer as the session was accounted


def _with_invalid_argument_code(result: HandlerResult, tool: str) -> HandlerResult:
    """Give the SDK's own argument-validation failures of a session tool the `invalid_argument` code."""
    if isinstance(result, CallToolResult) and result.is_error:
        meta = dict(result.meta or {})
        if ERROR_META_KEY not in meta:
            text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
            meta[ERROR_META_KEY] = SessionError(ErrorCode.INVALID_ARGUMENT, text, tool=tool).to_meta()
            return result.model_copy(update={"meta": meta})
    return result
