"""The session manager: admission, deadlines, release, metrics and graceful shutdown.

Tier: runtime core, usable without MCP (async API). Every counter changes in the manager, under
one lock, and every way a session ends (completed, error, timeout, cancelled) goes through
`end`. Admission is O(1): a counter, never a scan. Deadlines are enforced by a reaper that
sleeps until the earliest one in a cancel scope whose deadline moves. At a session's deadline it
stops the work that runs it through `session.on_cancel` (a tool call's: the call then ends the
session as it stops), or ends the session itself when nothing runs it (a `session_create`
session); one made with `expire=False` is left to its caller. Shutdown waits on an event that
the last release sets. No polling anywhere.

`SessionManager` is three layers, a module each: `server.manager_state` (its state, its
constructor, its metrics), `server.intake` (`create`, the refusals, the queue) and this one:
the per-call path (`open_call`, `end`), release, the reaper and shutdown. The per-call path
stays here, beside the module globals it reads (`_ACTIVE`, `_monotonic`, ...). The record of
one session is `server.session`.

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

import asyncio
import heapq
import hmac
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel

from server import admission
from server.admission import Refusal
from server.errors import ErrorCode, SessionError, shorten
from server.intake import Intake
from server.logs import EventReport
from server.metrics import ShutdownReport
from server.session import Session, SessionState, _log_end, end_logger, ended_state, timeout_reason

logger = logging.getLogger(__name__)

#: How many ended `session_create` session ids are remembered to say *how* they ended (a tool
#: call's id is never released by a client, so it is not remembered); older ones are still
#: recognised as ours (their id is signed) and refused as already released.
RECENTLY_ENDED = 4096
#: How many session ids are made at a time (see `SessionManager._more_ids_locked`).
ID_BATCH = 256
#: Hex digits of the signature a `session_create` session's id carries (64 bits).
SIGNATURE_CHARS = 16
#: Every id a manager issues: "s", 12 random hex digits, "-", the sequence number in hex (no
#: leading 0), and for a `session_create` session "." and its signature (see
#: `SessionManager._more_ids_locked` and `_signed_id_locked`, and the prefix made in
#: `server.manager_state`). Cluster mode names its Redis keys after ids: a text of another shape
#: was issued by no replica and is not looked up there.
ISSUED_ID = re.compile(rf"s[0-9a-f]{{12}}-[1-9a-f][0-9a-f]*(?:\.[0-9a-f]{{{SIGNATURE_CHARS}}})?")

# The members as module globals for the per-call paths: `SessionState.X` is an attribute lookup
# through the enum's metaclass (about 0.1 µs each on Python 3.11), a global is a dict read.
_ACTIVE = SessionState.ACTIVE
_COMPLETED = SessionState.COMPLETED
_ERROR = SessionState.ERROR
_TIMEOUT = SessionState.TIMEOUT
_monotonic = time.monotonic
_INFO = logging.INFO


def checked_drain_timeout(value: object, name: str) -> float:
    """`value` as a drain deadline in seconds: a finite int or float >= 0 (not a bool).

    Raises:
        TypeError: `value` is not a number (a string, a bool, None, ...).
        ValueError: `value` is NaN, infinite or negative.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number of seconds (an int or a float, finite and >= 0), "
            f"got {type(value).__name__}: {value!r:.80}"
        )
    if not 0 <= value < math.inf or value > _LONGEST_DRAIN:  # NaN fails both comparisons
        raise ValueError(f"{name} must be a finite number of seconds >= 0 (0: cancel at once), got {value!r:.80}")
    return float(value)


#: Past it a drain deadline is no number of seconds a float holds (an int of 400 digits, say).
_LONGEST_DRAIN = sys.float_info.max


def runs_a_call(session_id: str) -> SessionError:
    """The refusal of a client's release of a tool call's session, running or ended (see
    `SessionManager.release`). It names no tool: the call may be another client's."""
    return SessionError(
        ErrorCode.INVALID_ARGUMENT,
        f"session {session_id} is the session of a tool call, and it ends when that call does; "
        "session_release ends only sessions made by session_create",
        session_id=session_id,
    )


class SessionManager(Intake):
    """Tracks sessions against the limits it was built with. Build one per server; never global."""

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

    async def close_at_exit(self) -> None:
        """Do what the end of `running()` must not leave undone, for an exit that cannot wait for
        that block to end (work left running past the shutdown holds it open): nothing here; a
        cluster replica writes its last session ends and leaves the cluster."""

    async def _reap(self) -> None:
        """End (or stop the call of) each session at its deadline; warn of deadlines reached late
        (`_LateDeadlines`: the event loop was held, so the reaper could not run)."""
        late = _LateDeadlines()
        # Deadlines passed before the reaper ran, or while it ended its previous batch (10,000
        # sessions logged at INFO take about 0.2 s), are late by no held loop.
        began = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                worst, worst_tool = 0.0, None
                batch = 0
                while self._expiry and self._expiry[0][0] <= now:
                    if batch == REAP_BATCH:  # let the answers and other calls through, then go on
                        break
                    _, session_id = heapq.heappop(self._expiry)
                    session = self._active.get(session_id)  # None: released before its deadline
                    if session is None:
                        continue
                    if session.deadline > now:  # progress moved it on: look again then
                        heapq.heappush(self._expiry, (session.deadline, session_id))
                        continue
                    if now - max(session.deadline, began) > worst:
                        worst, worst_tool = now - max(session.deadline, began), session.tool
                    if session.deadline < session.hard_deadline:
                        session.idle_expired = True
                    batch += 1
                    stop = session.on_cancel
                    if stop is not None:
                        # A call runs it: stop the call, which ends the session as it stops. Until
                        # then (a shield in the tool can hold the cancellation off) its work still
                        # runs, so it keeps its slot and counts as active.
                        session.stop_requested = now
                        stop()
                    else:
                        self.end(session, SessionState.TIMEOUT, timeout_reason(session))
                if worst >= LATE_DEADLINE_SECONDS:
                    late.note(worst, worst_tool)
                began = time.monotonic()
                if batch == REAP_BATCH:
                    await anyio.lowlevel.checkpoint()
                    continue
                scope = anyio.CancelScope()
                if self._expiry:
                    scope.deadline = self._expiry[0][0]
                self._reaper_scope = scope
                with scope:
                    await anyio.sleep_forever()
        finally:
            late.close()

    # -- admission -------------------------------------------------------------------------

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
        session = Session("", request_id, tool, timeout, idle_timeout=idle_timeout, needs_thread=needs_thread)
        lock = self._lock
        lock.acquire()  # not `with`: an explicit pair costs half as much, and this runs per call
        try:
            return session if self._admit_locked(session) else None
        finally:
            lock.release()

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

    def _open_locked(self, session: Session) -> Session:
        """Admit `session`: give it its id (unless it has one) and its deadline, and count it."""
        if not session.id:
            session.id = self._new_id_locked()
        if session.request_id is None:
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
            session.stats = stats = self._tools.get(tool) or self._tool_stats(tool)
            stats.calls += 1
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

    def _signed_id_locked(self) -> str:
        """A new id with its signature ("<id>.<signature>"), for a session made for no tool: its
        client releases it by its id, so the id must be no guess from another's (a client that
        made one session could otherwise release the next, another client's)."""
        base = self._new_id_locked()
        return f"{base}.{self._signature(base)}"

    def _signature(self, base: str) -> str:
        return hmac.new(self._id_key, base.encode(), "sha256").hexdigest()[:SIGNATURE_CHARS]

    def _more_ids_locked(self) -> list[str]:
        """Make the next ID_BATCH ids ("s<random>-<seq in hex>": see `_issued_by_us`)."""
        first = self._seq + 1
        self._seq = last = self._seq + ID_BATCH
        prefix = self._id_prefix
        self._spare_ids = ids = [f"{prefix}{seq:x}" for seq in range(last, first - 1, -1)]
        return ids

    def _release_client_locked(self, client: Hashable | None) -> None:
        if client is not None:
            left = self._client_load[client] - 1
            if left:
                self._client_load[client] = left
            else:
                del self._client_load[client]

    def progress(self, session: Session) -> bool:
        """The session's work reported progress: move its idle deadline on. False once the
        session has ended (its caller answered: the report is for nobody)."""
        if session.state is not _ACTIVE:
            return False
        idle = session.idle_timeout
        if idle is not None:
            session.deadline = min(session.hard_deadline, time.monotonic() + idle)
        return True

    def _issued_by_us(self, session_id: str) -> bool:
        """Whether the id has this manager's random prefix and a sequence number it has issued
        (and, if signed, its signature)."""
        if not session_id.startswith(self._id_prefix):
            return False
        base, signed, signature = session_id.partition(".")
        if signed and not hmac.compare_digest(signature, self._signature(base)):
            return False
        digits = base[len(self._id_prefix) :]
        if not digits or not all(c in "0123456789abcdef" for c in digits) or digits.startswith("0"):
            return False
        return int(digits, 16) <= self._seq - len(self._spare_ids)

    def _unsigned_form_of_ours(self, session_id: str) -> bool:
        """Whether `session_id` is a signed id of a session that is active or recently ended here,
        with its signature cut off (copied short, say): that id was never issued, so it is
        unknown, not a session that has already ended."""
        if "." in session_id or not session_id.startswith(self._id_prefix):
            return False
        signed = f"{session_id}.{self._signature(session_id)}"
        return signed in self._active or signed in self._recent

    # -- release ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Session | None:
        """The active session with this id, or None."""
        return self._active.get(session_id)

    async def release(
        self,
        session_id: str,
        outcome: SessionState | str = SessionState.COMPLETED,
        error: str | None = None,
        *,
        tool_calls: bool = True,
    ) -> Session:
        """End an active session with `outcome` and return it (now ended).

        With `tool_calls=False` (what the `session_release` tool passes) a session made for a
        tool (`create(tool=...)`: a tool call's) is refused: it ends with its call, and a client
        that released it would free the slot of work that still runs.

        Raises:
            SessionError: `unknown_session` for an id never issued here, `already_released`
                for one that has already ended, `invalid_argument` for a bad outcome or (with
                `tool_calls=False`) a tool call's session.
        """
        return self.release_nowait(session_id, outcome, error, tool_calls=tool_calls)

    def release_nowait(
        self,
        session_id: str,
        outcome: SessionState | str = SessionState.COMPLETED,
        error: str | None = None,
        *,
        tool_calls: bool = True,
    ) -> Session:
        """`release` without yielding to the event loop (see `release`)."""
        state = ended_state(outcome, session_id)
        session = self._active.get(session_id)
        if session is not None and session.tool is not None and not tool_calls:
            raise runs_a_call(session_id)
        if session is None or not self.end(session, state, error):
            raise self._not_active(session_id, tool_calls)
        return session

    def _not_active(self, session_id: str, tool_calls: bool = True) -> SessionError:
        """Why `session_id` names no active session. With `tool_calls=False` (a client's
        release), an ended tool call's session is refused as a running one is: it was never
        the client's to release, so "already ended" would mislead."""
        ended = self._recent.get(session_id)
        if ended is not None:
            return SessionError(
                ErrorCode.ALREADY_RELEASED,
                f"session {session_id} has already ended ({ended.value}); it cannot be released again",
                session_id=session_id,
            )
        if self._unsigned_form_of_ours(session_id):
            return SessionError(
                ErrorCode.UNKNOWN_SESSION,
                f"no session with id {session_id!r}: the ids session_create returns end in '.' and a signature "
                "of 16 hex digits; pass the whole session_id",
                session_id=session_id,
            )
        if self._issued_by_us(session_id):
            if not tool_calls and "." not in session_id:  # unsigned: a tool call's (see `_signed_id_locked`)
                return runs_a_call(session_id)
            return SessionError(
                ErrorCode.ALREADY_RELEASED,
                f"session {session_id} has already ended; it cannot be released again",
                session_id=session_id,
            )
        # Any string may come here: quote a bounded part of it (the sentence is logged too). An id
        # longer than the quote is none this server could have issued.
        shown = shorten(session_id)
        return SessionError(ErrorCode.UNKNOWN_SESSION, self._never_issued(shown), session_id=shown)

    def _never_issued(self, shown: str) -> str:
        """The sentence for an id nobody issued (`shown`: the id as quoted)."""
        return (
            f"no session with id {shown!r} was issued by this server; use the session_id that session_create returned"
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
                stats = session.stats  # set when it was opened (or by `reset_metrics` since)
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
            if self._queue:
                if tool is not None and tool in self._lines:
                    self._line_ready_locked(tool)  # its tool may have room again: its line too
                woken = self._hand_over_locked()
            else:
                woken = None
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

    def end_reservations(self, reason: str) -> int:
        """End every active session made by `session_create` (no tool call's) as `cancelled`,
        with `reason`; return how many. For when no client is left to release them (a stdio
        client that closed stdin): a shutdown would otherwise wait its whole drain for them."""
        reservations = [session for session in self._active.values() if session.tool is None]
        return sum(self.end(session, SessionState.CANCELLED, reason) for session in reservations)

    # -- shutdown --------------------------------------------------------------------------

    async def wait_shutting_down(self) -> None:
        """Return once a shutdown has begun (at once if one has)."""
        if not self._shutting_down:
            if self._shutdown_begun is None:
                self._shutdown_begun = anyio.Event()
            await self._shutdown_begun.wait()

    def cancelled_at_shutdown(self, request_id: str, tool: str) -> str | None:
        """The id of the session of the call of `tool` under `request_id` (as the session holds
        it: text) that the shutdown cancelled at its drain deadline; None if there is none, or
        more than one (calls of two clients). For the answer to a call whose work held that
        cancellation off, which the transport gives at the exit (`server.unanswered`)."""
        return self._cancelled_at_deadline.get((request_id, tool))

    async def shutdown(self, timeout: float) -> ShutdownReport:  # noqa: ASYNC109 - a drain deadline
        """Stop admitting, drain active sessions for up to `timeout` seconds, cancel the rest.

        A second call while one runs waits for it and returns the same report. Once begun, a
        shutdown runs to its end even if its caller is cancelled (a client giving up on its
        `server_shutdown`): the caller's cancellation takes effect when the drain is over, at
        most `timeout` seconds on, since a shutdown left half-way would admit nothing, cancel
        nothing and leave every later call waiting for its report.

        Raises:
            TypeError, ValueError: `timeout` is not a finite number of seconds >= 0 (checked
                before anything changes: the manager still admits).
        """
        timeout = checked_drain_timeout(timeout, "timeout")
        while self._shutdown_done is not None:  # one runs, or ran: join it
            await self._shutdown_done.wait()
            if self._report is not None:
                return self._report
            # It failed before its report (it raised to its caller): run it again, as the first.
        self._shutdown_done = done = anyio.Event()
        try:
            return await self._run_shutdown(timeout)
        finally:
            if self._report is None:
                # It raised: let the next call run it again rather than wait for a report that
                # never comes. Those waiting now wake, and the first of them does.
                self._shutdown_done = None
            done.set()

    async def _run_shutdown(self, timeout: float) -> ShutdownReport:  # noqa: ASYNC109 - a drain deadline
        started = time.monotonic()
        if self._shutdown_begun is not None:
            self._shutdown_begun.set()
        with self._lock:
            self._shutting_down = True
            initial = len(self._active)
            total = self._created
            cancelled_before = self._ended[SessionState.CANCELLED]
            queued = list(self._queue)
            for waiter in queued:  # they get no slot now: refuse them as new work
                self._leave_queue_locked(waiter)
                self._rejected[Refusal.SHUTDOWN] += 1
                waiter.refusal = admission.refuse_shutdown(waiter.session.tool)
        for waiter in queued:
            waiter.event.set()
        logger.info("Shutting down: waiting up to %.3gs for %s active session(s)", timeout, initial)
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            await self.wait_idle()
        left = list(self._active.values())
        # Of those that ended during the drain, the ones cancelled (by their clients; no new
        # session is admitted meanwhile). Bounded: `reset_metrics` may have restarted the count.
        cancelled_early = min(max(0, self._ended[SessionState.CANCELLED] - cancelled_before), initial - len(left))
        if left:
            logger.warning("Cancel %s session(s): shutdown timeout of %.3gs exceeded", len(left), timeout)
        cancelled = 0
        for session in left:
            if self.end(session, SessionState.CANCELLED, "cancelled by server shutdown"):
                cancelled += 1
                if session.tool is not None and session.request_id is not None:
                    key = (session.request_id, session.tool)
                    # Two clients' calls of one tool under one request id: neither can be named.
                    self._cancelled_at_deadline[key] = None if key in self._cancelled_at_deadline else session.id
                if session.on_cancel is not None:
                    session.on_cancel()
        self._report = ShutdownReport(
            shutdown_duration=time.monotonic() - started,
            initial_active_sessions=initial,
            final_active_sessions=len(self._active),
            sessions_completed_during_shutdown=initial - len(left) - cancelled_early,
            sessions_cancelled_at_deadline=cancelled,
            timeout_reached=bool(left),
            total_sessions_at_shutdown=total,
            sessions_cancelled_during_shutdown=cancelled_early,
        )
        return self._report


#: The reaper reports a deadline it enforced this long or longer after it passed (`_LateDeadlines`).
LATE_DEADLINE_SECONDS = 0.1
#: The reaper ends at most this many sessions before it lets the event loop run other tasks.
REAP_BATCH = 1000
#: What holds the event loop, so that the reaper runs late: told to the operator.
_LOOP_HELD = (
    "the event loop was held meanwhile, so nothing could stop the call on time: by a large result "
    "serialised on it, by CPU-bound or GIL-holding work in a sync tool's thread (pure-Python loops, "
    "regular expressions, C code that keeps the GIL), or by blocking code in an async tool; or the whole "
    "process got no CPU time meanwhile (a host short of CPU, a paused container)"
)


class _LateDeadlines:
    """The reaper's warning that it enforced a deadline late: it runs on the event loop, so while
    the loop is held, deadlines pass unenforced and their callers get their timeouts that much
    late. One line per `logs.REPORT_SECONDS` at most (`EventReport`), with the worst lateness since
    the last line. Noted only when the reaper wakes to a deadline: nothing on a call's path."""

    def __init__(self) -> None:
        self._worst = 0.0
        self._tool: str | None = None
        self._report = EventReport(logger, logging.WARNING, self._first, self._more)
        self._flush: asyncio.TimerHandle | None = None

    def note(self, late: float, tool: str | None) -> None:
        """The reaper reached a deadline `late` seconds after it passed (the worst of this wake)."""
        if late > self._worst:
            self._worst, self._tool = late, tool
        due = self._report.note()
        if due is not None:  # a count started: tell it when its period is over
            try:
                self._flush = asyncio.get_running_loop().call_later(due, self._report.flush)
            except RuntimeError:  # not asyncio's loop (a manager run on trio): told at the next line, or at close
                pass

    def close(self) -> None:
        """The reaper stops: tell the count not yet told."""
        if self._flush is not None:
            self._flush.cancel()
        self._report.flush()

    def _taken(self) -> tuple[float, str | None]:
        worst, tool = self._worst, self._tool
        self._worst, self._tool = 0.0, None
        return worst, tool

    def _first(self) -> str:
        worst, tool = self._taken()
        what = f"tool {tool!r}" if tool is not None else "a session"
        return f"The deadline of {what} was enforced {worst:.1f}s late: {_LOOP_HELD}"

    def _more(self, count: int) -> str:
        worst, _ = self._taken()
        return (
            f"{count} more deadline(s) were enforced late since the last report, up to {worst:.1f}s late: {_LOOP_HELD}"
        )
