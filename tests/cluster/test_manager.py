"""`ClusterSessionManager` in one process: two managers sharing a real Redis under one prefix
stand for two replicas, so the cluster's admission, queue hand-over, cross-replica release and
recovery paths are driven directly, with exact counts (the process tests in this package show
the same through real servers)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest
import redis

from server.cluster import ClusterSessionManager
from server.config import LimitsSettings, Settings, StoreSettings, ToolSettings
from server.errors import ErrorCode, SessionError
from server.metrics import ClusterMetrics
from server.session import Session, SessionState
from server.store import EXPIRY_GRACE_SECONDS, RECOVERY_SECONDS, StoreUnavailable
from tests.cluster.conftest import RedisServer
from tests.e2e.conftest import TomlValue
from tests.helpers import until

#: Bound on every wait for something another "replica" or Redis does.
WAIT_SECONDS = 5.0


def _replica(
    store: dict[str, TomlValue], tool_caps: dict[str, int] | None = None, **limits: Any
) -> ClusterSessionManager:
    settings = StoreSettings(**store)  # type: ignore[arg-type]
    return ClusterSessionManager(LimitsSettings(**limits), tool_caps, settings)


@asynccontextmanager
async def _running(*managers: ClusterSessionManager) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for manager in managers:
            await stack.enter_async_context(manager.running())
        yield


async def _totals(manager: ClusterSessionManager) -> ClusterMetrics:
    totals = await manager.cluster_metrics()
    assert totals.available, totals.error
    return totals


async def _ends_written(*managers: ClusterSessionManager) -> None:
    """Wait (bounded, in this process) until each manager's outbox has nothing left for Redis.

    A session that ends here (a tool call's end, `end`, a cancelled admission) reaches Redis
    through its manager's outbox, a round trip later; a release is decided in Redis before
    `release` returns. `unwritten_ends` counts the ends waiting and those in a round trip that
    has not come back (taken from the outbox and counted in flight with no yield between), so
    at 0 Redis has run every end: the cluster totals can then be read once, and exactly."""
    try:
        await until(lambda: all(manager.store.unwritten_ends == 0 for manager in managers), within=WAIT_SECONDS)
    except TimeoutError:
        left = [manager.store.unwritten_ends for manager in managers]
        raise AssertionError(f"session ends still unwritten after {WAIT_SECONDS}s: {left}") from None


#: What a manager logs once Redis, back empty, has registered its sessions again (`_reconcile`).
REGISTERED_AGAIN = "registered them again"


@contextmanager
def _registered_again() -> Iterator[anyio.Event]:
    """An event set when a manager logs that Redis, back empty, has its sessions again: the
    manager notices the new epoch (housekeeping) or its reconnected pub/sub listener catches up,
    registers them in one script, and logs once Redis has answered."""
    registered = anyio.Event()

    class Registered(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if REGISTERED_AGAIN in record.getMessage():
                registered.set()

    handler = Registered(logging.WARNING)
    cluster_logger = logging.getLogger("server.cluster")
    level = cluster_logger.level
    cluster_logger.setLevel(logging.WARNING)  # whatever another test left the root logger at
    cluster_logger.addHandler(handler)
    try:
        yield registered
    finally:
        cluster_logger.removeHandler(handler)
        cluster_logger.setLevel(level)


async def _wait_registered_again(registered: anyio.Event) -> None:
    try:
        with anyio.fail_after(WAIT_SECONDS):
            await registered.wait()
    except TimeoutError:
        raise AssertionError(f"no manager registered its sessions again within {WAIT_SECONDS}s") from None


def _accounts(totals: ClusterMetrics) -> None:
    ended = [
        totals.total_sessions_completed,
        totals.total_sessions_error,
        totals.total_sessions_timeout,
        totals.total_sessions_cancelled,
    ]
    assert totals.total_sessions_created == (totals.active_sessions or 0) + sum(n or 0 for n in ended)


async def test_the_cap_holds_across_two_managers_and_a_freed_slot_is_anyones(
    shared_store: dict[str, TomlValue],
) -> None:
    a, b = _replica(shared_store, max_concurrent_sessions=2), _replica(shared_store, max_concurrent_sessions=2)
    async with _running(a, b):
        # Admission asks Redis: the in-process fast path never admits here, whatever the room.
        assert a.open_call("t", 30.0, None, False, None) is None
        first = await a.create(tool="t")
        await b.create(tool="t")
        with pytest.raises(SessionError) as refused:
            await a.create(tool="t")
        assert refused.value.code is ErrorCode.CAPACITY_EXCEEDED
        assert "the cluster" in refused.value.message

        # A release is decided in Redis (which replica released first) before it returns, not
        # written later through a's outbox: the slot is free for b at once.
        await a.release(first.id)
        assert a.store.unwritten_ends == 0
        third = await b.create(tool="t", queue=False)

        assert third.state is SessionState.ACTIVE
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_created, totals.peak_concurrent_sessions) == (2, 3, 2)
        assert (totals.sessions_rejected_capacity or 0) >= 1
        assert a.metrics().sessions_rejected_capacity >= 1
        assert (a.metrics().active_sessions, b.metrics().active_sessions) == (0, 2)
        _accounts(totals)


async def test_a_call_queued_on_one_manager_gets_the_slot_another_frees(shared_store: dict[str, TomlValue]) -> None:
    a = _replica(shared_store, max_concurrent_sessions=1)
    b = _replica(shared_store, max_concurrent_sessions=1, max_queued=2, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(a, b):
        held = await a.create(tool="t")
        admitted: list[float] = []

        async def queued() -> None:
            session = await b.create(tool="t")
            admitted.append(time.monotonic())
            await b.release(session.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(queued)
            await until(lambda: b.metrics().queued_sessions == 1, within=WAIT_SECONDS)
            released_at = time.monotonic()
            await a.release(held.id)

        assert len(admitted) == 1 and admitted[0] >= released_at
        assert b.metrics().queued_sessions == 0
        await _ends_written(a, b)
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_created, totals.total_sessions_completed) == (0, 2, 2)


async def test_a_replica_keeps_no_heap_of_queue_lines_it_never_hands_over_from(
    shared_store: dict[str, TomlValue],
) -> None:
    # The local hand-over's heap of lines (`_ready`) is never read in cluster mode, where the
    # dispatcher hands slots over through the store: it was kept up to date (and grew) for nothing.
    a = _replica(shared_store, {"capped": 1}, max_concurrent_sessions=1)
    b = _replica(
        shared_store, {"capped": 1}, max_concurrent_sessions=1, max_queued=4, queue_timeout_seconds=WAIT_SECONDS
    )
    async with _running(a, b):
        held = await a.create(tool="capped")
        async with anyio.create_task_group() as tg:
            for tool in ("capped", "other", "capped"):
                tg.start_soon(functools.partial(b.create, tool=tool))
            await until(lambda: b.metrics().queued_sessions == 3, within=WAIT_SECONDS)
            assert b._ready == []
            tg.cancel_scope.cancel()
        await a.release(held.id)


async def test_a_burst_of_calls_on_a_full_cluster_queues_no_more_than_max_queued(
    shared_store: dict[str, TomlValue],
) -> None:
    # Each call asks Redis before it queues: calls arriving together must not all pass the queue's
    # bound during that round trip. The rest are refused at once, and counted in the cluster too.
    a = _replica(shared_store, max_concurrent_sessions=1)
    b = _replica(shared_store, max_concurrent_sessions=1, max_queued=2, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(a, b):
        held = await a.create(tool="t")
        refusals: list[SessionError] = []

        async def call() -> None:
            try:
                await b.release((await b.create(tool="t")).id)
            except SessionError as exc:
                refusals.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(call)
            await until(lambda: len(refusals) >= 10, within=WAIT_SECONDS)
            queued = b.metrics().queued_sessions
            await a.release(held.id)  # the two queued calls then run, one after the other

        assert queued == 2
        assert len(refusals) == 10 and all(r.code is ErrorCode.CAPACITY_EXCEEDED for r in refusals)
        assert all("its queue holds 2 of 2 waiting calls (limits.max_queued)" in r.message for r in refusals)
        await _ends_written(a, b)
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_created, totals.sessions_rejected_capacity) == (0, 3, 10)
        assert b.metrics().sessions_rejected_capacity == 10


async def test_a_stdio_client_going_away_does_not_end_sessions_another_replica_may_release(
    shared_store: dict[str, TomlValue],
) -> None:
    # With one process, stdin EOF ends the client's session_create sessions (no one else could
    # release them); in cluster mode another replica still can, so they stay.
    a, b = _replica(shared_store, max_concurrent_sessions=2), _replica(shared_store, max_concurrent_sessions=2)
    async with _running(a, b):
        reserved = await a.create()
        assert a.end_reservations("the client closed stdin") == 0
        assert reserved.state is SessionState.ACTIVE
        released = await b.release(reserved.id)
        assert released.state is SessionState.COMPLETED


async def test_a_queued_call_times_out_when_no_replica_frees_a_slot(shared_store: dict[str, TomlValue]) -> None:
    a = _replica(shared_store, max_concurrent_sessions=1)
    b = _replica(shared_store, max_concurrent_sessions=1, max_queued=1, queue_timeout_seconds=0.3)
    async with _running(a, b):
        await a.create(tool="t")
        with pytest.raises(SessionError) as refused:
            await b.create(tool="t")
        assert refused.value.code is ErrorCode.CAPACITY_EXCEEDED
        assert "waited" in refused.value.message
        assert b.metrics().sessions_rejected_queue_timeout == 1
        assert (await _totals(a)).total_sessions_created == 1


@pytest.mark.parametrize("held_by", ["tool", "cluster"])
async def test_a_queued_call_that_times_out_is_told_which_cap_of_the_cluster_kept_it_waiting(
    shared_store: dict[str, TomlValue], held_by: str
) -> None:
    # B sees none of A's calls locally: what kept its call waiting is what the store last said.
    server_cap = 10 if held_by == "tool" else 1
    a = _replica(shared_store, {"slow": 1}, max_concurrent_sessions=server_cap)
    b = _replica(shared_store, {"slow": 1}, max_concurrent_sessions=server_cap, max_queued=1, queue_timeout_seconds=0.3)
    async with _running(a, b):
        await a.create(tool="slow")
        with pytest.raises(SessionError) as refused:
            await b.create(tool="slow")

    message = refused.value.message
    assert refused.value.code is ErrorCode.CAPACITY_EXCEEDED and "(limits.queue_timeout_seconds)" in message
    tool_limit = "tool 'slow' is at its limit of 1 concurrent call (tools.slow.max_concurrent)"
    cluster_limit = "the cluster of replicas sharing the session store is at its limit of 1 concurrent session"
    if held_by == "tool":
        assert tool_limit in message and "limits.max_concurrent_sessions" not in message, message
    else:
        assert cluster_limit in message and "tools.slow.max_concurrent" not in message, message


async def test_a_tool_cap_holds_across_managers(shared_store: dict[str, TomlValue]) -> None:
    a = _replica(shared_store, {"slow": 1}, max_concurrent_sessions=10)
    b = _replica(shared_store, {"slow": 1}, max_concurrent_sessions=10)
    async with _running(a, b):
        await a.create(tool="slow")
        with pytest.raises(SessionError) as refused:
            await b.create(tool="slow")
        assert "tools.slow.max_concurrent" in refused.value.message
        await b.create(tool="fast")  # other tools are served
        totals = await _totals(b)
        assert {name: t.active for name, t in totals.tools.items()} == {"fast": 1, "slow": 1}
        assert totals.sessions_rejected_tool_limit == 1


async def test_a_release_through_another_manager_ends_the_owners_copy(shared_store: dict[str, TomlValue]) -> None:
    a, b = _replica(shared_store), _replica(shared_store)
    async with _running(a, b):
        session = await a.create(metadata={"job": 7}, expire=True)
        released = await b.release(session.id, "error", "it broke")
        assert (released.id, released.state) == (session.id, SessionState.ERROR)
        assert released.duration >= 0

        with anyio.fail_after(WAIT_SECONDS):
            assert await a.wait_ended(session) is SessionState.ERROR
        assert a.metrics().active_sessions == 0
        for manager in (a, b):
            with pytest.raises(SessionError) as again:
                await manager.release(session.id)
            assert again.value.code is ErrorCode.ALREADY_RELEASED
        with pytest.raises(SessionError) as unknown:
            await b.release("s000000000000-1")
        assert unknown.value.code is ErrorCode.UNKNOWN_SESSION

        totals = await _totals(b)
        assert (totals.total_sessions_error, totals.active_sessions, totals.current_metadata_bytes) == (1, 0, 0)
        _accounts(totals)


async def test_an_end_published_while_the_owners_listener_reconnects_by_itself_is_caught_up_on(
    own_redis: RedisServer,
) -> None:
    # redis-py reconnects a dropped pub/sub connection once by itself and subscribes again: the
    # listener sees no error. An "ended" event published in that gap is missed; the catch-up
    # that follows every subscription ends the owner's copy anyway.
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a, b = _replica(store), _replica(store)
    admin = redis.Redis.from_url(own_redis.url, socket_connect_timeout=5, socket_timeout=5)
    try:
        async with _running(a, b):
            session = await a.create(expire=True)
            await until(lambda: len(admin.client_list(_type="pubsub")) == 2, within=WAIT_SECONDS)
            # Blocking, so that neither listener runs before B's release has reached Redis: the
            # release's "ended" event goes out while A's listener is not subscribed.
            assert admin.client_kill_filter(_type="pubsub") == 2
            released = await b.release(session.id)
            assert released.state is SessionState.COMPLETED
            with anyio.fail_after(WAIT_SECONDS):
                assert await a.wait_ended(session) is SessionState.COMPLETED
            assert a.metrics().active_sessions == 0
            await until(lambda: len(admin.client_list(_type="pubsub")) == 2, within=WAIT_SECONDS)  # subscribed again
            # Still listening: the next release through B reaches A by its event.
            second = await a.create(expire=True)
            await b.release(second.id)
            with anyio.fail_after(WAIT_SECONDS):
                assert await a.wait_ended(second) is SessionState.COMPLETED
    finally:
        admin.close()


async def test_a_tool_call_s_session_is_not_released_by_a_client_through_any_manager(
    shared_store: dict[str, TomlValue],
) -> None:
    # What the session_release tool asks (tool_calls=False): a tool call's session ends with its
    # call, on its own replica and through another, and keeps its cluster slot meanwhile.
    a, b = _replica(shared_store, max_concurrent_sessions=1), _replica(shared_store, max_concurrent_sessions=1)
    async with _running(a, b):
        call = await a.create(tool="search")
        for manager in (a, b):
            with pytest.raises(SessionError) as refused:
                await manager.release(call.id, tool_calls=False)
            assert refused.value.code is ErrorCode.INVALID_ARGUMENT, manager
            message = refused.value.message
            assert "session of a tool call" in message and "session_create" in message
            assert "search" not in message, "the call may be another client's: its tool is not named"
        (seen,) = await b.store.release([(call.id, "completed")], tool_calls=False)
        assert seen.before == "call", "the store's reply does not name the tool either"
        assert call.state is SessionState.ACTIVE
        with pytest.raises(SessionError) as full:
            await b.create(tool="other", queue=False)
        assert full.value.code is ErrorCode.CAPACITY_EXCEEDED
        assert (await _totals(b)).active_sessions == 1

        await a.release(call.id)  # the Python API still ends a tool's session by default
        for manager in (a, b):  # ended, it is still a tool call's session: never a client's to release
            with pytest.raises(SessionError) as ended:
                await manager.release(call.id, tool_calls=False)
            assert ended.value.code is ErrorCode.INVALID_ARGUMENT, manager
            assert "tool call" in ended.value.message and "session_create" in ended.value.message
        made = await a.create()  # session_create's kind: released through either, as before
        said = []
        for manager in (a, b):  # its id without the signature was never issued: unknown to all
            with pytest.raises(SessionError) as short:
                await manager.release(made.id.partition(".")[0], tool_calls=False)
            assert short.value.code is ErrorCode.UNKNOWN_SESSION, manager
            said.append(short.value.message)
        # The replica that made it knows what the short id is, and says to pass the whole one.
        assert "pass the whole session_id" in said[0], said
        released = await b.release(made.id, tool_calls=False)
        assert released.state is SessionState.COMPLETED
        await _ends_written(a, b)
        totals = await _totals(b)
        assert (totals.active_sessions, totals.total_sessions_completed) == (0, 2)
        _accounts(totals)


async def test_sessions_left_by_a_dead_manager_expire_after_their_deadline(shared_store: dict[str, TomlValue]) -> None:
    dead = _replica(shared_store, max_concurrent_sessions=1)
    alive = _replica(shared_store, max_concurrent_sessions=1, max_queued=1, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(alive):
        async with _running(dead):
            await dead.create(timeout_seconds=0.3, expire=False)  # nothing local ends it
        # `dead` is gone without ending its session: only Redis's expiry frees the slot.
        with pytest.raises(SessionError) as full:
            await alive.create(queue=False)
        assert full.value.code is ErrorCode.CAPACITY_EXCEEDED, full.value
        started = time.monotonic()
        # What makes the slot free is the clock passing the deadline + the grace in Redis; a call
        # queued on `alive` waits for that: the housekeeping (due then) that expires the session
        # tells the replicas with calls queued that a slot is free, and the call is admitted.
        with anyio.fail_after(WAIT_SECONDS):
            await alive.create()
        assert time.monotonic() - started <= 0.3 + EXPIRY_GRACE_SECONDS + 2.0
        totals = await _totals(alive)
        assert (totals.total_sessions_timeout, totals.total_sessions_created, totals.active_sessions) == (1, 2, 1)
        _accounts(totals)


async def test_redis_away_refuses_fast_and_everything_resumes(own_redis: RedisServer) -> None:
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a = _replica(store, max_concurrent_sessions=5, max_queued=1, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(a):
        held = await a.create()
        own_redis.stop()

        started = time.monotonic()
        with pytest.raises(SessionError) as refused:
            await a.create(tool="t")
        assert time.monotonic() - started < 1.5
        assert refused.value.code is ErrorCode.STORE_UNAVAILABLE
        assert own_redis.url in refused.value.message
        # A release needs Redis too (it decides who released first): refused, the session stays.
        with pytest.raises(SessionError) as not_released:
            await a.release(held.id)
        assert not_released.value.code is ErrorCode.STORE_UNAVAILABLE
        assert a.get(held.id) is held
        assert a.metrics().sessions_rejected_store_unavailable == 2
        down = await a.cluster_metrics()
        assert not down.available and down.error and own_redis.url in down.error

        with _registered_again() as registered:
            own_redis.start()  # the same port, empty; it answers PING when this returns
            # Redis restarted empty: the call waits (queued) while the replicas register their
            # sessions again (`held` here), then is admitted, with no back-off of its own.
            after = await a.create(tool="t")
            await _wait_registered_again(registered)  # `held`, in the empty Redis
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_created) == (2, 2)
        assert a.metrics().sessions_rejected_store_unavailable == 2, "the wait was no refusal"
        await a.release(after.id)
        await a.release(held.id)
        await _ends_written(a)
        totals = await _totals(a)
        assert (totals.total_sessions_completed, totals.active_sessions) == (2, 0)
        _accounts(totals)


async def test_a_session_held_past_its_deadline_is_registered_again_when_redis_comes_back_empty(
    own_redis: RedisServer,
) -> None:
    # A call that holds its cancellation off still runs past its deadline: when Redis restarts
    # empty, its replica registers it again with the others, so the cap keeps counting it.
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a = _replica(store, max_concurrent_sessions=1)
    b = _replica(store, max_concurrent_sessions=1, max_queued=1, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(a, b):
        held = await a.create(tool="t", timeout_seconds=0.2)
        asked_to_stop = anyio.Event()
        held.on_cancel = asked_to_stop.set  # its work, told to stop at the deadline, holds it off
        with anyio.fail_after(WAIT_SECONDS):
            await asked_to_stop.wait()
        assert a.get(held.id) is held and held.state is SessionState.ACTIVE

        with _registered_again() as registered:
            own_redis.stop()
            own_redis.start()  # the same port, empty
            await _wait_registered_again(registered)
        assert (await _totals(b)).active_sessions == 1
        with pytest.raises(SessionError) as full:
            await b.create(queue=False)
        # The cap of 1 counts it (or admissions still wait for the replicas to register again).
        assert full.value.code in (ErrorCode.CAPACITY_EXCEEDED, ErrorCode.STORE_UNAVAILABLE), full.value
        assert (await _totals(b)).peak_concurrent_sessions == 1, "nothing was admitted beside it"

        assert a.end(held, SessionState.TIMEOUT, "stopped late")  # written through a's outbox
        await _ends_written(a)
        totals = await _totals(b)
        assert (totals.active_sessions, totals.total_sessions_timeout) == (0, 1)
        await b.create()  # the slot is free (once admissions no longer wait for the replicas)


async def test_an_overdue_session_its_live_replica_no_longer_runs_is_ended_in_the_store(
    shared_store: dict[str, TomlValue],
) -> None:
    # Redis leaves a live replica's overdue sessions to it. One that the replica does not run
    # (registered in Redis, never opened here: lost track of) must not keep its slot for as long
    # as the replica lives: told it is overdue, the replica ends it in Redis.
    a = _replica(shared_store, max_concurrent_sessions=1)
    b = _replica(shared_store, max_concurrent_sessions=1, max_queued=1, queue_timeout_seconds=WAIT_SECONDS)
    async with _running(a, b):
        assert await a.store.acquire("s-lost-track", 0.2, "t", None, 0, 1, None, 0, True) == "ok"
        assert a.get("s-lost-track") is None
        with pytest.raises(SessionError) as full:
            await b.create(queue=False)
        assert full.value.code is ErrorCode.CAPACITY_EXCEEDED, full.value
        # Past its deadline + the grace, the housekeeping tells `a` it is overdue, and `a` ends it
        # through its outbox: the end that frees the slot tells the replicas with calls queued,
        # and b's queued call is admitted (within the bound only if `a` ended it: it stays live).
        with anyio.fail_after(WAIT_SECONDS):
            await b.create()
        totals = await _totals(b)
        assert (totals.total_sessions_timeout, totals.total_sessions_created, totals.active_sessions) == (1, 2, 1)
        _accounts(totals)


async def test_session_ends_made_while_redis_hangs_are_written_when_it_answers(own_redis: RedisServer) -> None:
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.3}
    a = _replica(store, max_concurrent_sessions=5)
    async with _running(a):
        calls = [await a.create(tool="t") for _ in range(3)]
        own_redis.pause()  # connections stay open, nothing answers
        try:
            for session, state in zip(
                calls, (SessionState.COMPLETED, SessionState.ERROR, SessionState.CANCELLED), strict=True
            ):
                assert a.end(session, state)  # how a tool call ends: at once, whatever Redis does
            with pytest.raises(SessionError) as refused:
                await a.create(tool="t")
            assert refused.value.code is ErrorCode.STORE_UNAVAILABLE
        finally:
            own_redis.resume()
        await _ends_written(a)  # the outbox retries, with a back-off, until Redis takes them
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_completed, totals.total_sessions_error) == (0, 1, 1)
        # The refused admission timed out on its way but ran once Redis woke up: it was admitted
        # there and at once ended as cancelled, or found the mark its end left and was not.
        assert (totals.total_sessions_created, totals.total_sessions_cancelled) in ((3, 1), (4, 2))
        _accounts(totals)


async def test_sessions_redis_lost_are_registered_again(own_redis: RedisServer) -> None:
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a = _replica(store, max_concurrent_sessions=5)
    async with _running(a):
        kept = await a.create(tool="t", timeout_seconds=30)
        with _registered_again() as registered:
            own_redis.restart()  # back empty: the cluster no longer counts `kept`
            await _wait_registered_again(registered)
        totals = await _totals(a)
        assert (totals.active_sessions, totals.tools["t"].active) == (1, 1)
        await a.release(kept.id)
        await _ends_written(a)
        totals = await _totals(a)
        assert (totals.active_sessions, totals.total_sessions_completed) == (0, 1)
        _accounts(totals)


async def test_a_session_begun_after_the_snapshot_redis_restarts_from_is_registered_again(
    own_redis: RedisServer,
) -> None:
    # Restarted from a snapshot, Redis has its epoch: no replica sees it as new. The listener's
    # connection dropped, though, and redis-py subscribed again by itself (the restart is over
    # before this loop runs again): the catch-up after that subscription registers `since`.
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a = _replica(store, max_concurrent_sessions=5)
    admin = redis.Redis.from_url(own_redis.url, socket_connect_timeout=5, socket_timeout=5)
    try:
        async with _running(a):
            before = await a.create(tool="t", timeout_seconds=30)
            admin.save()  # dump.rdb in its directory, which a start loads
            since = await a.create(tool="t", timeout_seconds=30)
            with _registered_again() as registered:
                own_redis.restart()  # back as it was at the save: without `since`
                await _wait_registered_again(registered)
            totals = await _totals(a)
            assert (totals.active_sessions, totals.tools["t"].active) == (2, 2)
            for session in (before, since):
                await a.release(session.id)
            await _ends_written(a)
            assert (await _totals(a)).active_sessions == 0
    finally:
        admin.close()


async def test_a_manager_will_not_start_without_redis(own_redis: RedisServer) -> None:
    url = own_redis.url
    own_redis.stop()
    manager = _replica({"backend": "redis", "url": url, "timeout_seconds": 0.5})
    with pytest.raises(StoreUnavailable, match=url):
        async with manager.running():
            pass


async def test_a_whole_settings_gives_the_manager_its_store_limits_and_tool_caps(
    shared_redis_url: str, shared_store: dict[str, TomlValue], key_prefix: str
) -> None:
    # What `load_settings` returns, as `SessionManager(settings)` takes it: its [store] is the
    # Redis to share (this test's, under its prefix), not the built-in default URL.
    config = Settings(
        limits=LimitsSettings(max_concurrent_sessions=2),
        tools={"slow": ToolSettings(max_concurrent=1)},
        store=StoreSettings(**shared_store),  # type: ignore[arg-type]
    )
    a, b = ClusterSessionManager(config), ClusterSessionManager(config)
    assert a.store.settings == config.store and a.store.prefix == key_prefix
    assert a.limits == config.limits and a.tool_caps == {"slow": 1}
    async with _running(a, b):
        held = await a.create(tool="slow")
        with pytest.raises(SessionError) as tool_full:
            await b.create(tool="slow")  # the tool cap, held across the two through that Redis
        assert "tools.slow.max_concurrent" in tool_full.value.message
        await b.create(tool="fast")
        with pytest.raises(SessionError) as full:
            await b.create(tool="fast")  # the global cap of 2
        assert full.value.code is ErrorCode.CAPACITY_EXCEEDED
        store = redis.Redis.from_url(shared_redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            assert store.zscore(f"{key_prefix}active", held.id) is not None  # in the Redis the settings name
        finally:
            store.close()
    # An explicit store still wins over the settings' own.
    explicit = StoreSettings(**{**shared_store, "key_prefix": f"{key_prefix}other:"})  # type: ignore[arg-type]
    assert ClusterSessionManager(config, store=explicit).store.settings == explicit


def test_settings_without_the_redis_backend_are_refused_with_the_fix() -> None:
    config = Settings(limits=LimitsSettings(max_concurrent_sessions=3))  # [store] backend = "memory"
    with pytest.raises(ValueError, match='backend = "memory"') as refused:
        ClusterSessionManager(config)
    message = str(refused.value)
    assert 'backend = "redis"' in message and "store=StoreSettings" in message and "SessionManager" in message
    # Given a store explicitly, the settings' [store] is not consulted.
    manager = ClusterSessionManager(config, store=StoreSettings(backend="redis"))
    assert manager.limits.max_concurrent_sessions == 3


async def test_a_queued_call_that_needs_a_thread_is_refused_at_its_turn_while_threads_are_stuck(
    shared_store: dict[str, TomlValue],
) -> None:
    # As on one server: a call that needs a thread is not admitted while too many are stuck,
    # queued or not. The slot the release frees goes to the async call queued behind it.
    a = _replica(
        shared_store, max_concurrent_sessions=1, max_queued=2, queue_timeout_seconds=30.0, max_abandoned_threads=1
    )
    async with _running(a):
        held = await a.create(tool="t")
        outcomes: dict[str, Any] = {}

        async def queued(key: str, needs_thread: bool) -> None:
            try:
                outcomes[key] = await a.create(tool=key, needs_thread=needs_thread)
            except SessionError as exc:
                outcomes[key] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(queued, "sync", True)
            await until(lambda: a.metrics().queued_sessions == 1, within=WAIT_SECONDS)
            tg.start_soon(queued, "async", False)
            await until(lambda: a.metrics().queued_sessions == 2, within=WAIT_SECONDS)
            a.thread_abandoned()  # a sync call's thread runs on past its end
            await a.release(held.id)
            await until(lambda: len(outcomes) == 2, within=WAIT_SECONDS)
        refused, admitted = outcomes["sync"], outcomes["async"]
        assert isinstance(refused, SessionError) and refused.code is ErrorCode.CAPACITY_EXCEEDED
        assert "stuck" in refused.message
        assert not isinstance(admitted, SessionError) and admitted.state is SessionState.ACTIVE
        assert a.metrics().sessions_rejected_threads == 1
        await a.release(admitted.id)
        a.thread_ended()


async def test_an_outbox_wake_with_nothing_to_write_does_not_say_redis_answers_again(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # An admission's round trip takes the waiting ends with it, so the outbox may wake to find
    # nothing to write. Redis was not asked then: that is no sign it is back.
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a = _replica(store, max_concurrent_sessions=5)
    async with _running(a):
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="server.cluster"), pytest.raises(SessionError) as refused:
            await a.create(tool="t")
        assert refused.value.code is ErrorCode.STORE_UNAVAILABLE
        # The race, set up by hand: an admission's round trip takes the waiting ends (here, the
        # refused call's own), and the outbox, woken for them, finds nothing left to write.
        taken = a.store._take_ended()
        assert taken and not a.store.pending_ends
        woken = a.store.ended_ready
        woken.set()
        await until(lambda: a.store.ended_ready is not woken, within=WAIT_SECONDS)  # the outbox ran
        a.store._ended[:0] = taken  # the round trip failed: its ends are back, first in line
        assert "answers again" not in caplog.text, caplog.text
        down = await a.cluster_metrics()
        assert not down.available


async def test_after_redis_comes_back_empty_nothing_is_admitted_until_the_replicas_registered_again(
    own_redis: RedisServer,
) -> None:
    # Each replica runs a session Redis then forgets. An admission that reaches the empty Redis
    # before they are registered again would be counted against none of them: past the cap.
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    a, b = _replica(store, max_concurrent_sessions=2), _replica(store, max_concurrent_sessions=2)
    registered: list[str] = []

    class Registered(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if REGISTERED_AGAIN in record.getMessage():
                registered.append(record.getMessage())

    handler = Registered(logging.WARNING)
    cluster_logger = logging.getLogger("server.cluster")
    level = cluster_logger.level
    cluster_logger.setLevel(logging.WARNING)
    cluster_logger.addHandler(handler)
    try:
        async with _running(a, b):
            held = [await a.create(tool="t"), await b.create(tool="t")]  # the cap of 2 is reached
            own_redis.stop()
            own_redis.start()  # the same port, empty
            with pytest.raises(SessionError) as early:
                await b.create(tool="t", queue=False)  # before the replicas are registered again
            assert early.value.code is ErrorCode.STORE_UNAVAILABLE, early.value.message
            assert "restarted empty" in early.value.message and "retry in a moment" in early.value.message
            await until(lambda: len(registered) == 2, within=WAIT_SECONDS)  # each replica's own session
            with pytest.raises(SessionError) as later:
                await a.create(tool="t", queue=False)  # still waiting, or the cap of 2: never admitted
            assert later.value.code in (ErrorCode.STORE_UNAVAILABLE, ErrorCode.CAPACITY_EXCEEDED)
            totals = await _totals(a)
            assert (totals.active_sessions, totals.peak_concurrent_sessions) == (2, 2)
            for session, manager in zip(held, (a, b), strict=True):
                await manager.release(session.id)
    finally:
        cluster_logger.removeHandler(handler)
        cluster_logger.setLevel(level)


async def test_while_the_replicas_register_again_a_queued_call_waits_without_spinning_and_is_told_why(
    own_redis: RedisServer,
) -> None:
    # After Redis restarts empty, admissions wait about RECOVERY_SECONDS. A queued call waits
    # that out at the housekeeping's pace (about once a second), not in a loop of round trips;
    # one whose queue timeout comes first is told why (not that the cluster is full).
    store: dict[str, TomlValue] = {"backend": "redis", "url": own_redis.url, "timeout_seconds": 0.5}
    patient = _replica(store, max_concurrent_sessions=5, max_queued=2, queue_timeout_seconds=WAIT_SECONDS)
    hasty = _replica(store, max_concurrent_sessions=5, max_queued=2, queue_timeout_seconds=0.3)
    rounds = 0
    housekeeping = patient.store.housekeeping

    async def counted(known_epoch: str | None = None) -> tuple[float | None, str]:
        nonlocal rounds
        rounds += 1
        return await housekeeping(known_epoch)

    patient.store.housekeeping = counted  # type: ignore[method-assign]
    async with _running(patient, hasty):
        await patient.create(tool="t")  # a session to register again
        own_redis.stop()
        own_redis.start()  # the same port, empty
        before = rounds
        started = time.monotonic()
        admitted: list[Session] = []

        async def wait_it_out() -> None:
            admitted.append(await patient.create(tool="t"))  # queued until the replicas registered again

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_it_out)
            with pytest.raises(SessionError) as told:
                await hasty.create(tool="t")  # its 0.3 s queue timeout comes within the window
        waited = time.monotonic() - started
    assert admitted[0].state is SessionState.ACTIVE
    assert waited < RECOVERY_SECONDS + 2 * 1.0 + 1.0, waited  # the window, then the next housekeeping
    assert rounds - before <= 10, f"{rounds - before} housekeeping round trips in {waited:.2f}s"
    assert told.value.code is ErrorCode.STORE_UNAVAILABLE, told.value.message
    assert "restarted empty" in told.value.message and "waited" in told.value.message
