"""A tool call's outcomes: its session's end, and the result its caller gets, in words.

Tier: MCP integration (used by `server.extension` and `server.decoupled`). Each function but
`not_running` (the refusal of a call made while the session runtime is not running) ends the
call's session with the manager as its outcome says (completed, error, timeout) and returns
what the caller reads: the tool's own result, or an error result whose sentence says what
happened and what to do. A call stopped at its deadline says what became of its work
(cancelled, abandoned in a thread, or a late result discarded), and how long after the deadline
it stopped when the tool held the cancellation off (or the event loop was held: the call cannot
tell the two apart).

`completed` runs on every tool call, so it reads nothing but its arguments and this module's
globals.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from mcp.server.context import HandlerResult
from mcp_types import CallToolResult, TextContent

from server.errors import ErrorCode, SessionError, describe, error_result, result_text
from server.logs import log_refusal
from server.session import Session, SessionState, timeout_reason
from server.sessions import SessionManager

#: The extension's logger: a tool's failure is logged under `server.extension`, where the
#: extension's other lines are.
logger = logging.getLogger("server.extension")

_COMPLETED = SessionState.COMPLETED  # a global read: this runs per call
#: A sync tool's call run in place: a cell the extension sets before the call, in which the tool's
#: stand-in (`server.threads`) notes what became of the thread when its wait was cancelled
#: (`ABANDONED`: it runs on; `LATE`: it had just returned, its result lost), and which `stopped`
#: reads, so the timeout's message says what happened. A cell, not a value: the stand-in may run in
#: a task an inner interceptor started, whose context is a copy of the caller's (a value set there
#: would not reach the caller), but the cell it holds is the caller's own.
THREAD_FATE: ContextVar[ThreadCell | None] = ContextVar("mcp_sessions_thread_fate", default=None)


class ThreadCell:
    """A sync call's `THREAD_FATE` cell: what became of its thread (`fate`), and whether its
    stand-in may take a thread of the extension's limiter (`pool`: one at a time, while its
    `session` is active). The cell stays in the context after the call (the SDK may run calls in
    the caller's context): a host's own call of the tool made there later (no session) gets
    anyio's default limiter, its session having ended."""

    __slots__ = ("fate", "pool", "session")

    def __init__(self, session: Session) -> None:
        self.fate: str | None = None
        self.pool = True
        self.session = session


#: What became of a call past its deadline, as its timeout message says it.
CANCELLED = "was cancelled"
ABANDONED = "was abandoned: its thread runs on until the tool returns (a thread cannot be stopped)"
LATE = "its late result was discarded"
MAYBE_ABANDONED = "was abandoned: it may run on in a thread until it returns (a thread cannot be stopped)"
#: A call that stops this long (or longer) after the reaper stopped it at its deadline says so
#: in its timeout message.
HELD_OFF_SECONDS = 0.1
#: What an idle timeout's message advises (see `idle_advice`).
_IDLE_ADVICE_ASYNC = "a long-running tool must report progress to stay alive"
_IDLE_ADVICE_SYNC = (
    "a long-running tool must report progress to stay alive, a sync one from its thread with "
    "anyio.from_thread.run(ctx.report_progress, progress, total); or ask the operator to raise or remove "
    "its idle timeout"
)
_IDLE_ADVICE_EITHER = (
    "a long-running tool must report progress to stay alive (a sync one from its thread, with "
    "anyio.from_thread.run(ctx.report_progress, progress, total))"
)


def stopped(
    manager: SessionManager, session: Session, name: str, fate: str | None = None, advice: str | None = None
) -> CallToolResult:
    """The call's deadline passed, or shutdown cancelled it: the matching error result.

    `fate` says what became of the work (a `CANCELLED`-like sentence part); by default,
    for a call run in place, what became of its thread (`THREAD_FATE`).
    `advice` is what an idle timeout's message advises (see `idle_advice`); by default, for a
    call run in place, the session's kind says (`needs_thread`: a sync tool)."""
    if fate is None:
        fate = CANCELLED
        noted = THREAD_FATE.get() if session.needs_thread else None  # (another call's, for an async tool)
        if noted is not None and noted.fate is not None:
            fate = noted.fate
    if session.state is SessionState.CANCELLED:
        return error_result(
            SessionError(
                ErrorCode.SHUTTING_DOWN,
                f"the server shut down before tool {name!r} finished; {fate if fate is LATE else 'the call ' + fate}; "
                "retry on a running server",
                session_id=session.id,
                tool=name,
            )
        )
    timeout = session.timeout_seconds
    # The reaper left the ending to this call (see `SessionManager.create`): the session
    # ends now, when the call stops, so its slot was held while its work ran on.
    manager.end(session, SessionState.TIMEOUT, timeout_reason(session))
    asked = session.stop_requested
    held_off = (session.ended or asked) - asked if asked else 0.0
    if held_off >= HELD_OFF_SECONDS:
        fate += (
            f" {held_off:.1f}s after the deadline, as the tool held the cancellation off (or the event loop was held)"
            " until then"
        )
    if session.idle_expired:
        if advice is None:
            advice = idle_advice(session.needs_thread)
        message = (
            f"tool {name!r} reported no progress for {session.idle_timeout:g}s (its idle timeout) and {fate}; {advice}"
        )
    else:
        message = (
            f"tool {name!r} did not finish within its deadline of {timeout:g}s and {fate}; "
            "retry with a smaller request, or ask the operator to raise its timeout"
        )
    return error_result(SessionError(ErrorCode.TIMEOUT, message, session_id=session.id, tool=name))


def idle_advice(sync: bool | None) -> str:
    """What to do about an idle timeout, for a sync tool, an async one, or one of unknown kind (None)."""
    if sync is None:
        return _IDLE_ADVICE_EITHER
    return _IDLE_ADVICE_SYNC if sync else _IDLE_ADVICE_ASYNC


def failed(manager: SessionManager, session: Session, name: str, raised: BaseException) -> CallToolResult:
    """The tool raised something the SDK did not turn into a result (a BaseException)."""
    detail = describe(raised)
    manager.end(session, SessionState.ERROR, detail)
    logger.error("Tool %r raised %s", name, detail)
    return CallToolResult(content=[TextContent(type="text", text=f"Error executing tool {name}")], is_error=True)


def not_running(name: str, serving: str | None = None, *, after_error: bool = False) -> CallToolResult:
    """The refusal of a call that came while the session runtime (the lifespan) is not running;
    with `after_error`, because the runtime stopped after an internal error (the lifespan was
    wired); or, with `serving` (the server it runs for, described), one that came through another
    server that lists the same extension."""
    if after_error:
        message = "the session runtime stopped after an internal error (see the server log); restart the server"
    elif serving is None:
        message = (
            "the session runtime is not running: construct the server with "
            "MCPServer(..., lifespan=sessions.lifespan) or enter sessions.lifespan(app) in yours"
        )
    else:
        message = (
            f"this server's session runtime is not running: its SessionsExtension runs for {serving}, and this "
            "server lists the same one; give each server its own SessionsExtension, with "
            "MCPServer(..., extensions=[sessions], lifespan=sessions.lifespan)"
        )
    error = SessionError(ErrorCode.NOT_RUNNING, message, tool=name)
    log_refusal(error)
    return error_result(error)


def completed(manager: SessionManager, session: Session, name: str, result: HandlerResult) -> HandlerResult:
    """The tool returned: its result, unless its deadline or shutdown ended the session first.
    A result that comes well past the deadline with nothing having stopped the call is still
    the call's result, and is warned about (see `_past_its_deadline`)."""
    is_error = bool(getattr(result, "is_error", False))
    if is_error:
        ended = manager.end(session, SessionState.ERROR, _error_text(result))
    else:
        ended = manager.end(session, _COMPLETED)
    if ended:
        at = session.ended  # the time `end` read: no clock read of its own on every call
        if at is not None and at - session.deadline >= HELD_OFF_SECONDS:
            _past_its_deadline(session, name, at - session.deadline)
        return result
    return stopped(manager, session, name, LATE)  # too late: answer as the session was accounted


def _past_its_deadline(session: Session, name: str, late: float) -> None:
    """The call returned `late` seconds after its deadline, and nothing stopped it: the reaper
    did not run in time, so the event loop was held (blocking code in an async tool, this one or
    another running then, which no cancellation interrupts). Its result is still its own, so it
    is answered and counted as it is; the operator is told, without blaming a tool."""
    what = "idle timeout" if session.deadline < session.hard_deadline else "deadline"
    logger.warning(
        "Tool %r returned %.1fs after its %s, which nothing could enforce: the event loop was held meanwhile (%s)",
        name,
        late,
        what,
        _LOOP_HELD_BY_SYNC if session.needs_thread else _LOOP_HELD_BY_ASYNC,
    )


#: What may have held the event loop, told to the operator (see `_past_its_deadline`). A sync
#: tool's own code runs in a thread, but a generator it returns is iterated on the loop; and
#: threads that keep the GIL (CPU-bound Python, C code that does not release it) starve the loop.
_LOOP_HELD_ELSEWHERE = (
    "; or a large result serialised on the loop, or CPU-bound or GIL-holding work in sync tools' threads; "
    "or the whole process got no CPU time meanwhile (a host short of CPU, a paused container)"
)
_LOOP_HELD_BY_ASYNC = (
    "blocking code in an async tool, this one or another running at the time; give such code to "
    "anyio.to_thread.run_sync or make the tool a sync one" + _LOOP_HELD_ELSEWHERE
)
_LOOP_HELD_BY_SYNC = (
    "this sync tool's result, if it is a generator, which the SDK iterates on the event loop (return a list "
    "instead), or blocking code in an async tool running at the time (give such code to anyio.to_thread.run_sync)"
    + _LOOP_HELD_ELSEWHERE
)


def _error_text(result: HandlerResult) -> str:
    """The text of an error result the tool returned (the session's error reason)."""
    return result_text(result) or "the tool returned an error result"
