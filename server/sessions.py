"""The session manager: admission, deadlines, release, metrics and graceful shutdown.

Tier: runtime core, usable without MCP (async API). Every counter changes here, under one
lock, and every way a session ends (completed, error, timeout, cancelled) goes through
`end`. Admission is O(1): a counter, never a scan. Sessions made without a caller
waiting on them (`session_create`) are expired by a reaper that sleeps until the earliest
deadline in a cancel scope whose deadline moves; shutdown waits on an event that the last
release sets. No polling anywhere.

Build one from `load_settings(path)` (its `[limits]` and per-tool caps) or from a
`LimitsSettings`; both are exported from `server`.

Example:
    ```python
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=10))  # or SessionManager(load_settings(path))
    async with manager.running():
        session = await manager.create(tool="search", timeout_seconds=5)
        await manager.release(session.id)
        assert manager.metrics().total_sessions_completed == 1
    ```
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Unpack

import anyio

from server import admission
from server.admission import Refusal, SessionRequest, Waiter
from server.config import LimitsSettings, Settings
from server.errors import ErrorCode, SessionError, shorten
from server.metrics import (
    ClusterMetrics,
    DurationStats,
    HistogramReading,
    MetricsSnapshot,
    ShutdownReport,
    ToolMetrics,
)

logger = logging.getLogger(__name__)
#: One INFO line per session end. Off (WARNING) unless turned on: the SDK's `MCPServer` sets the
#: root logger to INFO on its own, and a library must not write a line per call into every
#: host's logs (nor pay ~20-40 µs a call for it). The standalone server sets this logger to its
#: `[logging] level`; an embedding host turns it on with
#: `logging.getLogger("server.sessions.ends").setLevel(logging.INFO)`.
end_logger = logging.getLogger("server.sessions.ends")
end_logger.setLevel(logging.WARNING)

#: How many ended `session_create` session ids are remembered to say *how* they ended (a tool
#: call's id is never released by a client, so it is not remembered); older ones are still
#: recognised as ours (their id is signed) and refused as already released.
RECENTLY_ENDED = 4096
#: How many session ids are made at a time (see `SessionManager._more_ids_locked`).
ID_BATCH = 256
#: Per-tool statistics are kept for at most this many tool names; the rest share one entry.
MAX_TRACKED_TOOLS = 1024
OTHER_TOOLS = "(other)"
#: The key, in `duration_histograms`, of sessions not tied to a tool call (made by `session_create`).
NO_TOOL = "(none)"


class SessionState(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    # Hash as the str it equals (`Enum` hashes the member name in Python code): consistent with
    # `==`, and a C-level hash for the per-state counters updated on every release.
    __hash__ = str.__hash__


# The members as module globals for the per-call paths: `SessionState.X` is an attribute lookup
# through the enum's metaclass (about 0.1 µs each on Python 3.11), a global is a dict read.
_ACTIVE = SessionState.ACTIVE
_COMPLETED = SessionState.COMPLETED
_ERROR = SessionState.ERROR
_TIMEOUT = SessionState.TIMEOUT
_monotonic = time.monotonic
_INFO = logging.INFO


@dataclass(slots=True, eq=False)
class Session:
    """One tracked unit of work: a tool call, or a session made by `session_create`."""

    id: str
    request_id: str
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


@dataclass(slots=True)
class _ToolStats:
    calls: int = 0
    completed: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    rejected_tool_limit: int = 0
    durations: DurationStats = field(default_factory=DurationStats)


def metadata_size(metadata: Any) -> int:
    """UTF-8 bytes of `metadata` as compact JSON; empty metadata (`None`, `{}`) counts 0.

    Raises:
        SessionError: `invalid_argument` when the value is not plain JSON (NaN, infinities,
            non-JSON types) or nests too deeply to serialize.
    """
    if metadata is None or metadata == {}:
        return 0
    try:
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise SessionError(ErrorCode.INVALID_ARGUMENT, "metadata nests too deeply to be stored") from None
    except (TypeError, ValueError) as exc:
        raise SessionError(ErrorCode.INVALID_ARGUMENT, f"metadata is not plain JSON: {shorten(str(exc))}") from None
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


def _check_timeout(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT,
            f"timeout_seconds must be a finite number of seconds greater than 0, got {shorten(repr(value))}",
        )


class SessionManager:
    """Tracks sessions against the limits it was built with. Build one per server; never global."""

    #: Whose cap a `capacity_exceeded` refusal names.
    CAPACITY_SCOPE = "the server"

    def __init__(
        self, limits: Settings | LimitsSettings | None = None, tool_caps: Mapping[str, int] | None = None
    ) -> None:
        """`limits`: a whole `Settings` (what `load_settings` returns: its `[limits]`, and its
        `[tools.NAME].max_concurrent` caps unless `tool_caps` is given), a `LimitsSettings`, or
        None for the defaults. `tool_caps`: per-tool concurrency caps by tool name.

        Raises:
            TypeError: `limits` is none of these (a dict, a path, ...).
        """
        if isinstance(limits, Settings):
            if tool_caps is None:
                tool_caps = limits.tool_caps()
            limits = limits.limits
        elif limits is None:
            limits = LimitsSettings()
        elif not isinstance(limits, LimitsSettings):
            raise TypeError(
                "SessionManager takes a Settings (from load_settings(path)), a LimitsSettings "
                f"(e.g. LimitsSettings(max_concurrent_sessions=10)) or None, got {type(limits).__name__}: "
                f"{limits!r:.80}"
            )
        self.limits = limits  # see the property
        #: Per-tool concurrency caps (`[tools.NAME].max_concurrent`), by tool name.
        self.tool_caps: dict[str, int] = dict(tool_caps or {})
        self._lock = threading.Lock()
        # Ids are "s<random>-<seq>": unguessable across servers and restarts, and recognisable
        # as ours after they end without remembering every one of them.
        self._id_prefix = f"s{secrets.token_hex(6)}-"
        #: Ids are made ID_BATCH at a time: taking one from a list costs less on every call than
        #: formatting one (cold code between two calls). `_seq` is the last one made; the ones
        #: made and not yet given out wait in `_spare_ids`, next one last.
        self._seq = 0
        self._spare_ids: list[str] = []
        self._active: dict[str, Session] = {}
        # Admission state (not statistics: `reset_metrics` keeps it): calls active per tool,
        # sessions held or queued per client, and the calls waiting for a slot, oldest first.
        self._tool_active: dict[str, int] = {}
        self._client_load: dict[Hashable, int] = {}
        self._queue: dict[Waiter, None] = {}
        self._recent: OrderedDict[str, SessionState] = OrderedDict()
        #: (deadline, session id) of every session the reaper expires. Entries hold the id, not
        #: the session: a released session must not stay alive (and age into the garbage
        #: collector's old generation) until its deadline; released entries are skipped.
        self._expiry: list[tuple[float, str]] = []
        self._end_waiters: dict[str, anyio.Event] = {}
        self._reaper_scope: anyio.CancelScope | None = None
        self._started_at = time.monotonic()
        self._shutting_down = False
        self._idle_waiter: anyio.Event | None = None
        self._shutdown_done: anyio.Event | None = None
        self._shutdown_begun: anyio.Event | None = None
        self._report: ShutdownReport | None = None
        self._abandoned = 0
        self._no_abandoned = anyio.Event()
        self._no_abandoned.set()
        self._config_reloads = 0
        self._config_reload_failures = 0
        self._reset_counters()

    @property
    def limits(self) -> LimitsSettings:
        """The limits new sessions are admitted under (`set_limits` changes them)."""
        return self._limits

    @limits.setter
    def limits(self, limits: LimitsSettings) -> None:
        self._limits = limits
        # Plain copies of what admission reads on every call: a settings model's attribute
        # costs a type lookup through its class's MRO, often a cache miss between calls.
        self._max_active = limits.max_concurrent_sessions
        self._max_metadata = limits.max_metadata_bytes
        self._max_timeout = limits.max_timeout_seconds
        self._max_abandoned = limits.max_abandoned_threads
        self._per_client = bool(limits.max_sessions_per_client)

    def _reset_counters(self) -> None:
        self._created = len(self._active)
        self._peak = len(self._active)
        self._ended: dict[SessionState, int] = {s: 0 for s in SessionState if s is not SessionState.ACTIVE}
        self._rejected: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self._rejected_unauthorized = 0
        self._queue_cancelled = 0
        self._queue_waits = DurationStats()
        self._tools: dict[str, _ToolStats] = {}
        self._untooled_durations = DurationStats()
        self._metadata_bytes = sum(s.metadata_bytes for s in self._active.values())

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """Run the reaper that expires sessions nobody releases; stop it on exit."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reap)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _reap(self) -> None:
        while True:
            now = time.monotonic()
            while self._expiry and self._expiry[0][0] <= now:
                _, session_id = heapq.heappop(self._expiry)
                session = self._active.get(session_id)  # None: released before its deadline
                if session is None:
                    continue
                if session.deadline > now:  # progress moved it on: look again then
                    heapq.heappush(self._expiry, (session.deadline, session_id))
                    continue
                if session.deadline < session.hard_deadline:
                    session.idle_expired = True
                stop = session.on_cancel
                if stop is not None:
                    # A call runs it: stop the call, which ends the session as it stops. Until
                    # then (a shield in the tool can hold the cancellation off) its work still
                    # runs, so it keeps its slot and counts as active.
                    session.stop_requested = now
                    stop()
                else:
                    self.end(session, SessionState.TIMEOUT, timeout_reason(session))
            scope = anyio.CancelScope()
            if self._expiry:
                scope.deadline = self._expiry[0][0]
            self._reaper_scope = scope
            with scope:
                await anyio.sleep_forever()

    # -- admission -------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def active_count(self) -> int:
        return len(self._active)

    def timeout_for(self, requested: float | None, default: float | None = None) -> float:
        """The effective timeout: requested (or default), capped by `max_timeout_seconds`."""
        value = requested if requested is not None else (default or self.limits.default_timeout_seconds)
        _check_timeout(value)
        return min(float(value), self.limits.max_timeout_seconds)

    async def create(self, *, queue: bool = True, **request: Unpack[SessionRequest]) -> Session:
        """Admit a new session or raise `SessionError`; O(1) in the number of open sessions.

        When the server (or the call's tool) is full and `limits.max_queued` allows, the call
        waits in FIFO order for a slot, up to `limits.queue_timeout_seconds` (not with
        `queue=False`). The session's deadline starts when it is admitted. Unless
        `expire=False`, at its deadline the reaper calls its `on_cancel` (set by whoever runs the
        session's work, to stop it; that work then ends the session as `timeout`, so that it
        holds its slot for as long as the work runs on), or without one ends it as `timeout`.

        Raises:
            SessionError: `shutting_down`, `invalid_argument`, `metadata_too_large` or
                `capacity_exceeded` (server, tool or client full, queue full or waited out, too
                many stuck threads); each refusal is counted and creates no session.
        """
        session = self._prepare(**request)
        limits = self.limits
        # Refusals are raised where they are made, never held in a local of the raising frame:
        # that would be a cycle (error -> traceback -> frame -> error) keeping the refused
        # metadata alive until the cyclic GC runs.
        lock = self._lock
        lock.acquire()  # not `with`: an explicit pair costs half as much, and this runs per call
        try:
            if self._admit_locked(session):
                return session
            if not queue or len(self._queue) >= limits.max_queued:
                raise self._full_locked(session, may_queue=queue)
            waiter = self._enqueue_locked(session)
        finally:
            lock.release()
        return await self._wait_in_queue(waiter, limits.queue_timeout_seconds)

    def create_nowait(self, **request: Unpack[SessionRequest]) -> Session:
        """`create` for callers that must not yield: never queues, refuses at once when full."""
        session = self._prepare(**request)
        with self._lock:
            if self._admit_locked(session):
                return session
            raise self._full_locked(session, may_queue=False)

    def open_call(
        self, tool: str, timeout: float, request_id: str | None, needs_thread: bool, idle_timeout: float | None
    ) -> Session | None:
        """Admit a tool call at once when nothing stands in its way: `create`'s common case for
        the extension, without a coroutine or keyword packing (it runs on every call).

        None when `create` must decide instead: the server or the tool is full (queue or
        refuse), the per-client share is on, the timeout is not a float within the cap, the
        idle timeout is not a positive float, or the server is shutting down. Raises the
        refusals that never wait (too many stuck threads), counted as `create` counts them.
        """
        if (
            self._shutting_down
            or self._per_client
            or type(timeout) is not float
            or not 0.0 < timeout <= self._max_timeout
            or (idle_timeout is not None and not (type(idle_timeout) is float and idle_timeout > 0.0))
        ):
            return None
        session = Session("", request_id or "", tool, timeout, idle_timeout=idle_timeout, needs_thread=needs_thread)
        lock = self._lock
        lock.acquire()  # not `with`: an explicit pair costs half as much, and this runs per call
        try:
            return session if self._admit_locked(session) else None
        finally:
            lock.release()

    def _prepare(
        self,
        *,
        tool: str | None = None,
        provider: str = "",
        model: str = "",
        timeout_seconds: float | None = None,
        metadata: Any = None,
        request_id: str | None = None,
        expire: bool = True,
        client: Hashable | None = None,
        needs_thread: bool = False,
        idle_timeout_seconds: float | None = None,
    ) -> Session:
        """Check what needs no lock and build the (not yet admitted) session (see `SessionRequest`)."""
        if self._shutting_down:
            with self._lock:
                self._rejected[Refusal.SHUTDOWN] += 1
            raise admission.refuse_shutdown(tool)
        limits = self.limits
        if timeout_seconds is None:
            timeout = limits.default_timeout_seconds  # validated with the settings
        elif type(timeout_seconds) is float and 0.0 < timeout_seconds <= limits.max_timeout_seconds:
            timeout = timeout_seconds  # already valid and within the cap (a tool's configured timeout)
        else:
            try:
                timeout = self.timeout_for(timeout_seconds)
            except SessionError as exc:
                exc.tool = tool
                raise
        if idle_timeout_seconds is not None:
            _check_timeout(idle_timeout_seconds)
        if provider or model:  # (a tool call has neither)
            for name, label in (("provider", provider), ("model", model)):
                if len(label) > admission.MAX_LABEL_CHARS:
                    raise admission.refuse_label(name, label, tool)
        return Session(
            "",
            request_id or "",
            tool,
            timeout,
            provider=provider,
            model=model,
            metadata=metadata,
            metadata_bytes=0 if metadata is None else metadata_size(metadata),
            client=client,
            idle_timeout=idle_timeout_seconds,
            expire=expire,
            needs_thread=needs_thread,
        )

    def _admit_locked(self, session: Session) -> bool:
        """Open `session` if it may start now (True); False if the server or its tool is full
        (the caller may queue it). Raises the refusals that never wait. The common case takes
        no more than a few comparisons."""
        if (
            session.metadata_bytes > self._max_metadata
            or (session.client is not None and self._per_client)
            or (session.needs_thread and self._abandoned >= self._max_abandoned)
        ):
            self._check_refusals_locked(session)
        if len(self._active) >= self._max_active:
            return False
        tool = session.tool
        if tool is not None and self.tool_caps:
            cap = self.tool_caps.get(tool)
            if cap is not None and self._tool_active.get(tool, 0) >= cap:
                return False
        self._open_locked(session)
        return True

    def _check_refusals_locked(self, session: Session) -> None:
        """Raise the refusals that never wait: metadata size, the client's share, stuck threads."""
        limits = self.limits
        if session.metadata_bytes > limits.max_metadata_bytes:
            self._rejected[Refusal.METADATA] += 1
            raise SessionError(
                ErrorCode.METADATA_TOO_LARGE,
                f"metadata is {session.metadata_bytes} bytes as compact JSON; "
                f"the limit is {limits.max_metadata_bytes} bytes",
                tool=session.tool,
            )
        client = session.client
        if client is not None and limits.max_sessions_per_client:
            if self._client_load.get(client, 0) >= limits.max_sessions_per_client:
                self._rejected[Refusal.CLIENT_LIMIT] += 1
                raise admission.refuse_client_limit(session.tool, limits.max_sessions_per_client)
        if session.needs_thread and self._abandoned >= limits.max_abandoned_threads:
            self._rejected[Refusal.THREADS] += 1
            raise admission.refuse_threads(session.tool, self._abandoned, limits.max_abandoned_threads)

    def _full_locked(self, session: Session, tool_full: bool | None = None, may_queue: bool = True) -> SessionError:
        """Count and word the refusal of a call that does not fit and may not wait: its tool is
        full (`tool_full`; by default, whenever the server itself is not), else the server. A
        call that could never queue (`may_queue=False`) is not told about the queue."""
        limits = self.limits
        tool = session.tool
        if tool_full is None:
            tool_full = len(self._active) < limits.max_concurrent_sessions
        if tool_full and tool is not None:
            self._rejected[Refusal.TOOL_LIMIT] += 1
            self._tool_stats(tool).rejected_tool_limit += 1
            return admission.refuse_tool_limit(tool, self.tool_caps[tool])
        self._rejected[Refusal.CAPACITY] += 1
        cap = limits.max_concurrent_sessions
        max_queued = limits.max_queued if may_queue else 0
        return admission.refuse_capacity(tool, cap, len(self._queue), max_queued, self.CAPACITY_SCOPE)

    def _enqueue_locked(self, session: Session) -> Waiter:
        """Put `session` at the back of the queue; it counts toward its client's share."""
        waiter = Waiter(session, time.monotonic(), anyio.Event())
        self._queue[waiter] = None
        if session.client is not None:
            self._client_load[session.client] = self._client_load.get(session.client, 0) + 1
        return waiter

    def _open_locked(self, session: Session) -> Session:
        """Admit `session`: give it its id (unless it has one) and its deadline, and count it."""
        if not session.id:
            session.id = self._new_id_locked()
        if not session.request_id:
            session.request_id = session.id
        now = _monotonic()
        session.started = now
        session.hard_deadline = now + session.timeout_seconds
        idle = session.idle_timeout
        session.deadline = session.hard_deadline if idle is None else min(session.hard_deadline, now + idle)
        self._active[session.id] = session
        self._created += 1
        self._metadata_bytes += session.metadata_bytes
        if len(self._active) > self._peak:
            self._peak = len(self._active)
        tool = session.tool
        if tool is not None:
            (self._tools.get(tool) or self._tool_stats(tool)).calls += 1
            self._tool_active[tool] = self._tool_active.get(tool, 0) + 1
        client = session.client
        if client is not None:
            self._client_load[client] = self._client_load.get(client, 0) + 1
        if session.expire:
            expiry = self._expiry
            entry = (session.deadline, session.id)
            heapq.heappush(expiry, entry)
            # Released sessions stay in the heap until their deadline; compact when they dominate.
            if len(expiry) > 64 and len(expiry) > 4 * len(self._active):
                active = self._active
                self._expiry = expiry = [e for e in expiry if e[1] in active]
                heapq.heapify(expiry)
            scope = self._reaper_scope
            if scope is not None and expiry[0] is entry:  # the earliest now: wake the reaper then
                scope.deadline = session.deadline
        return session

    def _new_id_locked(self) -> str:
        return (self._spare_ids or self._more_ids_locked()).pop()

    def _more_ids_locked(self) -> list[str]:
        """Make the next ID_BATCH ids ("s<random>-<seq in hex>": see `_issued_by_us`)."""
        first = self._seq + 1
        self._seq = last = self._seq + ID_BATCH
        prefix = self._id_prefix
        self._spare_ids = ids = [f"{prefix}{seq:x}" for seq in range(last, first - 1, -1)]
        return ids

    async def _wait_in_queue(self, waiter: Waiter, timeout: float) -> Session:  # noqa: ASYNC109 - the queue's own bound
        session = waiter.session
        try:
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:
            # The caller was cancelled (the client gave up or went away) while waiting.
            with self._lock:
                if not waiter.admitted and waiter.refusal is None:
                    self._leave_queue_locked(waiter)
                    self._queue_cancelled += 1
            if waiter.admitted:
                self.end(session, SessionState.CANCELLED, "cancelled by the client before it started")
            raise
        if waiter.admitted:
            return session
        if waiter.refusal is not None:
            refusal, waiter.refusal = waiter.refusal, None
            try:
                raise refusal
            finally:
                del refusal  # no cycle through this frame (see `create`)
        with self._lock:
            if waiter.admitted:  # pragma: no cover - handed a slot as the wait timed out
                return session
            raise self._waited_out_locked(waiter)

    def _waited_out_locked(self, waiter: Waiter) -> SessionError:
        """Take a waiter whose queue timeout passed out of the queue; count and word its refusal,
        naming what it waited for: the server's slots, its tool's cap, or both."""
        waited = self._leave_queue_locked(waiter)
        self._rejected[Refusal.QUEUE_TIMEOUT] += 1
        cap = self.limits.max_concurrent_sessions
        tool = waiter.session.tool
        tool_cap = self.tool_caps.get(tool) if tool is not None else None
        return admission.refuse_queue_timeout(
            tool,
            waited,
            self.CAPACITY_SCOPE,
            cap,
            server_full=len(self._active) >= cap,
            tool_cap=tool_cap,
            tool_full=tool is not None and tool_cap is not None and self._tool_active.get(tool, 0) >= tool_cap,
        )

    def _leave_queue_locked(self, waiter: Waiter) -> float:
        """Take a waiter out of the queue unadmitted; return how long it waited."""
        del self._queue[waiter]
        self._release_client_locked(waiter.session.client)
        waited = time.monotonic() - waiter.enqueued
        self._queue_waits.add(waited)
        return waited

    def _release_client_locked(self, client: Hashable | None) -> None:
        if client is not None:
            left = self._client_load[client] - 1
            if left:
                self._client_load[client] = left
            else:
                del self._client_load[client]

    def _hand_over_locked(self) -> list[Waiter]:
        """Give free slots to the oldest waiters that fit; the caller wakes them after the lock."""
        free = self.limits.max_concurrent_sessions - len(self._active)
        if free <= 0 or not self._queue:
            return []
        caps = self.tool_caps
        taken: dict[str, int] = {}
        chosen: list[Waiter] = []
        for waiter in self._queue:
            tool = waiter.session.tool
            if tool is not None and tool in caps:
                used = self._tool_active.get(tool, 0) + taken.get(tool, 0)
                if used >= caps[tool]:
                    continue  # its tool is full: let the calls behind it through
                taken[tool] = taken.get(tool, 0) + 1
            chosen.append(waiter)
            if len(chosen) >= free:
                break
        limits = self.limits
        for waiter in chosen:
            session = waiter.session
            if session.needs_thread and self._abandoned >= limits.max_abandoned_threads:
                self._leave_queue_locked(waiter)
                self._rejected[Refusal.THREADS] += 1
                waiter.refusal = admission.refuse_threads(session.tool, self._abandoned, limits.max_abandoned_threads)
                continue
            self._admit_waiter_locked(waiter)
        return chosen

    def _admit_waiter_locked(self, waiter: Waiter) -> None:
        """Take a waiter out of the queue and open its session; the caller wakes it after the lock."""
        del self._queue[waiter]
        self._queue_waits.add(time.monotonic() - waiter.enqueued)
        session = waiter.session
        if session.client is not None:
            self._client_load[session.client] -= 1  # counted again as active by _open_locked
        self._open_locked(session)
        waiter.admitted = True

    def set_limits(self, limits: LimitsSettings, tool_caps: Mapping[str, int] | None = None) -> None:
        """Apply new limits to new sessions (running ones keep theirs); admit waiters that now fit."""
        with self._lock:
            self.limits = limits
            if tool_caps is not None:
                self.tool_caps = dict(tool_caps)
            woken = self._hand_over_locked()
        for waiter in woken:
            waiter.event.set()

    def progress(self, session: Session) -> None:
        """The session's work reported progress: move its idle deadline on."""
        idle = session.idle_timeout
        if idle is not None and session.state is _ACTIVE:
            session.deadline = min(session.hard_deadline, time.monotonic() + idle)

    def _issued_by_us(self, session_id: str) -> bool:
        """Whether the id has this manager's random prefix and a sequence number it has issued."""
        if not session_id.startswith(self._id_prefix):
            return False
        digits = session_id[len(self._id_prefix) :]
        if not digits or not all(c in "0123456789abcdef" for c in digits) or digits.startswith("0"):
            return False
        return int(digits, 16) <= self._seq - len(self._spare_ids)

    def _tool_stats(self, tool: str) -> _ToolStats:
        stats = self._tools.get(tool)
        if stats is None:
            if len(self._tools) >= MAX_TRACKED_TOOLS and tool not in self.tool_caps:
                tool = OTHER_TOOLS
            stats = self._tools.setdefault(tool, _ToolStats())
        return stats

    # -- release ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Session | None:
        """The active session with this id, or None."""
        return self._active.get(session_id)

    async def release(
        self, session_id: str, outcome: SessionState | str = SessionState.COMPLETED, error: str | None = None
    ) -> Session:
        """End an active session with `outcome` and return it (now ended).

        Raises:
            SessionError: `unknown_session` for an id never issued here, `already_released`
                for one that has already ended, `invalid_argument` for a bad outcome.
        """
        return self.release_nowait(session_id, outcome, error)

    def release_nowait(
        self, session_id: str, outcome: SessionState | str = SessionState.COMPLETED, error: str | None = None
    ) -> Session:
        """`release` without yielding to the event loop (see `release`)."""
        state = ended_state(outcome, session_id)
        session = self._active.get(session_id)
        if session is None or not self.end(session, state, error):
            raise self._not_active(session_id)
        return session

    def _not_active(self, session_id: str) -> SessionError:
        ended = self._recent.get(session_id)
        if ended is not None:
            return SessionError(
                ErrorCode.ALREADY_RELEASED,
                f"session {session_id} has already ended ({ended.value}); it cannot be released again",
                session_id=session_id,
            )
        if self._issued_by_us(session_id):
            return SessionError(
                ErrorCode.ALREADY_RELEASED,
                f"session {session_id} has already ended; it cannot be released again",
                session_id=session_id,
            )
        # Any string may come here: quote a bounded part of it (the sentence is logged too). An id
        # longer than the quote is none this server could have issued.
        shown = shorten(session_id)
        return SessionError(
            ErrorCode.UNKNOWN_SESSION,
            f"no session with id {shown!r} was issued by this server; use the session_id that session_create returned",
            session_id=shown,
        )

    def end(self, session: Session, state: SessionState, error: str | None = None) -> bool:
        """End `session` if it is still active; False if it had already ended (nothing changes).
        The one place a session ends: release, the reaper, shutdown and the extension's exit
        paths all come here."""
        lock = self._lock
        lock.acquire()  # not `with`: an explicit pair costs half as much, and this runs per call
        try:
            if session.state is not _ACTIVE:
                return False
            now = _monotonic()
            session.state = state
            session.ended = now
            session.error = error
            del self._active[session.id]
            self._ended[state] += 1
            if session.metadata_bytes:
                self._metadata_bytes -= session.metadata_bytes
            duration = now - session.started
            tool = session.tool
            if tool is not None:
                # A tool call's id is never released by a client: no need to remember how it ended.
                left = self._tool_active[tool] - 1
                if left:
                    self._tool_active[tool] = left
                else:
                    del self._tool_active[tool]
                stats = self._tools.get(tool) or self._tool_stats(tool)
                durations = stats.durations
                if state is _COMPLETED:
                    stats.completed += 1
                elif state is _ERROR:
                    stats.errors += 1
                elif state is _TIMEOUT:
                    stats.timeouts += 1
                else:
                    stats.cancelled += 1
            else:
                recent = self._recent
                recent[session.id] = state
                if len(recent) > RECENTLY_ENDED:
                    recent.popitem(last=False)
                durations = self._untooled_durations
            # Each duration goes to one histogram only (its tool's, or the untooled one);
            # `metrics` merges them.
            durations.add(duration)
            if session.client is not None:
                self._release_client_locked(session.client)
            woken = self._hand_over_locked() if self._queue else None
            waiter = self._end_waiters.pop(session.id, None) if self._end_waiters else None
            idle = self._idle_waiter if not self._active else None
            if idle is not None:
                self._idle_waiter = None
        finally:
            lock.release()
        if waiter is not None:
            waiter.set()
        if idle is not None:
            idle.set()
        if woken:
            for queued in woken:
                queued.event.set()
        # The level check first: `isEnabledFor` is a Python call, and the level is WARNING
        # (this logger's own, set at import) unless someone turned the end lines on.
        if end_logger.level <= _INFO and end_logger.isEnabledFor(_INFO):
            _log_end(session, duration)
        return True

    async def wait_idle(self) -> None:
        """Wait until no session is active (at once if none is)."""
        while self._active:
            if self._idle_waiter is None:
                self._idle_waiter = anyio.Event()
            await self._idle_waiter.wait()

    async def wait_ended(self, session: Session) -> SessionState:
        """Wait until `session` has ended (released, timed out or cancelled); return its state."""
        if session.state is _ACTIVE:
            event = self._end_waiters.setdefault(session.id, anyio.Event())
            await event.wait()
        return session.state

    def config_reloaded(self, ok: bool) -> None:
        """Count a config reload: applied (`ok`) or rejected as invalid."""
        with self._lock:
            if ok:
                self._config_reloads += 1
            else:
                self._config_reload_failures += 1

    def shutdown_refused(self) -> None:
        """Count a `server_shutdown` refused for a missing or wrong admin token."""
        with self._lock:
            self._rejected_unauthorized += 1

    # -- stuck threads ---------------------------------------------------------------------

    def thread_abandoned(self) -> None:
        """A call's deadline passed while its sync work still runs in a thread."""
        with self._lock:
            self._abandoned += 1
            if self._no_abandoned.is_set():
                self._no_abandoned = anyio.Event()

    def thread_ended(self) -> None:
        """An abandoned thread has finally returned."""
        with self._lock:
            self._abandoned -= 1
            idle = self._abandoned == 0
        if idle:
            self._no_abandoned.set()

    async def wait_no_abandoned_threads(self) -> None:
        """Return once no abandoned thread is running (at once if none is)."""
        while not self._no_abandoned.is_set():
            await self._no_abandoned.wait()

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> MetricsSnapshot:
        """A consistent snapshot of every counter."""
        with self._lock:
            ended = self._ended
            rejected = self._rejected
            finished = sum(ended.values())
            durations = DurationStats.merged([self._untooled_durations, *(t.durations for t in self._tools.values())])

            def rate(state: SessionState) -> float:
                return ended[state] / finished if finished else 0.0

            return MetricsSnapshot(
                active_sessions=len(self._active),
                peak_concurrent_sessions=self._peak,
                total_sessions_created=self._created,
                total_sessions_completed=ended[SessionState.COMPLETED],
                total_sessions_timeout=ended[SessionState.TIMEOUT],
                total_sessions_error=ended[SessionState.ERROR],
                total_sessions_cancelled=ended[SessionState.CANCELLED],
                sessions_rejected_capacity=rejected[Refusal.CAPACITY],
                sessions_rejected_metadata_size=rejected[Refusal.METADATA],
                sessions_rejected_shutdown=rejected[Refusal.SHUTDOWN],
                sessions_rejected_queue_timeout=rejected[Refusal.QUEUE_TIMEOUT],
                sessions_rejected_tool_limit=rejected[Refusal.TOOL_LIMIT],
                sessions_rejected_client_limit=rejected[Refusal.CLIENT_LIMIT],
                sessions_rejected_threads=rejected[Refusal.THREADS],
                sessions_rejected_store_unavailable=rejected[Refusal.STORE],
                queued_sessions=len(self._queue),
                queued_calls_cancelled=self._queue_cancelled,
                queue_wait_p95=self._queue_waits.quantile(0.95),
                max_abandoned_threads=self.limits.max_abandoned_threads,
                shutdown_rejected_unauthorized=self._rejected_unauthorized,
                current_metadata_bytes=self._metadata_bytes,
                abandoned_threads=self._abandoned,
                success_rate=rate(SessionState.COMPLETED),
                error_rate=rate(SessionState.ERROR),
                timeout_rate=rate(SessionState.TIMEOUT),
                average_session_duration=durations.mean,
                duration_p50=durations.quantile(0.50),
                duration_p95=durations.quantile(0.95),
                duration_p99=durations.quantile(0.99),
                uptime_seconds=time.monotonic() - self._started_at,
                shutdown_requested=self._shutting_down,
                config_reloads=self._config_reloads,
                config_reload_failures=self._config_reload_failures,
                limits=self.limits.model_dump(),
                tools={
                    name: ToolMetrics(
                        calls=s.calls,
                        completed=s.completed,
                        errors=s.errors,
                        timeouts=s.timeouts,
                        cancelled=s.cancelled,
                        p95=s.durations.quantile(0.95),
                        active=self._tool_active.get(name, 0),
                        max_concurrent=self.tool_caps.get(name),
                        rejected_tool_limit=s.rejected_tool_limit,
                    )
                    for name, s in self._tools.items()
                },
            )

    async def cluster_metrics(self) -> ClusterMetrics | None:
        """The cluster's totals (cluster mode, see `server.cluster`); None for a lone manager."""
        return None

    def duration_histograms(self, bounds: Sequence[float]) -> dict[str, HistogramReading]:
        """Durations of finished sessions per tool at `bounds` (ascending seconds); sessions made
        by `session_create` under `NO_TOOL`. Tools with no finished session are left out."""
        with self._lock:
            readings = {name: s.durations.reading(bounds) for name, s in self._tools.items() if s.durations.count}
            if self._untooled_durations.count:
                readings[NO_TOOL] = self._untooled_durations.reading(bounds)
            return readings

    def reset_metrics(self) -> None:
        """Start counting afresh; active sessions stay and are counted as created."""
        with self._lock:
            self._reset_counters()

    # -- shutdown --------------------------------------------------------------------------

    async def wait_shutting_down(self) -> None:
        """Return once a shutdown has begun (at once if one has)."""
        if not self._shutting_down:
            if self._shutdown_begun is None:
                self._shutdown_begun = anyio.Event()
            await self._shutdown_begun.wait()

    async def shutdown(self, timeout: float) -> ShutdownReport:  # noqa: ASYNC109 - a drain deadline
        """Stop admitting, drain active sessions for up to `timeout` seconds, cancel the rest.

        A second call while one runs waits for it and returns the same report.
        """
        if self._shutdown_done is not None:
            await self._shutdown_done.wait()
            if self._report is not None:
                return self._report
        self._shutdown_done = anyio.Event()
        started = time.monotonic()
        if self._shutdown_begun is not None:
            self._shutdown_begun.set()
        with self._lock:
            self._shutting_down = True
            initial = len(self._active)
            total = self._created
            queued = list(self._queue)
            for waiter in queued:  # they get no slot now: refuse them as new work
                self._leave_queue_locked(waiter)
                self._rejected[Refusal.SHUTDOWN] += 1
                waiter.refusal = admission.refuse_shutdown(waiter.session.tool)
        for waiter in queued:
            waiter.event.set()
        logger.info("Shutting down: waiting up to %.3gs for %s active session(s)", timeout, initial)
        with anyio.move_on_after(timeout):
            await self.wait_idle()
        left = list(self._active.values())
        if left:
            logger.warning("Cancel %s session(s): shutdown timeout of %.3gs exceeded", len(left), timeout)
        cancelled = 0
        for session in left:
            if self.end(session, SessionState.CANCELLED, "cancelled by server shutdown"):
                cancelled += 1
                if session.on_cancel is not None:
                    session.on_cancel()
        self._report = ShutdownReport(
            shutdown_duration=time.monotonic() - started,
            initial_active_sessions=initial,
            final_active_sessions=len(self._active),
            sessions_completed_during_shutdown=initial - len(left),
            sessions_cancelled_at_deadline=cancelled,
            timeout_reached=bool(left),
            total_sessions_at_shutdown=total,
        )
        self._shutdown_done.set()
        return self._report
