"""Admission off the per-call path: `create`, the refusals it counts, and the queue.

Tier: runtime core, a base of `server.sessions.SessionManager`, on `server.manager_state`. A
tool call that fits is admitted by `SessionManager.open_call` without coming here; what needs
more goes through `create`: the request is checked (timeout, labels, metadata size), refused
(each refusal counted, and worded by `server.admission`), admitted, or queued when the
server or its tool is full. Queued calls wait in FIFO order; the release that frees a slot
hands it, under the manager's lock, to the first waiter that fits (`_hand_over_locked`), so a
newcomer never takes a slot a waiter could use. The queue is kept in lines, one per tool with a
cap and one for every other call, and the first calls of the lines whose tool has room in a heap
by arrival: finding that waiter costs a look at the top of the heap, not a walk past every
waiting call of a full tool, nor a look at every tool's line.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Unpack

import anyio

from server import admission
from server.admission import Refusal, SessionRequest, Waiter
from server.config import LimitsSettings, Settings
from server.errors import ErrorCode, SessionError, shorten
from server.manager_state import ManagerState, checked_tool_caps, limits_and_caps
from server.session import Session, SessionState, metadata_size


def _check_timeout(value: float, name: str, tool: str | None = None) -> None:
    """Refuse `value` of the parameter `name` (of a call of `tool`) unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT,
            f"{name} must be a finite number of seconds greater than 0, got {shorten(repr(value))}",
            tool=tool,
        )


class Intake(ManagerState):
    """`SessionManager`'s admission beyond the per-call path. Not used alone: build a `SessionManager`."""

    #: Whose cap a `capacity_exceeded` refusal names.
    CAPACITY_SCOPE = "the server"

    if TYPE_CHECKING:  # the per-call path, in `SessionManager` (server.sessions)

        def _admit_locked(self, session: Session) -> bool: ...

        def _open_locked(self, session: Session) -> Session: ...

        def _signed_id_locked(self) -> str: ...

        def _release_client_locked(self, client: Hashable | None) -> None: ...

        def end(self, session: Session, state: SessionState, error: str | None = None) -> bool: ...

    def timeout_for(self, requested: float) -> float:
        """The effective timeout of a requested one, capped by `max_timeout_seconds`.

        Raises:
            SessionError: `invalid_argument`, `requested` is not a finite number > 0.
        """
        _check_timeout(requested, "timeout_seconds")
        return min(float(requested), self.limits.max_timeout_seconds)

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
            TypeError: `client` is not hashable; nothing has changed.
        """
        session = self._prepare(**request)
        limits = self.limits
        # Refusals are raised where they are made, never held in a local of the raising frame:
        # that would be a cycle (error -> traceback -> frame -> error) keeping the refused
        # metadata alive until the cyclic GC runs.
        lock = self._lock
        lock.acquire()  # not `with`: an explicit pair costs half as much, and this runs per call
        try:
            if session.tool is None:
                session.id = self._signed_id_locked()
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
            if session.tool is None:
                session.id = self._signed_id_locked()
            if self._admit_locked(session):
                return session
            raise self._full_locked(session, may_queue=False)

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
            _check_timeout(idle_timeout_seconds, "idle_timeout_seconds", tool)
        if provider or model:  # (a tool call has neither)
            for name, label in (("provider", provider), ("model", model)):
                if len(label) > admission.MAX_LABEL_CHARS:
                    raise admission.refuse_label(name, label, tool)
        if client is not None:
            try:
                hash(client)  # it keys the clients' counts: refused here, before a slot is taken
            except TypeError:
                raise TypeError(
                    f"client must be hashable (a str, an int, a tuple of them), got {type(client).__name__}"
                ) from None
        return Session(
            "",
            request_id,
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

    def _check_refusals_locked(self, session: Session) -> None:
        """Raise the refusals that never wait: metadata size, the client's share, stuck threads."""
        limits = self.limits
        if session.metadata_bytes > limits.max_metadata_bytes:
            self._rejected[Refusal.METADATA] += 1
            raise SessionError(
                ErrorCode.METADATA_TOO_LARGE,
                f"metadata is {session.metadata_bytes} bytes as compact JSON; "
                f"the limit is {limits.max_metadata_bytes} bytes (limits.max_metadata_bytes): "
                "send less metadata, or ask the operator to raise the limit",
                tool=session.tool,
            )
        client = session.client
        if client is not None and limits.max_sessions_per_client:
            if self._client_load.get(client, 0) >= limits.max_sessions_per_client:
                self._count_client_refusal_locked()
                raise admission.refuse_client_limit(session.tool, limits.max_sessions_per_client)
        if session.needs_thread and self._abandoned >= limits.max_abandoned_threads:
            self._rejected[Refusal.THREADS] += 1
            raise admission.refuse_threads(session.tool, self._abandoned, limits.max_abandoned_threads)

    def _count_client_refusal_locked(self) -> None:
        """Count a refusal by the client's share decided here (cluster mode counts it in Redis too)."""
        self._rejected[Refusal.CLIENT_LIMIT] += 1

    def _full_locked(self, session: Session, tool_full: bool | None = None, may_queue: bool = True) -> SessionError:
        """Count and word the refusal of a call that does not fit and may not wait. It counts
        under one reason: the server's cap when the server is full (whatever its tool's state,
        as the cluster's store decides), else its tool's; its tool's own `rejected_tool_limit`
        counts it whenever the tool is full, and the sentence then names the tool's cap too.
        `tool_full` (cluster mode: what the store said) means the tool is full and the server
        is not (unless a reload took the tool's cap away meanwhile: then it is the server's
        refusal); by default both are read here. A call that may queue is refused only when the
        queue is full, and is told so; a call that could never queue (`may_queue=False`) is not
        told about the queue."""
        limits = self.limits
        tool = session.tool
        max_queued = limits.max_queued if may_queue else 0
        tool_cap = self.tool_caps.get(tool) if tool is not None else None
        if tool_full is None:
            server_full = len(self._active) >= limits.max_concurrent_sessions
            tool_full = not self._has_room_locked(tool)
        else:
            server_full = not tool_full
        if tool_full and tool is not None and tool_cap is not None:
            self._tool_stats(tool).rejected_tool_limit += 1
            if not server_full:
                self._rejected[Refusal.TOOL_LIMIT] += 1
                return admission.refuse_tool_limit(tool, tool_cap, self._queue_taken_locked(), max_queued)
        self._rejected[Refusal.CAPACITY] += 1
        cap = limits.max_concurrent_sessions
        return admission.refuse_capacity(
            tool,
            cap,
            self._queue_taken_locked(),
            max_queued,
            self.CAPACITY_SCOPE,
            tool_cap=tool_cap if tool_full else None,
        )

    def _queue_taken_locked(self) -> int:
        """Places taken in the queue, as a refusal for a full queue words them."""
        return len(self._queue)

    # -- the queue -------------------------------------------------------------------------

    def _enqueue_locked(self, session: Session) -> Waiter:
        """Put `session` at the back of the queue; it counts toward its client's share."""
        self._queued_count += 1
        waiter = Waiter(session, time.monotonic(), anyio.Event(), seq=self._queued_count)
        self._queue[waiter] = None
        self._line_up_locked(waiter)
        if session.client is not None:
            self._client_load[session.client] = self._client_load.get(session.client, 0) + 1
        return waiter

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
        tool = waiter.session.tool
        server_full, tool_full = self._full_for_locked(waiter)
        return admission.refuse_queue_timeout(
            tool,
            waited,
            self.CAPACITY_SCOPE,
            self.limits.max_concurrent_sessions,
            server_full=server_full,
            tool_cap=self.tool_caps.get(tool) if tool is not None else None,
            tool_full=tool_full,
        )

    def _full_for_locked(self, waiter: Waiter) -> tuple[bool, bool]:
        """Whether the server's slots, and whether the waiter's tool's cap, are full now."""
        return len(self._active) >= self.limits.max_concurrent_sessions, not self._has_room_locked(waiter.session.tool)

    def _line_up_locked(self, waiter: Waiter) -> None:
        """Put a queued `waiter` at the back of its line (see `ManagerState._lines`)."""
        tool = waiter.session.tool
        waiter.line = key = tool if tool is not None and tool in self.tool_caps else None
        line = self._lines.get(key)
        if line is None:
            self._lines[key] = OrderedDict({waiter: None})
            self._line_ready_locked(key)  # its first call
        else:
            line[waiter] = None
        if waiter.session.needs_thread:
            self._thread_waiters[waiter] = None

    def _unqueue_locked(self, waiter: Waiter) -> None:
        """Take `waiter` out of the queue and of its line."""
        del self._queue[waiter]
        key = waiter.line
        line = self._lines[key]
        first = next(iter(line)) is waiter
        del line[waiter]
        if not line:
            del self._lines[key]
            if not self._lines:
                self._ready.clear()  # its entries are all stale now: keep none while nothing waits
        elif first:
            self._line_ready_locked(key)  # the call behind it is the first now
        if waiter.session.needs_thread:
            del self._thread_waiters[waiter]

    def _line_ready_locked(self, key: str | None) -> None:
        """Put the first call of line `key` in the hand-over's heap (`ManagerState._ready`) if
        the line holds a call and its tool has room: its first call has changed, or a call of
        its tool has ended. O(log L) for L lines; when the heap holds more than 2L + 64 entries
        (stale ones, dropped lazily), it is made again from the lines: O(L), once per at least
        L + 64 entries put in, so amortised O(log L) a push."""
        line = self._lines.get(key)
        if line is None or not self._has_room_locked(key):
            return
        ready = self._ready
        heapq.heappush(ready, (next(iter(line)).seq, key))
        if len(ready) > 2 * len(self._lines) + 64:
            self._remake_ready_locked()

    def _has_room_locked(self, key: str | None) -> bool:
        """Whether tool `key` (a line's key, or any call's tool) has room below its cap; None (the
        line of uncapped calls, or a call of no tool) and an uncapped tool always have. No
        KeyError on a cap taken out of `tool_caps` by hand, not through `set_limits`."""
        return key is None or self._tool_active.get(key, 0) < self.tool_caps.get(key, math.inf)

    def _remake_ready_locked(self) -> None:
        """Make the hand-over's heap again, in place: the first call of each line whose tool has room."""
        self._ready[:] = [
            (next(iter(line)).seq, key) for key, line in self._lines.items() if self._has_room_locked(key)
        ]
        heapq.heapify(self._ready)

    def _next_ready_locked(self) -> Waiter | None:
        """Take the oldest first call of a line whose tool has room off the hand-over's heap;
        None if there is none. Entries that no longer hold are dropped on the way: one whose
        call has left its line (the entry of the call behind it went in then), or whose tool
        is full (it goes in again when a call of that tool ends)."""
        ready = self._ready
        lines = self._lines
        while ready:
            seq, key = heapq.heappop(ready)
            line = lines.get(key)
            if line is None:
                continue
            first = next(iter(line))
            if first.seq == seq and self._has_room_locked(key):
                return first
        return None

    def _leave_queue_locked(self, waiter: Waiter) -> float:
        """Take a waiter out of the queue unadmitted; return how long it waited."""
        self._unqueue_locked(waiter)
        self._release_client_locked(waiter.session.client)
        waited = time.monotonic() - waiter.enqueued
        self._queue_waits.add(waited)
        return waited

    def _hand_over_locked(self) -> list[Waiter]:
        """Give free slots to the oldest waiters that fit; the caller wakes them after the lock.

        A waiter fits when its tool has room: the oldest that fits is the oldest first call of
        a line whose tool is not full, the top of the heap of those (`ManagerState._ready`):
        amortised O(log L) a waiter admitted for L lines, never a look at every line. A waiter that needs
        a thread while too many are stuck is refused on its turn, and the slot it would have
        had goes on to the next waiter that fits: so is every such waiter that came before the
        last one admitted (all of them if slots are left), whether or not its own tool is full."""
        cap = self.limits.max_concurrent_sessions
        active = self._active
        if len(active) >= cap or not self._queue:
            return []
        stuck = self._abandoned >= self.limits.max_abandoned_threads
        woken: list[Waiter] = []
        last = 0  # the arrival of the last waiter admitted
        while len(active) < cap:
            first = self._next_ready_locked()
            if first is None:
                break
            if stuck and first.session.needs_thread:
                self._refuse_threads_locked(first)
            else:
                self._admit_waiter_locked(first)
                last = first.seq
            woken.append(first)
        if stuck and self._thread_waiters:
            turned = last if len(active) >= cap else self._queued_count
            while self._thread_waiters:
                waiter = next(iter(self._thread_waiters))
                if waiter.seq > turned:
                    break
                self._refuse_threads_locked(waiter)
                woken.append(waiter)
        return woken

    def _refuse_threads_locked(self, waiter: Waiter) -> None:
        """Take a waiter that needs a thread out of the queue, refused as a new call is while too
        many threads are stuck; the caller wakes it after the lock."""
        self._leave_queue_locked(waiter)
        self._rejected[Refusal.THREADS] += 1
        limits = self.limits
        waiter.refusal = admission.refuse_threads(waiter.session.tool, self._abandoned, limits.max_abandoned_threads)

    def _admit_waiter_locked(self, waiter: Waiter) -> None:
        """Take a waiter out of the queue and open its session; the caller wakes it after the lock."""
        self._unqueue_locked(waiter)
        self._queue_waits.add(time.monotonic() - waiter.enqueued)
        session = waiter.session
        if session.client is not None:
            self._client_load[session.client] -= 1  # counted again as active by _open_locked
        self._open_locked(session)
        waiter.admitted = True

    def set_limits(self, limits: Settings | LimitsSettings | None, tool_caps: Mapping[str, int] | None = None) -> None:
        """Apply new limits to new sessions (running ones keep theirs); admit waiters that now fit.
        `limits` as the constructor takes them (a `Settings` gives its tools' caps too, unless
        `tool_caps` is given); `tool_caps` None keeps the caps in force. Call it on the event
        loop the manager runs on.

        Raises:
            TypeError, ValueError: as the constructor; nothing has changed.
        """
        limits, tool_caps = limits_and_caps(limits, tool_caps, "set_limits()")
        caps = checked_tool_caps(tool_caps) if tool_caps is not None else None
        with self._lock:
            self.limits = limits
            if caps is not None:
                self.tool_caps = caps
                # Which tools have a cap decides the lines, and their caps which lines have room:
                # line the waiters up again, in order, and make the heap of lines anew with them.
                self._lines = {}
                self._ready = []
                self._thread_waiters = OrderedDict()
                for waiter in self._queue:
                    self._line_up_locked(waiter)
            woken = self._hand_over_locked()
        for waiter in woken:
            waiter.event.set()
