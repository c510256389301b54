"""Cluster-wide admission: the caps hold for the service, not per replica.

Replicas of the standalone server share one Redis (`[store] backend = "redis"`, one key prefix
per test). The global cap is observed from outside the session layer: `tracked_sleep` counts
its running bodies in a Redis counter and keeps the highest value it reached, and a sampler
reads `cluster.active_sessions` through `session_metrics` on every replica during the burst.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from mcp import Client
from mcp_types import CallToolResult

from server.config import StoreSettings
from server.store import EXPIRY_GRACE_SECONDS, RedisStore
from tests.cluster.conftest import (
    RedisServer,
    assert_cluster_accounts,
    client_with_credential,
    cluster_config,
    cluster_metrics,
    cluster_until,
    local_until,
    quiescent_cluster,
    start_replicas,
    store_section,
    stored_text,
    tool_active,
)
from tests.e2e.conftest import TomlValue, metrics
from tests.helpers import code_of, error_of, text_of

CAP = 10
CALLS = 100
REPLICAS = 3
CLIENTS_PER_REPLICA = 2
#: Long enough that the calls overlap and the cap is reached, short enough to keep the test quick.
WORK_SECONDS = 0.5
#: The whole burst, on a slow shared CI machine.
BURST_SECONDS = 60.0
#: How soon a call queued on one replica must be admitted once another replica frees the slot
#: (its queue timeout is far longer).
WAKE_SECONDS = 3.0


async def test_a_global_cap_of_10_holds_across_three_replicas_under_100_concurrent_calls(
    tmp_path: Path, shared_store: dict[str, TomlValue], shared_redis_url: str, observer_key: str
) -> None:
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": CAP})
    outcomes: Counter[str] = Counter()
    answered_by: Counter[int] = Counter()
    sampled: list[int] = []
    burst_done = anyio.Event()

    async with start_replicas(tmp_path, config, REPLICAS) as replicas, AsyncExitStack() as stack:
        callers = [
            [
                await stack.enter_async_context(Client(r.url or "", read_timeout_seconds=BURST_SECONDS))
                for _ in range(CLIENTS_PER_REPLICA)
            ]
            for r in replicas
        ]
        observers = [await stack.enter_async_context(r.client()) for r in replicas]
        await cluster_until(observers[0], lambda c: c["replicas"] == REPLICAS, within=10)

        async def one_call(n: int) -> None:
            replica = n % REPLICAS
            client = callers[replica][(n // REPLICAS) % CLIENTS_PER_REPLICA]
            arguments = {"seconds": WORK_SECONDS, "redis_url": shared_redis_url, "key": observer_key}
            result = await client.call_tool("tracked_sleep", arguments)
            answered_by[replica] += 1
            if result.is_error:
                outcomes[code_of(result)] += 1
            else:
                assert text_of(result) == f"slept {WORK_SECONDS:g}s", result
                outcomes["ok"] += 1

        async def sample() -> None:
            n = 0
            while not burst_done.is_set():
                _, cluster = await cluster_metrics(observers[n % REPLICAS])
                sampled.append(cluster["active_sessions"])
                n += 1

        with anyio.fail_after(BURST_SECONDS):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                async with anyio.create_task_group() as calls:
                    for n in range(CALLS):
                        calls.start_soon(one_call, n)
                burst_done.set()
        local = [await metrics(observer) for observer in observers]
        cluster = await quiescent_cluster(observers[0])
        # Healthy afterwards: every replica admits and answers a call.
        for observer in observers:
            assert text_of(await observer.call_tool("echo", {"text": "still here"})) == "still here"

    counter = aioredis.Redis.from_url(shared_redis_url)
    try:
        peak_seen = int(await counter.get(f"{observer_key}:peak") or 0)
        running = int(await counter.get(f"{observer_key}:running") or 0)
    finally:
        await counter.aclose()

    # Every call was answered, by the replica it was sent to, with its result or a refusal.
    assert sum(outcomes.values()) == CALLS, outcomes
    assert set(outcomes) <= {"ok", "capacity_exceeded"}, outcomes
    assert [answered_by[r] for r in range(REPLICAS)] == [len(range(r, CALLS, REPLICAS)) for r in range(REPLICAS)]
    # The cap was reached (refusals happen only at it) and never exceeded, seen three ways.
    assert outcomes["capacity_exceeded"] > 0 and outcomes["ok"] >= CAP, outcomes
    assert 1 < peak_seen <= CAP, f"tool bodies running at once across the cluster: {peak_seen}"
    assert running == 0
    assert max(sampled) <= CAP, f"cluster.active_sessions sampled above the cap: {max(sampled)}"
    assert peak_seen <= cluster["peak_concurrent_sessions"] == CAP, cluster
    # The cluster totals add up, and match the answers and the replicas' own counters.
    assert_cluster_accounts(cluster)
    assert cluster["active_sessions"] == 0, cluster
    assert cluster["total_sessions_created"] == outcomes["ok"] == cluster["total_sessions_completed"], cluster
    for state in ("error", "timeout", "cancelled"):
        assert cluster[f"total_sessions_{state}"] == 0, cluster
    assert cluster["sessions_rejected_capacity"] == outcomes["capacity_exceeded"], cluster
    assert tool_active(cluster, "tracked_sleep") == 0, cluster
    assert sum(m["total_sessions_created"] for m in local) == outcomes["ok"], local
    assert sum(m["sessions_rejected_capacity"] for m in local) == outcomes["capacity_exceeded"], local
    assert all(m["peak_concurrent_sessions"] <= CAP for m in local), local
    assert cluster["replicas"] == REPLICAS and cluster["backend"] == "redis" and cluster["available"] is True


async def test_a_call_queued_on_one_replica_is_admitted_when_another_replica_frees_the_slot(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    limits: dict[str, TomlValue] = {"max_concurrent_sessions": 1, "max_queued": 4, "queue_timeout_seconds": 8.0}
    config = cluster_config(shared_store, limits=limits)
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        held = await on_a.call_tool("session_create", {"timeout_seconds": 60})
        session_id = (held.structured_content or {})["session_id"]
        answered: dict[str, float] = {}

        async def queued_call() -> None:
            result = await on_b.call_tool("echo", {"text": "was queued"})
            answered["at"] = time.monotonic()
            assert text_of(result) == "was queued", result

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(queued_call)
                await local_until(on_b, lambda m: m["queued_sessions"] == 1)
                released_at = time.monotonic()
                released = await on_a.call_tool("session_release", {"session_id": session_id})
                assert (released.structured_content or {})["state"] == "completed", released
        cluster = await quiescent_cluster(on_b)
        local_b = await metrics(on_b)

    assert answered["at"] - released_at < WAKE_SECONDS, "the queued call was not woken by the release on A"
    assert local_b["total_sessions_created"] == 1 and local_b["sessions_rejected_queue_timeout"] == 0, local_b
    assert cluster["total_sessions_created"] == 2 and cluster["total_sessions_completed"] == 2, cluster
    assert cluster["peak_concurrent_sessions"] == 1, cluster


async def test_a_tool_cap_holds_across_replicas_while_other_tools_are_served(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    tools: dict[str, dict[str, TomlValue]] = {"hang_async": {"timeout_seconds": 2.0, "max_concurrent": 2}}
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": CAP}, tools=tools)
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        timed_out: list[str] = []

        async def hang(client: Client) -> None:
            timed_out.append(code_of(await client.call_tool("hang_async", {})))

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hang, on_a)
                tg.start_soon(hang, on_b)
                during = await cluster_until(on_a, lambda c: tool_active(c, "hang_async") == 2)
                refused = [await on_a.call_tool("hang_async", {}), await on_b.call_tool("hang_async", {})]
                assert text_of(await on_b.call_tool("echo", {"text": "other tool"})) == "other tool"
        cluster = await quiescent_cluster(on_a)

    assert during["active_sessions"] == 2, during
    for result in refused:
        error = error_of(result)
        assert error["code"] == "capacity_exceeded" and error["tool"] == "hang_async", error
    assert timed_out == ["timeout", "timeout"]
    assert cluster["sessions_rejected_tool_limit"] == 2 and cluster["sessions_rejected_capacity"] == 0, cluster
    assert cluster["total_sessions_timeout"] == 2 and cluster["total_sessions_completed"] == 1, cluster
    assert tool_active(cluster, "hang_async") == 0 and cluster["active_sessions"] == 0, cluster
    assert_cluster_accounts(cluster)


async def test_a_client_share_holds_across_replicas(
    tmp_path: Path, shared_store: dict[str, TomlValue], shared_redis_url: str, namespace: str
) -> None:
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": CAP, "max_sessions_per_client": 2})
    # Tokens no digest, id or counter could contain by chance.
    alice, bob = f"alice-secret-{uuid.uuid4().hex}", f"bob-secret-{uuid.uuid4().hex}"
    async with (
        start_replicas(tmp_path, config, 2) as (a, b),
        client_with_credential(a, alice) as alice_a,
        client_with_credential(b, alice) as alice_b,
        client_with_credential(a, bob) as bob_a,
    ):
        opened = [await alice_a.call_tool("session_create", {}), await alice_b.call_tool("session_create", {})]
        refused = [await alice_a.call_tool("session_create", {}), await alice_b.call_tool("echo", {"text": "more"})]
        served = await bob_a.call_tool("session_create", {})
        _, cluster = await cluster_metrics(bob_a)
        # Read while the three sessions are open, so their clients are in the store.
        stored = await stored_text(shared_redis_url, namespace)

    # A client's bearer credential is kept in Redis only as a digest, never as it came.
    client_keys = {text for text in stored if text.startswith("credential:")}
    assert len(client_keys) == 2, f"expected alice's and bob's client keys in the store: {client_keys}"
    leaked = [text for text in stored if alice in text or bob in text]
    assert not leaked, f"a raw bearer token is stored in Redis: {leaked}"
    assert all(not result.is_error for result in opened), opened
    for result in refused:
        error = error_of(result)
        assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"], error
    assert not served.is_error, served
    assert cluster["sessions_rejected_client_limit"] == 2, cluster
    assert cluster["active_sessions"] == 3 and cluster["total_sessions_created"] == 3, cluster
    assert_cluster_accounts(cluster)


async def test_the_cluster_counts_a_client_share_refusal_whether_the_replica_or_redis_decided_it(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    # A client over its share at the replica where it already holds its sessions is refused there,
    # before Redis is asked; the cluster's counter missed those (28 refusals: locals 6+8+14,
    # cluster 19). It is counted in Redis with the replica's next round trip.
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": CAP, "max_sessions_per_client": 1})
    alice = f"alice-secret-{uuid.uuid4().hex}"
    async with (
        start_replicas(tmp_path, config, 2) as (a, b),
        client_with_credential(a, alice) as alice_a,
        client_with_credential(b, alice) as alice_b,
        a.client() as observer,
    ):
        opened = await alice_a.call_tool("session_create", {})
        refused = [
            await alice_a.call_tool("session_create", {}),  # decided at replica a: alice holds one there
            await alice_b.call_tool("echo", {"text": "more"}),  # decided by Redis
        ]
        cluster = await cluster_until(observer, lambda c: c["sessions_rejected_client_limit"] >= 2)
        locals_ = [await metrics(alice_a), await metrics(alice_b)]

    assert not opened.is_error, opened
    for result in refused:
        error = error_of(result)
        assert error["code"] == "capacity_exceeded" and "max_sessions_per_client" in error["message"], error
    assert [m["sessions_rejected_client_limit"] for m in locals_] == [1, 1], locals_
    assert cluster["sessions_rejected_client_limit"] == 2, cluster


async def test_a_call_holding_its_deadline_off_keeps_its_cluster_slot_until_it_stops(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    # A call whose shielded clean-up runs 3 s past its 0.3 s deadline still runs, and its replica
    # still counts it: Redis must not free its slot at the deadline + the grace while its live
    # replica holds it, or another replica admits a call the cap has no room for.
    deadline, hold = 0.3, 3.0
    limits: dict[str, TomlValue] = {"max_concurrent_sessions": 1, "max_queued": 0}
    config = cluster_config(shared_store, limits=limits, tools={"held_off_sleep": {"timeout_seconds": deadline}})
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        held: list[CallToolResult] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def call_held_off() -> None:
                    held.append(await on_a.call_tool("held_off_sleep", {"seconds": 30, "hold": hold}))

                tg.start_soon(call_held_off)
                await cluster_until(on_b, lambda c: c["active_sessions"] == 1, what="the held call admitted")
                admitted = time.monotonic()
                # The condition is the clock passing the deadline + the grace (it was admitted
                # before `admitted`): nothing to wait on but the time itself.
                await anyio.sleep(admitted + deadline + EXPIRY_GRACE_SECONDS + 0.1 - time.monotonic())
                # Expire what Redis holds overdue now, rather than wait for a replica to do so.
                await housekeeping(shared_store)
                assert not held, f"the held call answered before its hold was over: {held}"
                refused = await on_b.call_tool("echo", {"text": "no slot"})
                _, during = await cluster_metrics(on_b)
                assert time.monotonic() - admitted < deadline + hold, "the hold ended before the checks"
            cluster = await quiescent_cluster(on_b)
        admitted_after = await on_b.call_tool("echo", {"text": "a freed slot"})

    assert code_of(refused) == "capacity_exceeded", refused
    assert during["active_sessions"] == 1, during
    assert code_of(held[0]) == "timeout" and "held the cancellation off" in error_of(held[0])["message"], held
    assert text_of(admitted_after) == "a freed slot"
    assert cluster["total_sessions_timeout"] == 1 and cluster["sessions_rejected_capacity"] == 1, cluster


async def housekeeping(store_section: dict[str, TomlValue]) -> None:
    """Run the store's housekeeping (the expiry of overdue sessions) once, as a replica would."""
    store = RedisStore(StoreSettings.model_validate(store_section), "test-housekeeper")
    try:
        await store.housekeeping()
    finally:
        await store.close()


#: Calls of a capped tool queued behind its one running call.
BACKLOG = 100
#: Calls of another tool made meanwhile, one after another.
OTHER_CALLS = 10
#: Redis scripts the replica may run per call of the other tool (its admission, its end, a pass of
#: the dispatcher woken by that end, the housekeeping's): a few, whatever the backlog.
SCRIPTS_PER_CALL = 6


def evalsha_calls(info: dict[str, Any]) -> int:
    """How many EVALSHA (the store's scripts) Redis ran since its stats were reset."""
    stats = info.get("cmdstat_evalsha", {"calls": 0})
    return int(stats["calls"])


def queued(count: int) -> Callable[[dict[str, Any]], bool]:
    """Whether a `session_metrics` snapshot shows `count` calls queued."""
    return lambda snapshot: bool(snapshot["queued_sessions"] == count)


def _text(item: bytes | str) -> str:
    return item.decode() if isinstance(item, bytes) else item


async def test_a_backlog_of_a_capped_tool_neither_holds_up_other_tools_nor_costs_a_round_trip_per_queued_call(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str, observer_key: str
) -> None:
    # A pass of the dispatcher asked Redis once per queued call, each of the full tool's again, and
    # a call of another tool queued behind them all: 300 queued calls of a tool capped at 1 made a
    # no-op call of another tool wait 120-200 ms. Now a pass asks once per full tool, a newcomer of
    # another tool asks Redis at once, and the capped tool's calls are still admitted in order.
    limits: dict[str, TomlValue] = {
        "max_concurrent_sessions": 50,
        "max_queued": 2 * BACKLOG,
        "queue_timeout_seconds": 60,
    }
    config = cluster_config(
        store_section(own_redis.url, key_prefix), limits=limits, tools={"ordered": {"max_concurrent": 1}}
    )
    store = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=5, socket_timeout=5)
    answers: list[CallToolResult] = []

    async def call_ordered(client: Client, tag: str, wait: bool = False) -> None:
        arguments = {"redis_url": own_redis.url, "key": observer_key, "tag": tag, "wait": wait}
        answers.append(await client.call_tool("ordered", arguments))

    try:
        async with start_replicas(tmp_path, config, 1) as (replica,), AsyncExitStack() as stack:
            callers = [await stack.enter_async_context(replica.client()) for _ in range(4)]
            observer = await stack.enter_async_context(replica.client())
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call_ordered, callers[0], "first", True)
                    await cluster_until(observer, lambda c: tool_active(c, "ordered") == 1)
                    for n in range(BACKLOG):  # one at a time: their order of arrival is known
                        tg.start_soon(call_ordered, callers[n % len(callers)], str(n))
                        await local_until(observer, queued(n + 1))
                    await store.config_resetstat()
                    others = [await observer.call_tool("echo", {"text": "other"}) for _ in range(OTHER_CALLS)]
                    scripts = evalsha_calls(await store.info("commandstats"))
                    still_queued = (await metrics(observer))["queued_sessions"]
                    await store.rpush(f"{observer_key}:go", "go")
            order = [_text(item) for item in await store.lrange(f"{observer_key}:order", 0, -1)]
    finally:
        await store.aclose()
    assert [text_of(result) for result in others] == ["other"] * OTHER_CALLS, others
    assert still_queued == BACKLOG, "the backlog drained before the other calls were measured"
    assert scripts <= SCRIPTS_PER_CALL * OTHER_CALLS, f"{scripts} Redis scripts for {OTHER_CALLS} calls"
    assert not any(result.is_error for result in answers), answers
    assert order == ["first", *(str(n) for n in range(BACKLOG))], order
