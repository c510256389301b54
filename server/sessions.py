"""The session manager: admission, deadlines, release, metrics and graceful shutdown.

Tier: runtime core, usable without MCP (async API). Every counter changes here, under one
lock, and every way a session ends (completed, error, timeout, cancelled) goes through
`_finish`. Admission is O(1): a counter, never a scan. Sessions made without a caller
waiting on them (`session_create`) are expired by a reaper that sleeps until the earliest
deadline in a cancel scope whose deadline moves; shutdown waits on an event that the last
release sets. No polling anywhere.

Example:
    ```python
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=10))
    async with manager.running():
        session = await manager.create(tool="search", timeout_seconds=5)
        await manager.release(session.id)
        print(manager.metrics().total_sessions_completed)  # 1
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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import anyio

from server.config import LimitsSettings
from server.errors import ErrorCode, SessionError
from server.metrics import DurationStats, MetricsSnapshot, ShutdownReport, ToolMetrics, bucket_of

logger = logging.getLogger(__name__)

#: How many ended session ids are remembered to say *how* they ended; older ones are still
#: recognised as ours (their id is signed) and refused as already released.
RECENTLY_ENDED = 4096
#: Per-tool statistics are kept for at most this many tool names; the rest share one entry.
MAX_TRACKED_TOOLS = 1024
OTHER_TOOLS = "(other)"


class SessionState(StrEnum):
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
    request_id: str
    tool: str | None
    provider: str
    model: str
    metadata: Any
    metadata_bytes: int
    timeout_seconds: float
    #: `time.monotonic()` at creation and at the deadline (the clock of the asyncio event loop).
    started: float
    deadline: float
    #: Wall-clock creation time (`time.time()`), only for `expires_at`.
    created_at: float
    state: SessionState = SessionState.ACTIVE
    ended: float | None = None
    error: str | None = None
    #: Set by whoever runs the session's work, to stop it when the session is ended for it:
    #: at its deadline (by the reaper) or at the shutdown deadline.
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def expires_at(self) -> datetime:
        """When the session times out if still active (wall clock, UTC)."""
        return datetime.fromtimestamp(self.created_at + self.timeout_seconds, UTC)

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
        raise SessionError(ErrorCode.INVALID_ARGUMENT, f"metadata is not plain JSON: {exc}") from None
    return len(text.encode("utf-8", errors="surrogatepass"))


def _check_timeout(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT,
            f"timeout_seconds must be a finite number of seconds greater than 0, got {value!r}",
        )


class SessionManager:
    """Tracks sessions against the limits it was built with. Build one per server; never global."""

    def __init__(self, limits: LimitsSettings | None = None) -> None:
        self.limits = limits if limits is not None else LimitsSettings()
        self._lock = threading.Lock()
        # Ids are "s<random>-<seq>": unguessable across servers and restarts, and recognisable
        # as ours after they end without remembering every one of them.
        self._id_prefix = f"s{secrets.token_hex(6)}-"
        self._seq = 0
        self._active: dict[str, Session] = {}
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
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._created = len(self._active)
        self._peak = len(self._active)
        self._ended: dict[SessionState, int] = {s: 0 for s in SessionState if s is not SessionState.ACTIVE}
        self._rejected_capacity = 0
        self._rejected_metadata = 0
        self._rejected_shutdown = 0
        self._rejected_unauthorized = 0
        self._durations = DurationStats()
        self._tools: dict[str, _ToolStats] = {}
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
                if self._finish(session, SessionState.TIMEOUT, f"deadline of {session.timeout_seconds:g}s reached"):
                    if session.on_cancel is not None:
                        session.on_cancel()  # stop the call that owns it, if one waits
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

    async def create(
        self,
        *,
        tool: str | None = None,
        provider: str = "",
        model: str = "",
        timeout_seconds: float | None = None,
        metadata: Any = None,
        request_id: str | None = None,
        expire: bool = True,
    ) -> Session:
        """Admit a new session or raise `SessionError`; O(1) in the number of open sessions.

        Unless `expire=False`, the reaper ends the session as `timeout` at its deadline and then
        calls its `on_cancel` (set by whoever runs the session's work, to stop it); with
        `expire=False` the caller owns the deadline.

        Raises:
            SessionError: `shutting_down`, `invalid_argument`, `metadata_too_large` or
                `capacity_exceeded`; each refusal is counted and creates no session.
        """
        return self.create_nowait(
            tool=tool,
            provider=provider,
            model=model,
            timeout_seconds=timeout_seconds,
            metadata=metadata,
            request_id=request_id,
            expire=expire,
        )

    def create_nowait(
        self,
        *,
        tool: str | None = None,
        provider: str = "",
        model: str = "",
        timeout_seconds: float | None = None,
        metadata: Any = None,
        request_id: str | None = None,
        expire: bool = True,
    ) -> Session:
        """`create` for callers already on the event loop that must not yield (see `create`)."""
        if self._shutting_down:
            with self._lock:
                self._rejected_shutdown += 1
            raise SessionError(
                ErrorCode.SHUTTING_DOWN, "the server is shutting down and accepts no new work", tool=tool
            )
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
        size = 0 if metadata is None else metadata_size(metadata)
        with self._lock:
            if size > limits.max_metadata_bytes:
                self._rejected_metadata += 1
                raise SessionError(
                    ErrorCode.METADATA_TOO_LARGE,
                    f"metadata is {size} bytes as compact JSON; the limit is {limits.max_metadata_bytes} bytes",
                    tool=tool,
                )
            active = self._active
            if len(active) >= limits.max_concurrent_sessions:
                self._rejected_capacity += 1
                raise SessionError(
                    ErrorCode.CAPACITY_EXCEEDED,
                    f"the server is at its limit of {limits.max_concurrent_sessions} concurrent sessions; "
                    "retry after a session ends",
                    tool=tool,
                )
            self._seq = seq = self._seq + 1
            session_id = f"{self._id_prefix}{seq:x}"  # "s<random>-<seq in hex>": see `_issued_by_us`
            now = time.monotonic()
            # Positional, in field order (id, request_id, tool, provider, model, metadata,
            # metadata_bytes, timeout_seconds, started, deadline, created_at): half the cost of
            # keywords on a path every tool call takes.
            session = Session(
                session_id,
                request_id if request_id is not None else session_id,
                tool,
                provider,
                model,
                metadata,
                size,
                timeout,
                now,
                now + timeout,
                time.time(),
            )
            active[session_id] = session
            self._created += 1
            self._metadata_bytes += size
            if len(active) > self._peak:
                self._peak = len(active)
            if tool is not None:
                (self._tools.get(tool) or self._tool_stats(tool)).calls += 1
            if expire:
                self._schedule_expiry(session)
        return session

    def _issued_by_us(self, session_id: str) -> bool:
        """Whether the id has this manager's random prefix and a sequence number it has issued."""
        if not session_id.startswith(self._id_prefix):
            return False
        digits = session_id[len(self._id_prefix) :]
        if not digits or not all(c in "0123456789abcdef" for c in digits) or digits.startswith("0"):
            return False
        return int(digits, 16) <= self._seq

    def _schedule_expiry(self, session: Session) -> None:
        entry = (session.deadline, session.id)
        heapq.heappush(self._expiry, entry)
        # Released sessions stay in the heap until their deadline; compact when they dominate.
        if len(self._expiry) > 64 and len(self._expiry) > 4 * len(self._active):
            active = self._active
            self._expiry = [e for e in self._expiry if e[1] in active]
            heapq.heapify(self._expiry)
        scope = self._reaper_scope
        if scope is not None and self._expiry[0] is entry:
            scope.deadline = session.deadline

    def _tool_stats(self, tool: str) -> _ToolStats:
        stats = self._tools.get(tool)
        if stats is None:
            if len(self._tools) >= MAX_TRACKED_TOOLS:
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
        if type(outcome) is SessionState:
            state = outcome
        else:
            try:
                state = SessionState(outcome)
            except ValueError:
                state = SessionState.ACTIVE
        if state is SessionState.ACTIVE:
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT,
                f"outcome must be one of completed, error, timeout, cancelled; got {outcome!r}",
                session_id=session_id,
            )
        session = self._active.get(session_id)
        if session is None or not self._finish(session, state, error):
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
        return SessionError(
            ErrorCode.UNKNOWN_SESSION,
            f"no session with id {session_id!r} was issued by this server; use the session_id "
            "that session_create returned",
            session_id=session_id,
        )

    def _finish(self, session: Session, state: SessionState, error: str | None = None) -> bool:
        """The one place a session ends. False if it had already ended (nothing changes)."""
        with self._lock:
            if session.state is not SessionState.ACTIVE:
                return False
            now = time.monotonic()
            session.state = state
            session.ended = now
            session.error = error
            session_id = session.id
            active = self._active
            del active[session_id]
            recent = self._recent
            recent[session_id] = state
            if len(recent) > RECENTLY_ENDED:
                recent.popitem(last=False)
            self._ended[state] += 1
            self._metadata_bytes -= session.metadata_bytes
            duration = now - session.started
            bucket = bucket_of(duration)
            self._durations.add(duration, bucket)
            tool = session.tool
            if tool is not None:
                stats = self._tools.get(tool) or self._tool_stats(tool)
                stats.durations.add(duration, bucket)
                if state is SessionState.COMPLETED:
                    stats.completed += 1
                elif state is SessionState.ERROR:
                    stats.errors += 1
                elif state is SessionState.TIMEOUT:
                    stats.timeouts += 1
                else:
                    stats.cancelled += 1
            waiter = self._end_waiters.pop(session.id, None) if self._end_waiters else None
            idle = self._idle_waiter if not active else None
            if idle is not None:
                self._idle_waiter = None
        if waiter is not None:
            waiter.set()
        if idle is not None:
            idle.set()
        return True

    async def wait_idle(self) -> None:
        """Wait until no session is active (at once if none is)."""
        while self._active:
            if self._idle_waiter is None:
                self._idle_waiter = anyio.Event()
            await self._idle_waiter.wait()

    async def wait_ended(self, session: Session) -> SessionState:
        """Wait until `session` has ended (released, timed out or cancelled); return its state."""
        if session.state is SessionState.ACTIVE:
            event = self._end_waiters.setdefault(session.id, anyio.Event())
            await event.wait()
        return session.state

    def end(self, session: Session, state: SessionState, error: str | None = None) -> bool:
        """End `session` if it is still active (the extension's exit path); False if it already ended."""
        return self._finish(session, state, error)

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
            finished = sum(ended.values())
            durations = self._durations

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
                sessions_rejected_capacity=self._rejected_capacity,
                sessions_rejected_metadata_size=self._rejected_metadata,
                sessions_rejected_shutdown=self._rejected_shutdown,
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
                limits=self.limits.model_dump(),
                tools={
                    name: ToolMetrics(
                        calls=s.calls,
                        completed=s.completed,
                        errors=s.errors,
                        timeouts=s.timeouts,
                        cancelled=s.cancelled,
                        p95=s.durations.quantile(0.95),
                    )
                    for name, s in self._tools.items()
                },
            )

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
        logger.info("Shutting down: waiting up to %.3gs for %s active session(s)", timeout, initial)
        with anyio.move_on_after(timeout):
            await self.wait_idle()
        left = list(self._active.values())
        if left:
            logger.warning("Cancel %s session(s): shutdown timeout of %.3gs exceeded", len(left), timeout)
        cancelled = 0
        for session in left:
            if self._finish(session, SessionState.CANCELLED, "cancelled by server shutdown"):
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
