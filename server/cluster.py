"""Cluster mode: one session space for every replica that shares a Redis store.

Tier: runtime core. `ClusterSessionManager` is a `SessionManager` whose admission also asks
the shared store (`server.store`), atomically, whether the cluster has room: the global cap,
the per-tool caps and the per-client share hold across replicas. Everything a replica does
for its own sessions stays local and synchronous, as with the memory backend (deadlines,
cancellation, this replica's metrics); the store learns of their ends through an outbox that
one task writes to Redis in batches, in order, and retries until Redis takes it (nothing is
lost while Redis is away). Limits that concern this process stay per replica: the queue
(`limits.max_queued`, `queue_timeout_seconds`) and the stuck-thread bound.

Replicas hear of each other through the store's pub/sub channel: "freed" (a slot may be free:
queued calls try again), "ended <id> <state>" (a session was released through another
replica: its owner ends its local copy) and "overdue <id> <replica>" (Redis keeps a live
replica's session past its deadline: its owner ends it there if it no longer runs it).

A live replica ends its sessions itself, when their work stops (a call holding its
cancellation off keeps its slot past its deadline, in the cluster as here). A session whose
replica died is expired by Redis itself, at its deadline plus a grace
(`server.store.EXPIRY_GRACE_SECONDS`) once its replica has not reported for
`server.store.OWNER_LIVE_SECONDS`, when any replica next admits or does its housekeeping. A
replica that stops cleanly says so, so its leftovers need not wait for that.

When Redis cannot be reached, calls are refused at once with `store_unavailable` (within about
`[store] timeout_seconds`, at most twice it), and everything resumes by itself when it is back; if it came back
empty (restarted without its data), each replica registers its running sessions again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Hashable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Unpack

import anyio

from server import admission
from server.admission import Refusal, SessionRequest, Waiter
from server.config import LimitsSettings, Settings, StoreSettings
from server.errors import ErrorCode, SessionError, shorten
from server.metrics import ClusterMetrics, ClusterToolMetrics
from server.session import Session, SessionState, ended_state
from server.sessions import ISSUED_ID, SessionManager, runs_a_call
from server.store import (
    EXPIRY_GRACE_SECONDS,
    OWNER_LIVE_SECONDS,
    RECOVERY_SECONDS,
    WITHDRAWN,
    RedisStore,
    StoreFull,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

#: Longest time between two housekeeping runs (expiring dead replicas' sessions, marking this
#: replica live); sooner when a session in the store is due.
HOUSEKEEPING_SECONDS = 1.0
#: Back-off bounds while Redis is away (for the outbox, the pub/sub listener).
RETRY_MIN_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
#: How long a session end may wait for an admission's round trip to carry it to Redis before it
#: is written on its own. Only other replicas wait for it: this replica's next admission carries it.
COALESCE_SECONDS = 0.005


def client_key(client: Hashable | None, replica: str) -> str | None:
    """A client identity as text the store can count by. HTTP identities (MCP session, credential
    digest, peer address) mean the same on every replica; a connection is this replica's own."""
    if client is None:
        return None
    if isinstance(client, tuple) and len(client) == 2 and isinstance(client[1], str):
        return f"{client[0]}:{client[1]}"
    return f"{replica}:{type(client).__name__}:{id(client):x}"


class ClusterSessionManager(SessionManager):
    """A `SessionManager` whose limits hold across the replicas sharing `[store]`."""

    #: A capacity refusal names the service's cap, not this replica's.
    CAPACITY_SCOPE = "the cluster of replicas sharing the session store"

    def __init__(
        self,
        limits: Settings | LimitsSettings | None = None,
        tool_caps: Mapping[str, int] | None = None,
        store: StoreSettings | None = None,
    ) -> None:
        """`limits` and `tool_caps` as for `SessionManager`: a whole `Settings` (what
        `load_settings` returns) gives its `[limits]`, its per-tool caps (unless `tool_caps` is
        given) and its `[store]` (unless `store` is given), whose backend must then be "redis".
        `store`: the Redis to share; without it and without a `Settings`, the `[store]` defaults
        with the redis backend (a Redis on 127.0.0.1:6379).

        Raises:
            ValueError: `limits` is a `Settings` whose `[store] backend` is not "redis", and no
                `store` is given.
            TypeError: `limits` is none of the accepted types.
        """
        if store is None and isinstance(limits, Settings):
            if limits.store.backend != "redis":
                raise ValueError(
                    "ClusterSessionManager needs a Redis store, but these settings have [store] backend = "
                    f'"{limits.store.backend}": set [store] backend = "redis" (and its url), pass '
                    'store=StoreSettings(backend="redis", url=...), or use SessionManager for one process'
                )
            store = limits.store
        super().__init__(limits, tool_caps)
        settings = store if store is not None else StoreSettings(backend="redis")
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.store = RedisStore(settings, self.replica)
        self.store.waiting = lambda: len(self._queue)
        # Admitted for a caller that was cancelled while Redis decided: withdraw it there.
        self.store.on_orphan = self._withdraw
        #: Set when a slot may have come free anywhere in the cluster: queued calls try again.
        self._freed = anyio.Event()
        #: Why the store failed last (None while it answers); once it answers again, this
        #: replica registers its sessions again in case Redis came back empty.
        self._store_error: str | None = None
        #: Whether Redis was last found at its maxmemory (logged once, until it admits again).
        self._store_full = False
        #: The store's epoch when last seen; a new one means Redis lost its data.
        self._epoch: str | None = None
        #: The last new epoch this replica warned of (see `_warn_lost`): once per change, even
        #: if registering the sessions again fails and is retried.
        self._epoch_warned: str | None = None
        #: Set to run the housekeeping at once (an admission found Redis empty).
        self._look_at_store = anyio.Event()
        #: Set once this replica has written its last session ends and left the cluster (made when it begins).
        self._left: anyio.Event | None = None
        #: Places in the queue promised to calls still asking Redis for a slot (see `create`).
        self._queue_claims = 0
        #: The tools the store called full in the dispatcher's last pass, when every call left
        #: queued was one of theirs; None while a pass runs or after one that stopped early.
        self._held_tools: set[str] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """Check that Redis answers (raises `StoreUnavailable` if not), learn the store's epoch and
        warn if Redis may evict keys (its `maxmemory-policy`); then run the reaper, the outbox, the
        housekeeping, the pub/sub listener and the queue dispatcher. On exit, write the last
        session ends to Redis (bounded by the store's timeout) and disconnect."""
        _, self._epoch = await self.store.housekeeping()  # also checks that Redis answers
        policy = await self.store.eviction_policy()
        if policy is not None and policy != "noeviction":
            # A session hash it evicts (volatile-*: exactly those, which carry a TTL) is never
            # finished: its end leaves a mark, and its tool's and client's counts stay taken.
            logger.warning(
                "%s may evict keys when it is full (maxmemory-policy %s): an evicted session keeps its "
                "tool's and its client's slot counted in the cluster for good; set maxmemory-policy noeviction "
                "on that Redis (when full, it then refuses writes, and calls get store_unavailable)",
                self.store.where,
                policy,
            )
        try:
            async with super().running(), anyio.create_task_group() as tg:
                tg.start_soon(self._write_outbox)
                tg.start_soon(self._housekeep)
                tg.start_soon(self._listen)
                tg.start_soon(self._dispatch)
                try:
                    yield self
                finally:
                    await self.close_at_exit()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.close()

    async def close_at_exit(self) -> None:
        """Write the session ends still waiting, then leave the replicas counted live, bounded by
        the store's timeout; once (a second call waits for the first). `running()` does it on its
        way out; an exit that cannot wait for that (work left running holds it open) calls it
        first, or the other replicas would count this one live, and its ended sessions active,
        for seconds after it has gone. If Redis is away, say once how many ends could not be
        written and why: a stop is no failure of the runtime (their sessions stay counted in
        Redis until their deadlines pass, then expire as `timeout`)."""
        if self._left is not None:
            await self._left.wait()
            return
        self._left = anyio.Event()
        try:
            await self._write_last_ends()
        finally:
            self._left.set()

    async def _write_last_ends(self) -> None:
        limit = self.store.settings.timeout_seconds * 2
        failure: StoreUnavailable | None = None
        flushed = False
        with anyio.move_on_after(limit, shield=True):
            try:
                await self.store.flush_ended()
                flushed = True
                await self.store.leave()
            except StoreUnavailable as exc:
                failure = exc
        unwritten = self.store.unwritten_ends
        if unwritten:
            # Why the ends were not written: a round trip that carried them is still out (Redis
            # hangs), or the one that wrote them failed; not why leaving failed.
            if failure is None or self.store.pending_ends < unwritten:
                reason = f"{self.store.where} did not answer within {limit:g}s"
            elif not flushed:
                reason = str(failure)
            else:  # they came back from an admission's or the outbox's round trip that failed meanwhile
                reason = f"{self.store.where} failed: {failure.why}"
            logger.warning(
                "Stopping: %s session end(s) could not be written to the session store (%s); in the cluster "
                "totals they stay active until their deadlines pass (+ %gs, and %gs after this replica last "
                "reported), then count as timeout",
                unwritten,
                reason,
                EXPIRY_GRACE_SECONDS,
                OWNER_LIVE_SECONDS,
            )

    # -- admission -------------------------------------------------------------------------

    async def create(self, *, queue: bool = True, **request: Unpack[SessionRequest]) -> Session:
        """Admit a session if this replica and the cluster have room (see `SessionManager.create`).

        Raises:
            SessionError: as `SessionManager.create`, and `store_unavailable` when Redis cannot
                be reached (the call is not run).
        """
        session = self._prepare(**request)
        limits = self.limits
        with self._lock:
            self._check_refusals_locked(session)  # metadata size, this replica's stuck threads
            # A call that may queue holds its place in the queue while it asks Redis (a round trip
            # other calls arrive during): without the claim, a burst would all pass this check and
            # then all queue, past limits.max_queued.
            may_queue = queue and len(self._queue) + self._queue_claims < limits.max_queued
            # FIFO: a newcomer queues behind the waiters here, unless the last pass of the
            # dispatcher left only calls of full tools other than its own waiting (and no slot
            # has come free since): those cannot take the slot it asks for.
            behind = may_queue and bool(self._queue) and not self._only_held_tools(session.tool)
            session.id = self._new_id_locked() if session.tool is not None else self._signed_id_locked()
            if may_queue:
                self._queue_claims += 1
        try:
            held_by = ""
            if not behind:
                verdict = held_by = await self._acquire(session, final=not may_queue)
                if verdict == "ok":
                    return self._open_admitted(session)
                if verdict == "recovering" and not may_queue:
                    self._count(Refusal.STORE)
                    raise admission.refuse_store(session.tool, self._recovering())
                if verdict == "client_limit":
                    self._count(Refusal.CLIENT_LIMIT)
                    raise admission.refuse_client_limit(session.tool, limits.max_sessions_per_client)
                if not may_queue:
                    with self._lock:
                        raise self._full_locked(session, tool_full=verdict == "tool_limit", may_queue=queue)
            with self._lock:
                waiter = self._enqueue_locked(session)
                waiter.held_by = held_by
        finally:
            if may_queue:  # admitted, refused, or its place in the queue is its own now
                with self._lock:
                    self._queue_claims -= 1
        self._freed.set()
        return await self._wait_in_queue(waiter, limits.queue_timeout_seconds)

    def end_reservations(self, reason: str) -> int:
        """Nothing here: in cluster mode another replica can still release this replica's
        `session_create` sessions, so a stdio client going away does not end them."""
        return 0

    def _queue_taken_locked(self) -> int:
        """The calls queued here, and those promised a place while Redis decides (see `create`)."""
        return len(self._queue) + self._queue_claims

    def _count_client_refusal_locked(self) -> None:
        """A refusal by the client's share decided here (its running and queued calls at this
        replica) counts in the cluster's `sessions_rejected_client_limit` too, with the next round trip."""
        super()._count_client_refusal_locked()
        self.store.count_client_refusal()

    def create_nowait(self, **request: Unpack[SessionRequest]) -> Session:
        """Not available in cluster mode: admission asks Redis. Use `await create(queue=False, ...)`."""
        raise TypeError("cluster mode admits through Redis: use `await manager.create(queue=False, ...)`")

    def open_call(
        self, tool: str, timeout: float, request_id: str | None, needs_thread: bool, idle_timeout: float | None
    ) -> Session | None:
        """Never at once here: admission asks the store, so every call goes through `create`."""
        return None

    async def _acquire(self, session: Session, final: bool) -> str:
        """Ask the store to admit `session`: "ok", or why not. Refuses with `store_unavailable`."""
        limits = self.limits
        tool = session.tool
        try:
            verdict = await self.store.acquire(
                session.id,
                session.timeout_seconds,
                tool,
                client_key(session.client, self.replica),
                session.metadata_bytes,
                limits.max_concurrent_sessions,
                self.tool_caps.get(tool) if tool is not None else None,
                limits.max_sessions_per_client,
                final,
            )
        except StoreFull as exc:
            if not self._store_full:
                logger.warning("%s; calls are refused store_unavailable until it has room again", exc)
                self._store_full = True
            self._count(Refusal.STORE)
            raise admission.refuse_store(tool, str(exc), refused=True) from None
        except StoreUnavailable as exc:
            self._store_failed(exc)
            self._count(Refusal.STORE)
            raise admission.refuse_store(tool, str(exc), refused=exc.refused) from None
        if self._store_full:
            logger.warning("%s has room again: it admits sessions", self.store.where)
            self._store_full = False
        if verdict == "lost":  # Redis lost its data, and no replica has noticed yet
            self._look_at_store.set()  # register this replica's sessions now (this once)
            return "recovering"
        return verdict

    def _recovering(self) -> str:
        return (
            f"{self.store.where} restarted empty: the replicas are registering their running sessions "
            f"again (for about {RECOVERY_SECONDS:g}s), so that the caps count them"
        )

    def _open_admitted(self, session: Session) -> Session:
        """Open locally a session the store has admitted (and give it back if shutdown began)."""
        with self._lock:
            if not self._shutting_down:
                return self._open_locked(session)
            self._rejected[Refusal.SHUTDOWN] += 1
        self._withdraw(session.id)
        raise admission.refuse_shutdown(session.tool)

    def _count(self, refusal: Refusal) -> None:
        with self._lock:
            self._rejected[refusal] += 1

    def _hand_over_locked(self) -> list[Waiter]:
        """A slot came free here: the dispatcher gives it out through the store (never locally)."""
        if self._queue:
            self._freed.set()
        return []

    def _line_ready_locked(self, key: str | None) -> None:
        """Nothing: the hand-over's heap of lines is the local hand-over's, which never runs here."""

    def _remake_ready_locked(self) -> None:
        """Nothing (see `_line_ready_locked`)."""

    def _only_held_tools(self, tool: str | None) -> bool:
        """Whether every call queued here waits for a tool other than `tool` that the store called
        full in the dispatcher's last pass, with no slot freed since (no pass pending)."""
        held = self._held_tools
        return held is not None and not self._freed.is_set() and tool not in held

    async def _dispatch(self) -> None:
        """Offer freed slots to the calls queued here, oldest first, through the store. Once the
        store calls a tool full, the pass skips that tool's other calls (each would cost a round
        trip for the same answer): a slot of that tool freed later starts a new pass."""
        while True:
            await self._freed.wait()
            self._freed = anyio.Event()
            self._held_tools = None
            held: set[str] = set()
            for waiter in list(self._queue):
                if waiter not in self._queue:
                    continue  # timed out, cancelled or refused meanwhile
                session = waiter.session
                if self._refuse_if_stuck(waiter):
                    continue
                if session.tool in held:
                    waiter.held_by = "tool_limit"
                    continue
                try:
                    verdict = await self._acquire(session, final=False)
                except SessionError as refusal:
                    self._refuse_waiters(refusal)
                    break
                if verdict == "ok":
                    self._hand_to(waiter)
                    continue
                waiter.held_by = verdict
                if verdict in ("capacity", "recovering"):  # full, or not admitting (for the calls behind it too)
                    with self._lock:
                        for behind in self._queue:
                            behind.held_by = verdict
                    break  # wait for the next freed slot
                elif verdict == "tool_limit" and session.tool is not None:
                    held.add(session.tool)
                elif verdict == "client_limit":
                    with self._lock:
                        if waiter in self._queue:
                            self._leave_queue_locked(waiter)
                            self._rejected[Refusal.CLIENT_LIMIT] += 1
                            waiter.refusal = admission.refuse_client_limit(
                                session.tool, self.limits.max_sessions_per_client
                            )
                    waiter.event.set()
            else:
                # Every call still queued waits for one of these full tools (those queued during
                # the pass set `_freed`, which starts another).
                self._held_tools = held

    def _refuse_if_stuck(self, waiter: Waiter) -> bool:
        """Refuse `waiter` now if it needs a thread while too many are stuck, as a new call is
        refused (True); its turn has come, and the slot goes on to the calls behind it."""
        with self._lock:
            refused = waiter in self._queue and self._refuse_stuck_locked(waiter)
        if refused:
            waiter.event.set()
        return refused

    def _refuse_stuck_locked(self, waiter: Waiter) -> bool:
        if not waiter.session.needs_thread or self._abandoned < self.limits.max_abandoned_threads:
            return False
        self._refuse_threads_locked(waiter)
        return True

    def _waited_out_locked(self, waiter: Waiter) -> SessionError:
        """A queued call whose wait ended while admissions wait for the replicas to register
        their sessions again (Redis restarted empty) is told so, not that the cluster is full."""
        if waiter.held_by != "recovering":
            return super()._waited_out_locked(waiter)
        waited = self._leave_queue_locked(waiter)
        self._rejected[Refusal.STORE] += 1
        return admission.refuse_store(waiter.session.tool, f"{self._recovering()} (waited {waited:.3g}s in the queue)")

    def _full_for_locked(self, waiter: Waiter) -> tuple[bool, bool]:
        """What kept `waiter` out, as the store last said: this replica sees only its own calls."""
        return waiter.held_by == "capacity", waiter.held_by == "tool_limit"

    def _hand_to(self, waiter: Waiter) -> None:
        """Open the session Redis admitted for `waiter`; give the slot back if the waiter left
        meanwhile, or if threads got stuck while Redis decided and it needs one."""
        with self._lock:
            still_waiting = waiter in self._queue and not self._shutting_down
            refused = still_waiting and self._refuse_stuck_locked(waiter)
            if still_waiting and not refused:
                self._admit_waiter_locked(waiter)
        if still_waiting:
            waiter.event.set()
        if refused or not still_waiting:
            self._withdraw(waiter.session.id)  # Redis admitted it: give the slot back

    def _refuse_waiters(self, refusal: SessionError) -> None:
        """Redis is away: queued calls are refused now rather than left to wait it out."""
        with self._lock:
            waiting = list(self._queue)
            for waiter in waiting:
                self._leave_queue_locked(waiter)
                waiter.refusal = SessionError(refusal.code, refusal.message, tool=waiter.session.tool)
            self._rejected[Refusal.STORE] += max(0, len(waiting) - 1)  # _acquire counted the first
        for waiter in waiting:
            waiter.event.set()

    # -- release ---------------------------------------------------------------------------

    async def release(
        self,
        session_id: str,
        outcome: SessionState | str = SessionState.COMPLETED,
        error: str | None = None,
        *,
        tool_calls: bool = True,
    ) -> Session:
        """End a session made through any replica (see `SessionManager.release`). Redis decides,
        so that a session released through two replicas at once is released once.

        Raises:
            SessionError: as `SessionManager.release`, and `store_unavailable` while Redis
                cannot be reached, or, for a session of another replica that Redis lacks, while
                it recovers from a restart empty (that replica may not have registered it again).
        """
        state = ended_state(outcome, session_id)
        local = self._active.get(session_id)
        if local is not None and local.tool is not None and not tool_calls:
            raise runs_a_call(session_id)
        if local is None and (self._issued_by_us(session_id) or not ISSUED_ID.fullmatch(session_id)):
            # It ended here (its end may still be on its way), or no replica issued it: an id of
            # another shape must not reach Redis, where it would name a key of its own
            # (`release("epoch")`), or of another service whose key_prefix starts with this one's.
            raise self._not_active(session_id, tool_calls)
        try:
            (known,) = await self.store.release([(session_id, state.value)], tool_calls)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            self._count(Refusal.STORE)
            advice = admission.STORE_REFUSED_ADVICE if exc.refused else "Retry in a moment"
            raise SessionError(
                ErrorCode.STORE_UNAVAILABLE,
                f"{exc}; session {shorten(session_id)} was not released. {advice}",
                session_id=shorten(session_id),
            ) from None
        if known.before == "call":  # another replica's tool call (see `tool_calls`)
            raise runs_a_call(session_id)
        local = self._active.get(session_id)
        if known.before in ("recovering", "lost"):
            # Redis restarted empty: the replica that made it may not have registered it again yet.
            if known.before == "lost":
                self._look_at_store.set()  # no replica has noticed: start the recovery now
            if local is None:
                self._count(Refusal.STORE)
                raise SessionError(
                    ErrorCode.STORE_UNAVAILABLE,
                    f"{self._recovering()}; session {shorten(session_id)} was not released. Retry in a moment",
                    session_id=shorten(session_id),
                )
        if known.before in ("active", "unknown", "recovering", "lost") and local is not None:
            # Ours, and now ended in Redis (or Redis no longer knew it): end our copy.
            super().end(local, state, error)
            return local
        if known.before == "active":
            # Released here for the replica that made it: a detached record of how it ended.
            return Session(session_id, session_id, None, 0.0, state=state, ended=known.duration, error=error)
        if known.before == "unknown":
            raise self._not_active(session_id)
        if local is not None:  # released through another replica; its message is on its way
            super().end(local, SessionState(known.before), "released through another replica")
        raise SessionError(
            ErrorCode.ALREADY_RELEASED,
            f"session {shorten(session_id)} has already ended ({known.before}); it cannot be released again",
            session_id=shorten(session_id),
        )

    def _never_issued(self, shown: str) -> str:
        """As `SessionManager._never_issued`, but an unknown id is unknown to the whole cluster: no
        replica sharing the store issued it in the last hour (ended sessions are kept that long)."""
        return (
            f"no replica sharing the session store issued a session with id {shown!r} in the last hour; "
            "use the session_id that session_create returned"
        )

    def end(self, session: Session, state: SessionState, error: str | None = None) -> bool:
        """End `session` here, and in the store unless the store told us it ended."""
        if not super().end(session, state, error):
            return False
        self._send_end(session.id, state)
        return True

    def _send_end(self, session_id: str, state: SessionState) -> None:
        self.store.end_later(session_id, state.value)

    def _withdraw(self, session_id: str) -> None:
        """Give back a slot Redis admitted for a session never opened here: its caller had left
        (or was refused meanwhile). The cluster totals then count it neither created nor ended,
        as this replica's own do not."""
        self.store.end_later(session_id, WITHDRAWN)

    async def _write_outbox(self) -> None:
        """Write session ends to Redis: with the next admission's round trip if one comes within
        `COALESCE_SECONDS`, else on their own; kept (in order) while Redis is away."""
        delay = RETRY_MIN_SECONDS
        while True:
            await self.store.ended_ready.wait()
            await anyio.sleep(COALESCE_SECONDS)
            try:
                if await self.store.flush_ended():  # (nothing to write: Redis was not asked)
                    delay = RETRY_MIN_SECONDS
                    self._store_answered()
            except StoreUnavailable as exc:
                self._store_failed(exc)
                await anyio.sleep(delay)  # back off while Redis is away
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    # -- keeping in touch ------------------------------------------------------------------

    async def _housekeep(self) -> None:
        """Expire dead replicas' sessions when due and mark this replica live, at least every
        `HOUSEKEEPING_SECONDS`; put this replica's sessions back if Redis lost them (a new epoch)."""
        while True:
            wait = HOUSEKEEPING_SECONDS
            self._look_at_store = anyio.Event()
            try:
                due, epoch = await self.store.housekeeping(self._epoch)
                if epoch != self._epoch:
                    if self._epoch is not None:  # Redis came back empty: it lost our sessions
                        self._warn_lost(epoch)
                        await self._reconcile()
                    self._epoch = epoch
                self._store_answered()
                if due is not None:
                    wait = min(wait, max(due, 0.01))
            except StoreUnavailable as exc:
                self._store_failed(exc)
                wait = RETRY_MAX_SECONDS
            if self._queue:
                self._freed.set()  # a freed slot's message may have been lost: try again now
            with anyio.move_on_after(wait):
                await self._look_at_store.wait()  # or sooner, when an admission found Redis empty

    def _warn_lost(self, epoch: str) -> None:
        """Say once per new epoch that Redis lost its data: a restart empty as short as a fraction of
        a second may fail no round trip of this replica (no "failed to ..." warning, no "answers
        again"), and one with no session to register again says nothing else."""
        if epoch != self._epoch_warned:
            self._epoch_warned = epoch
            logger.warning(
                "%s lost its data (it restarted empty, or was flushed): the cluster's totals start again from "
                "what the replicas register anew, and admissions are held for about %gs from when the first "
                "replica noticed, while they register their running sessions again",
                self.store.where,
                RECOVERY_SECONDS,
            )

    async def _reconcile(self) -> None:
        """Bring this replica's sessions in line with Redis after a time out of touch: end those
        released through another replica meanwhile (whose message was missed), and register
        again those Redis lost."""
        now = time.monotonic()
        with self._lock:
            # Past their deadline too: a call holding its cancellation off still runs, and a
            # session the reaper is about to end is ended in Redis by its end, written next.
            mine = list(self._active.values())
        states = await self.store.reconcile(
            [
                (s.id, s.deadline - now, s.tool, client_key(s.client, self.replica), s.metadata_bytes, now - s.started)
                for s in mine
            ]
        )
        restored = 0
        for session, state in zip(mine, states, strict=True):
            if state == "restored":
                restored += 1
            elif state != SessionState.ACTIVE.value:
                super().end(session, SessionState(state), "ended in the session store while out of touch")
        if restored:
            logger.warning("The session store had lost %s session(s) of this replica; registered them again", restored)

    async def _listen(self) -> None:
        """Follow the store's events; reconnect (with back-off) whenever the connection drops.
        Catch up after every subscription, including those redis-py makes by itself: it
        reconnects a dropped connection once and subscribes again with no error seen here."""
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.channel)
                    while True:
                        message = await pubsub.get_message(timeout=HOUSEKEEPING_SECONDS)
                        if message is None:
                            continue
                        if message.get("type") == "subscribe":
                            # Redis confirms a subscription: from now on no end is missed;
                            # catch up on those that were while this replica was not subscribed.
                            await self._reconcile()
                            delay = RETRY_MIN_SECONDS
                            self._freed.set()  # a freed slot's message may have been missed too
                        elif message.get("type") == "message":
                            self._on_event(message.get("data"))
            except Exception as exc:  # noqa: BLE001 - any failure of the connection: reconnect
                logger.debug("Session store events: %s; reconnecting", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _on_event(self, data: Any) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        if text.startswith("ended "):
            _, session_id, state = text.split(" ", 2)
            session = self._active.get(session_id)
            if session is not None:
                # Released through another replica: end our copy without telling Redis back.
                super().end(session, SessionState(state), "released through another replica")
        elif text.startswith("overdue "):
            _, session_id, owner = text.split(" ", 2)
            if owner == self.replica and session_id not in self._active:
                # Redis keeps an overdue session for this live replica, which no longer runs it
                # (its end may be on its way): end it there, or its slot would stay taken.
                logger.debug("Session %s is overdue in the session store and not running here: ending it", session_id)
                self._send_end(session_id, SessionState.TIMEOUT)
        if self._queue:
            self._freed.set()

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if self._store_error is None:
            logger.warning("%s", exc)
        self._store_error = str(exc)

    def _store_answered(self) -> None:
        """Redis answered a round trip: say it is back, unless session ends still wait to be
        written (those on their way in an admission's round trip do not hold the news back:
        under steady load there always are some, and the next outage would go unlogged)."""
        if self._store_error is not None and not self.store.pending_ends:
            logger.warning("The session store answers again")
            self._store_error = None

    # -- metrics ---------------------------------------------------------------------------

    async def cluster_metrics(self) -> ClusterMetrics:
        """The cluster's totals, read atomically from Redis; `available=False` and why when it
        cannot be reached (the local view in `metrics()` is always there)."""
        try:
            totals = await self.store.totals()
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return ClusterMetrics(backend="redis", available=False, error=str(exc), replica=self.replica)
        counts = totals.counts
        return ClusterMetrics(
            backend="redis",
            available=True,
            replica=self.replica,
            replicas=totals.replicas,
            active_sessions=totals.active_sessions,
            peak_concurrent_sessions=counts.get("peak", 0),
            total_sessions_created=counts.get("created", 0),
            total_sessions_completed=counts.get("completed", 0),
            total_sessions_error=counts.get("error", 0),
            total_sessions_timeout=counts.get("timeout", 0),
            total_sessions_cancelled=counts.get("cancelled", 0),
            sessions_rejected_capacity=counts.get("rejected_capacity", 0),
            sessions_rejected_tool_limit=counts.get("rejected_tool_limit", 0),
            sessions_rejected_client_limit=counts.get("rejected_client_limit", 0),
            current_metadata_bytes=counts.get("metadata_bytes", 0),
            tools={name: ClusterToolMetrics(active=n) for name, n in sorted(totals.tools.items())},
        )
