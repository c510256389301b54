"""Admission: what a session is asked for with, the queue of calls waiting for a slot, and
the refusals, each with the sentence a caller can act on.

Tier: runtime core, used by the session manager (`server.intake`, `server.sessions`), which
holds the counters and the lock. A call is admitted when the server, its tool and its client
each have room. A call that finds the server (or its tool) full waits in FIFO order when
`limits.max_queued` allows; the manager hands a freed slot to the first waiter that fits,
under its lock, so a newcomer can never take a slot a waiter could use. The client limit
counts queued calls too, and refuses at once: one client's flood must not fill the queue.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypedDict

import anyio

from server.errors import ErrorCode, SessionError, shorten
from server.toml_keys import dotted_key

if TYPE_CHECKING:
    from server.session import Session


#: The longest `provider` and `model` a session is made with, in characters. They are short
#: labels kept with the session for as long as it is active, outside its metadata (whose size
#: `limits.max_metadata_bytes` caps): without a bound, they would let a caller park any amount
#: of memory in a session even where metadata is refused. Longer data goes in `metadata`.
MAX_LABEL_CHARS = 256


class SessionRequest(TypedDict, total=False):
    """What `SessionManager.create` / `create_nowait` take; every key is optional."""

    #: The tool whose call this session tracks (None for `session_create` sessions).
    tool: str | None
    #: Short labels of who the work is for: at most `MAX_LABEL_CHARS` characters each.
    provider: str
    model: str
    #: Seconds until the session times out; the default limit when None; capped by the maximum.
    timeout_seconds: float | None
    #: Any JSON value, size-limited by `limits.max_metadata_bytes`.
    metadata: Any
    request_id: str | None
    #: False: the caller owns the deadline (the reaper leaves the session alone).
    expire: bool
    #: Who asked (an MCP session on HTTP, the connection on stdio); None: not limited per client.
    client: Hashable | None
    #: The work will run in a thread (a sync tool): refused while too many threads are stuck.
    needs_thread: bool
    #: Time the session out when no progress is reported for this long (see `progress`).
    idle_timeout_seconds: float | None


class Refusal(StrEnum):
    """Why a call was not admitted; each reason has its own counter."""

    SHUTDOWN = "shutdown"
    METADATA = "metadata_size"
    CAPACITY = "capacity"
    TOOL_LIMIT = "tool_limit"
    CLIENT_LIMIT = "client_limit"
    THREADS = "threads"
    QUEUE_TIMEOUT = "queue_timeout"
    STORE = "store_unavailable"


@dataclass(slots=True, eq=False)
class Waiter:
    """A call waiting for a slot; `session` is opened for it when it is handed one."""

    session: Session
    enqueued: float
    event: anyio.Event
    admitted: bool = False
    refusal: SessionError | None = None
    #: Cluster mode: what the store last said kept it out ("capacity", "tool_limit"); "" if never asked.
    held_by: str = ""
    #: Its place in the order of arrival (the manager's count of calls queued).
    seq: int = 0
    #: The line it waits in (see `ManagerState._lines`): its tool's if the tool has a cap, else None.
    line: str | None = None


def refuse_label(field: str, value: str, tool: str | None) -> SessionError:
    """`provider` or `model` (`field`) is longer than `MAX_LABEL_CHARS`."""
    return SessionError(
        ErrorCode.INVALID_ARGUMENT,
        f"{field} is {len(value)} characters long ({shorten(value, 20)!r}); the limit is {MAX_LABEL_CHARS} "
        "characters: it is a short label, put longer data in metadata",
        tool=tool,
    )


def _count(n: int, noun: str) -> str:
    """`n` and `noun`, in the plural unless `n` is 1: "1 concurrent session", "2 concurrent sessions"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def refuse_capacity(
    tool: str | None, cap: int, queued: int, max_queued: int, where: str, *, tool_cap: int | None = None
) -> SessionError:
    """`where` (the server, the cluster) is full. `max_queued` is 0 when the call could not have
    waited (there is no queue, or the call may not queue, as `session_create`): then the
    sentence does not mention a queue the caller has no use for. `tool_cap`: the call's tool is
    at that cap too (the end of one of its calls frees both)."""
    limit = f"{where} is at its limit of {_count(cap, 'concurrent session')} (limits.max_concurrent_sessions)"
    if max_queued:
        limit += f" and its queue holds {queued} of {_count(max_queued, 'waiting call')} (limits.max_queued)"
    if tool_cap is not None and tool is not None:
        calls = _count(tool_cap, "concurrent call")
        limit += f", and tool {tool!r} is at its limit of {calls} ({_cap_key(tool)})"
        return SessionError(ErrorCode.CAPACITY_EXCEEDED, f"{limit}; retry after one of its calls ends", tool=tool)
    return SessionError(ErrorCode.CAPACITY_EXCEEDED, f"{limit}; retry after a session ends", tool=tool)


def _cap_key(tool: str | None) -> str:
    """The key of `tool`'s cap, as TOML writes it (`tools."my.tool".max_concurrent`)."""
    return dotted_key(("tools", str(tool), "max_concurrent"))


def refuse_tool_limit(tool: str, cap: int, queued: int = 0, max_queued: int = 0) -> SessionError:
    """`tool` is at its cap. `max_queued` is 0 when the call could not have waited (see
    `refuse_capacity`); otherwise the server's queue is full too, and the sentence says so: the
    call would have waited there, and a longer queue (`limits.max_queued`) would have taken it."""
    limit = f"tool {tool!r} is at its limit of {_count(cap, 'concurrent call')} ({_cap_key(tool)})"
    if max_queued:
        limit += f" and the server's queue holds {queued} of {_count(max_queued, 'waiting call')} (limits.max_queued)"
    return SessionError(ErrorCode.CAPACITY_EXCEEDED, f"{limit}; retry after one of its calls ends", tool=tool)


def refuse_client_limit(tool: str | None, cap: int) -> SessionError:
    """The client holds its share. A tool call is told to retry once one of its calls ends; a
    session with no tool (`session_create`'s) is held until released, so its caller is told to
    release one it no longer needs."""
    if tool is None:
        advice = "release a session it no longer needs with session_release, or retry after one of its calls ends"
    else:
        advice = "retry after one of its calls ends (or after it releases a session_create session)"
    return SessionError(
        ErrorCode.CAPACITY_EXCEEDED,
        f"this client already holds or waits for {_count(cap, 'session')}, the per-client limit "
        f"(limits.max_sessions_per_client); {advice}",
        tool=tool,
    )


def refuse_threads(tool: str | None, stuck: int, cap: int) -> SessionError:
    if cap == 0:  # no stuck thread ever gets it below the limit: waiting cannot help
        return SessionError(
            ErrorCode.CAPACITY_EXCEEDED,
            "sync tools are turned off on this server (limits.max_abandoned_threads is 0): retrying will not "
            "help (async tools are still served); ask the operator to set limits.max_abandoned_threads to 1 or more",
            tool=tool,
        )
    if stuck == 1:
        stuck_text = "1 thread is stuck in a sync tool call that has ended (past its deadline, or cancelled)"
    else:
        stuck_text = f"{stuck} threads are stuck in sync tool calls that have ended (past their deadline, or cancelled)"
    return SessionError(
        ErrorCode.CAPACITY_EXCEEDED,
        f"{stuck_text} (the limit, limits.max_abandoned_threads, is {cap}); sync tools are refused until they end: "
        "retry later (async tools are still served), or ask the operator to raise limits.max_abandoned_threads",
        tool=tool,
    )


def refuse_queue_timeout(
    tool: str | None,
    waited: float,
    where: str,
    cap: int,
    *,
    server_full: bool,
    tool_cap: int | None,
    tool_full: bool,
) -> SessionError:
    """A queued call waited `limits.queue_timeout_seconds` without being admitted. The sentence
    says what kept it waiting, as things stand at the end of its wait: `where` (the server)
    at its `cap` (`server_full`), its tool at its `tool_cap` (`tool_full`), or both. When
    neither is seen full (in cluster mode the caps count every replica's calls, which this one
    does not see), it names the caps that may have: the server's, and the tool's if it has one.
    (The per-client share never makes a call wait: it is refused at once.)"""
    tool_limit = f"tool {tool!r} is at its limit of {_count(tool_cap or 0, 'concurrent call')} ({_cap_key(tool)})"
    server_limit = f"{where} is at its limit of {_count(cap, 'concurrent session')} (limits.max_concurrent_sessions)"
    if tool_full and server_full:
        reason = f"{server_limit}, and {tool_limit}"
    elif tool_full:
        reason = tool_limit
    elif server_full or tool_cap is None:
        reason = server_limit
    else:
        reason = (
            f"neither {where} (limits.max_concurrent_sessions, {cap}) nor tool {tool!r} "
            f"({_cap_key(tool)}, {tool_cap}) had room for it"
        )
    return SessionError(
        ErrorCode.CAPACITY_EXCEEDED,
        f"waited {waited:.3g}s in the queue (limits.queue_timeout_seconds) without getting a slot: {reason}; "
        "retry later",
        tool=tool,
    )


#: What a caller is told when Redis answered with an error (`StoreUnavailable.refused`).
STORE_REFUSED_ADVICE = (
    "Redis answered with an error that retrying will not cure until the operator puts the session store "
    "right (see the server's log)"
)


def refuse_store(tool: str | None, reason: str, *, refused: bool = False) -> SessionError:
    """The refusal of a call the session store could not admit: `refused` when Redis answered
    with an error, which a retry does not cure until the operator puts the store right. Without
    a `tool`, a session of its own (`session_create`) was asked for, and no call was to run."""
    advice = STORE_REFUSED_ADVICE if refused else "The server reconnects by itself: retry in a moment"
    outcome = "the call was not run" if tool is not None else "no session was created"
    return SessionError(ErrorCode.STORE_UNAVAILABLE, f"{reason}; {outcome}. {advice}", tool=tool)


def refuse_shutdown(tool: str | None) -> SessionError:
    return SessionError(
        ErrorCode.SHUTTING_DOWN,
        "the server is shutting down and accepts no new work; retry on a running server",
        tool=tool,
    )
