"""One session: its record (`Session`), its states, and what is worked out or said about it.

Tier: runtime core, the data of `server.sessions`. A `Session` is one tracked unit of work (a
tool call, or a session made by `session_create`); the manager admits it, moves its deadline
and ends it, under its lock (see `SessionManager.end`). Here too is what concerns one session
alone: the size of its metadata (`metadata_size`), the state a release asks for
(`ended_state`), why it timed out (`timeout_reason`) and the INFO line its end logs
(`end_logger`, named `server.sessions.ends` after the module where sessions end: the name
is documented, and hosts turn it on by it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from server.errors import ErrorCode, SessionError, shorten

#: One INFO line per session end. Off (WARNING) unless turned on: the SDK's `MCPServer` sets the
#: root logger to INFO on its own, and a library must not write a line per call into every
#: host's logs (nor pay ~20-40 µs a call for it). The standalone server sets this logger to its
#: `[logging] level`; an embedding host turns it on with
#: `logging.getLogger("server.sessions.ends").setLevel(logging.INFO)`.
end_logger = logging.getLogger("server.sessions.ends")
end_logger.setLevel(logging.WARNING)


class SessionState(StrEnum):
    """The state of a session: `active` until it ends, then `completed`, `error`, `timeout` (its
    deadline passed) or `cancelled` (the client cancelled or disconnected, or a shutdown's drain
    deadline passed)."""

    ACTIVE = "active"
    COMPLETED = "completed"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    # Hash as the str it equals (`Enum` hashes the member name in Python code): consistent with
    # `==`, and a C-level hash for the per-state counters updated on every release.
    __hash__ = str.__hash__


@dataclass(slots=True, eq=False)
class Session:
    """One tracked unit of work: a tool call, or a session made by `session_create`."""

    id: str
    #: The JSON-RPC id of the call that made it ("" is an id too); None until it is admitted when
    #: it was made without one (in-process), then its own id.
    request_id: str | None
    tool: str | None
    timeout_seconds: float
    provider: str = ""
    model: str = ""
    metadata: Any = None
    metadata_bytes: int = 0
    #: `time.monotonic()` at admission and at the deadline (the clock of the asyncio event loop).
    #: `deadline` is the earlier of `hard_deadline` and the idle deadline; progress moves it on.
    #: All three are set when the session is admitted.
    started: float = 0.0
    deadline: float = 0.0
    state: SessionState = SessionState.ACTIVE
    ended: float | None = None
    error: str | None = None
    client: Hashable | None = None
    idle_timeout: float | None = None
    #: Whether the reaper ends it at its deadline, and whether its work runs in a thread.
    expire: bool = True
    needs_thread: bool = False
    hard_deadline: float = 0.0
    #: Set when the session timed out for reporting no progress (not at its overall deadline).
    idle_expired: bool = False
    #: Set by whoever runs the session's work, to stop it: at its deadline (the reaper calls it
    #: and leaves the ending to that work, which ends the session as `timeout` once it stops)
    #: and at the shutdown deadline (after shutdown has ended the session as `cancelled`).
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)
    #: A tool call's entry in the per-tool figures (the manager's `_ToolStats`), where its end is
    #: counted as its admission was, whatever name the entry goes by meanwhile.
    stats: Any = field(default=None, repr=False)
    #: When the reaper called `on_cancel` at the deadline (`time.monotonic()`; 0.0: it has not).
    stop_requested: float = 0.0

    @property
    def created_at(self) -> float:
        """When the session was admitted, on the wall clock (`time.time()`); read from the
        monotonic clock, as every time of a session is: no wall-clock read per session."""
        return time.time() - (time.monotonic() - self.started)

    @property
    def expires_at(self) -> datetime:
        """When the session times out if still active, at its overall deadline (wall clock, UTC)."""
        return datetime.fromtimestamp(time.time() + (self.hard_deadline - time.monotonic()), UTC)

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started


def metadata_size(metadata: Any) -> int:
    """UTF-8 bytes of `metadata` as compact JSON; empty metadata (`None`, `{}`) counts 0.

    Raises:
        SessionError: `invalid_argument` when the value is not plain JSON (NaN, infinities,
            non-JSON types), nests too deeply to serialize, or holds an integer longer than
            Python turns into text (`sys.get_int_max_str_digits()`, 4300 digits by default).
    """
    if metadata is None or metadata == {}:
        return 0
    try:
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise SessionError(ErrorCode.INVALID_ARGUMENT, "metadata nests too deeply to be stored") from None
    except (TypeError, ValueError) as exc:
        reason = str(exc)
        if "integer string conversion" in reason:  # Python's own cap on int-to-text (`sys.set_int_max_str_digits`)
            reason = (
                f"metadata holds an integer of more than {sys.get_int_max_str_digits()} digits, "
                "too large to store: send it as a string"
            )
        else:
            reason = f"metadata is not plain JSON: {shorten(reason)}"
        raise SessionError(ErrorCode.INVALID_ARGUMENT, reason) from None
    return len(text.encode("utf-8", errors="surrogatepass"))


def _log_end(session: Session, duration: float) -> None:
    """One INFO line per session end: the fields operators filter on, never the metadata."""
    reason = session.error or ""
    if len(reason) > 300:
        reason = reason[:297] + "..."
    fields = {
        "session_id": session.id,
        "tool": session.tool,
        "state": session.state.value,
        "duration_seconds": round(duration, 6),
        "reason": reason or None,
    }
    about = "tool " + session.tool if session.tool is not None else "no tool"
    if reason:
        message = "Session %s ended %s after %.3fs (%s): %s"
        end_logger.info(message, session.id, session.state.value, duration, about, reason, extra=fields)
    else:
        message = "Session %s ended %s after %.3fs (%s)"
        end_logger.info(message, session.id, session.state.value, duration, about, extra=fields)


def ended_state(outcome: SessionState | str, session_id: str) -> SessionState:
    """The state a release asks for: any but `active`, or `invalid_argument`."""
    try:
        state = SessionState(outcome)
    except ValueError:
        state = SessionState.ACTIVE
    if state is SessionState.ACTIVE:
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT,
            f"outcome must be one of completed, error, timeout, cancelled; got {shorten(repr(outcome))}",
            session_id=shorten(session_id),
        )
    return state


def timeout_reason(session: Session) -> str:
    """Why a session timed out: its overall deadline, or its idle timeout (no progress)."""
    if session.idle_expired:
        return f"no progress reported for {session.idle_timeout:g}s"
    return f"deadline of {session.timeout_seconds:g}s reached"
