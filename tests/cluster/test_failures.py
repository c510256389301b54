"""Failures in cluster mode, with real processes: a replica killed with SIGKILL mid-call, Redis
stopped and restarted (same port) mid-test, Redis hung (SIGSTOP), and Redis unreachable at startup.

- The sessions of a dead replica keep their slots until their deadlines (+ a grace of about
  1 s, once the replica has been silent for 3 s), then expire in Redis, count as `timeout` in
  the cluster totals and free their slots.
- While Redis is away, hosted calls, `session_create` and a release on another replica fail
  fast (within about `[store] timeout_seconds`) with `store_unavailable`; `session_metrics`
  still answers, with `cluster.available` false. When Redis is back, calls succeed again by
  themselves.
- A replica that exits past work holding its shutdown off still writes its sessions' ends and
  leaves the live replicas at once, as any clean stop does.
- A reply from Redis the replica cannot read (a counter that is not a number) fails
  `session_metrics` inside: `internal_error`, logged once, never `invalid_argument`.
- At startup an unreachable Redis is a clear error naming `[store] url`, and exit status 2.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
import redis
import redis.asyncio as aioredis
from mcp import Client
from mcp_types import CallToolResult

from server.config import StoreSettings
from server.store import EXPIRY_GRACE_SECONDS, OWNER_LIVE_SECONDS, REPLICA_LIVE_SECONDS, RedisStore
from tests.cluster.conftest import (
    STORE_TIMEOUT_SECONDS,
    RedisServer,
    assert_cluster_accounts,
    cluster_config,
    cluster_metrics,
    cluster_until,
    local_until,
    pem_pair,
    ping,
    quiescent_cluster,
    redis_server_binary,
    start_replicas,
    store_section,
)
from tests.e2e.conftest import (
    CALL_SECONDS,
    HELD_EXIT_MARGIN,
    HELD_SECONDS,
    HOST,
    START_SECONDS,
    ServerProcess,
    TomlValue,
    free_port,
    metrics,
    start_server,
)
from tests.helpers import code_of, error_of, text_of

#: Deadline of the dead replica's sessions.
DEADLINE_SECONDS = 2.0
#: "expires in Redis at its deadline + a grace of about 1 s".
GRACE_SECONDS = 1.0
#: Slack for a loaded CI machine on top of deadline + grace.
SLACK_SECONDS = 4.0
#: A call with Redis away must fail within `[store] timeout_seconds` plus this.
FAIL_FAST_MARGIN = 1.0
#: How long the replicas may take to serve again once Redis is back, and how many tries.
RECOVERY_SECONDS = 10.0
RECOVERY_ATTEMPTS = 100
#: The pause between two tries of a client retrying after `store_unavailable`.
RETRY_PAUSE = 0.1
#: How long a replica that cannot reach Redis may take to give up at startup.
STARTUP_EXIT_SECONDS = START_SECONDS + 10.0
ERROR_KEYS = {"store.url", "[store] url"}
#: How long a replica may take to stop on SIGTERM with Redis away (drain, one bounded flush).
STOP_EXIT_SECONDS = 15.0
#: `[store] timeout_seconds` where a test measures against it: long, so that a loaded machine's
#: delays stay far below the difference it looks for.
HUNG_STORE_TIMEOUT_SECONDS = 3.0


async def timed_call(client: Client, tool: str, arguments: dict[str, Any]) -> tuple[CallToolResult, float]:
    """The result of one call and how long it took (bounded well beyond any expected answer)."""
    started = time.monotonic()
    with anyio.fail_after(10):
        result = await client.call_tool(tool, arguments)
    return result, time.monotonic() - started


async def until_served(client: Client, tool: str, arguments: dict[str, Any]) -> CallToolResult:
    """Retry `tool` the way a client would after `store_unavailable` until it is served (bounded
    in time and tries)."""
    last: CallToolResult | None = None
    with anyio.move_on_after(RECOVERY_SECONDS):
        for _ in range(RECOVERY_ATTEMPTS):
            last = await client.call_tool(tool, arguments)
            if not last.is_error:
                return last
            assert code_of(last) == "store_unavailable", last
            await anyio.sleep(RETRY_PAUSE)
    raise AssertionError(f"{tool} still failing {RECOVERY_SECONDS}s after Redis came back: {last}")


async def test_a_killed_replicas_sessions_expire_at_their_deadlines_and_free_their_slots(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    tools: dict[str, dict[str, TomlValue]] = {"hang_async": {"timeout_seconds": DEADLINE_SECONDS}}
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": 2}, tools=tools)
    async with start_replicas(tmp_path, config, 2) as (a, b), b.client() as on_b:
        await cluster_until(on_b, lambda c: c["replicas"] == 2, within=10)
        dying: list[str] = []

        async def call_that_dies_with_its_replica() -> None:
            try:
                async with a.client() as on_a:
                    dying.append(f"answered: {await on_a.call_tool('hang_async', {})}")
            except* httpx2.TransportError:
                dying.append("disconnected")

        with anyio.fail_after(DEADLINE_SECONDS + GRACE_SECONDS + SLACK_SECONDS + 20):
            async with anyio.create_task_group() as tg:
                started = time.monotonic()
                tg.start_soon(call_that_dies_with_its_replica)
                async with a.client() as on_a:
                    created = await on_a.call_tool("session_create", {"timeout_seconds": DEADLINE_SECONDS})
                    assert not created.is_error, created
                    full = await cluster_until(on_b, lambda c: c["active_sessions"] == 2)
                    refused_before = await on_b.call_tool("echo", {"text": "no slot"})
                a.process.kill()  # SIGKILL: nothing of A's runs any more
                await a.process.wait()
                refused_after_kill = await on_b.call_tool("echo", {"text": "still no slot"})

                within = DEADLINE_SECONDS + GRACE_SECONDS + SLACK_SECONDS
                expired = "the cluster's active count after the replica holding every slot was killed"
                freed = await cluster_until(on_b, lambda c: c["active_sessions"] == 0, within=within, what=expired)
                freed_after = time.monotonic() - started
                admitted = await on_b.call_tool("echo", {"text": "a freed slot"})
            live = await cluster_until(on_b, lambda c: c["replicas"] == 1, within=15)
            cluster = await quiescent_cluster(on_b)

    assert full["total_sessions_created"] == 2, full
    assert code_of(refused_before) == "capacity_exceeded"
    assert code_of(refused_after_kill) == "capacity_exceeded", (
        "the dead replica's slots were freed before their deadline"
    )
    assert dying == ["disconnected"]
    assert DEADLINE_SECONDS - 0.1 <= freed_after, (
        f"freed after {freed_after:.2f}s, before the {DEADLINE_SECONDS}s deadline"
    )
    assert freed["total_sessions_timeout"] == 2, freed
    assert text_of(admitted) == "a freed slot"
    assert live["replicas"] == 1, live
    assert cluster["total_sessions_created"] == 3 and cluster["total_sessions_completed"] == 1, cluster
    assert cluster["total_sessions_timeout"] == 2 and cluster["sessions_rejected_capacity"] == 2, cluster
    assert cluster["active_sessions"] == 0, cluster
    assert_cluster_accounts(cluster)


async def test_calls_fail_fast_while_redis_is_stopped_and_succeed_again_when_it_is_back(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    config = cluster_config(store_section(own_redis.url, key_prefix), limits={"max_concurrent_sessions": 10})
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        assert text_of(await on_a.call_tool("echo", {"text": "before"})) == "before"
        held = await on_a.call_tool("session_create", {"timeout_seconds": 120})
        held_id = (held.structured_content or {})["session_id"]
        held_since = time.monotonic()

        await anyio.to_thread.run_sync(own_redis.stop)
        refused = [
            await timed_call(on_a, "echo", {"text": "no store"}),
            await timed_call(on_b, "sleep_async", {"seconds": 0.01}),
            await timed_call(on_a, "session_create", {"timeout_seconds": 30}),
            await timed_call(on_b, "session_release", {"session_id": held_id}),
        ]
        (down_a, cluster_down_a), seconds_a = await timed_metrics(on_a)
        (down_b, cluster_down_b), seconds_b = await timed_metrics(on_b)

        await anyio.to_thread.run_sync(own_redis.start)  # the same port, empty
        recovered_a = await until_served(on_a, "echo", {"text": "back"})
        recovered_b = await until_served(on_b, "sleep_async", {"seconds": 0.01})
        _, cluster_back = await cluster_metrics(on_a)

        # The whole session space works again: create on A, release on B, A learns of it.
        base = (await metrics(on_a))["active_sessions"]
        created = await on_a.call_tool("session_create", {"timeout_seconds": 30})
        assert not created.is_error, created
        session_id = (created.structured_content or {})["session_id"]
        released = await on_b.call_tool("session_release", {"session_id": session_id})
        learned = "A's own active count after B released A's session (Redis restarted)"
        await local_until(on_a, lambda m: m["active_sessions"] == base, what=learned)
        again = [await on_a.call_tool("session_release", {"session_id": session_id})]
        again.append(await on_b.call_tool("session_release", {"session_id": session_id}))
        # And at once, before A could have heard of it.
        second = await on_a.call_tool("session_create", {"timeout_seconds": 30})
        second_id = (second.structured_content or {})["session_id"]
        released_second = await on_b.call_tool("session_release", {"session_id": second_id})
        again.append(await on_a.call_tool("session_release", {"session_id": second_id}))
        # `held` lived through the outage: registered again, it keeps the age it had.
        await cluster_until(on_b, lambda c: c["active_sessions"] >= 1, what="`held` registered again")
        held_for = time.monotonic() - held_since
        released_held = await on_b.call_tool("session_release", {"session_id": held_id})

    for result, seconds in refused:
        error = error_of(result)
        assert error["code"] == "store_unavailable", error
        assert seconds <= STORE_TIMEOUT_SECONDS + FAIL_FAST_MARGIN, f"{error} took {seconds:.2f}s"
    assert (
        seconds_a <= STORE_TIMEOUT_SECONDS + FAIL_FAST_MARGIN and seconds_b <= STORE_TIMEOUT_SECONDS + FAIL_FAST_MARGIN
    )
    for cluster in (cluster_down_a, cluster_down_b):
        assert cluster["available"] is False, cluster
        assert isinstance(cluster["error"], str) and cluster["error"], cluster
    assert down_a["active_sessions"] == 1, "A's own view still has the session it holds"

    assert text_of(recovered_a) == "back" and text_of(recovered_b) == "slept 0.01s"
    held_duration = (released_held.structured_content or {})["duration_seconds"]
    assert held_duration >= held_for - 0.1, f"released after {held_for:.2f}s, reported {held_duration}s"
    assert cluster_back["available"] is True and cluster_back["error"] is None, cluster_back
    assert (released.structured_content or {})["state"] == "completed", released
    assert (released_second.structured_content or {})["state"] == "completed", released_second
    assert [code_of(result) for result in again] == ["already_released"] * 3
    # Every call refused for the store is counted where it was refused: A's hosted call and
    # session_create, B's hosted call and its release of A's session.
    assert down_a["sessions_rejected_store_unavailable"] == 2, down_a
    assert down_b["sessions_rejected_store_unavailable"] == 2, down_b


async def test_a_release_through_another_replica_while_redis_recovers_empty_is_store_unavailable_not_unknown(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # Redis restarts empty while A, which made the session, is paused (it registers the session
    # again only when it runs). B cannot know the id yet: while the replicas register their
    # sessions again, that is "retry in a moment", not unknown_session (a client told that
    # would not retry, and the slot would stay held until its deadline).
    config = cluster_config(store_section(own_redis.url, key_prefix), limits={"max_concurrent_sessions": 10})
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        created = await on_a.call_tool("session_create", {"timeout_seconds": 120})
        session_id = (created.structured_content or {})["session_id"]
        a.process.send_signal(signal.SIGSTOP)
        try:
            await anyio.to_thread.run_sync(own_redis.restart)  # the same port, empty
            early = await on_b.call_tool("session_release", {"session_id": session_id})
        finally:
            a.process.send_signal(signal.SIGCONT)
        await cluster_until(on_b, lambda c: c["active_sessions"] == 1, what="A's session registered again")
        released = await on_b.call_tool("session_release", {"session_id": session_id})
        await local_until(on_a, lambda m: m["active_sessions"] == 0, what="A's own count after B released")
        local_b, _ = await cluster_metrics(on_b)

    error = error_of(early)
    assert error["code"] == "store_unavailable", error
    assert "restarted empty" in error["message"] and "was not released" in error["message"], error
    assert "retry in a moment" in error["message"].lower(), error
    assert (released.structured_content or {})["state"] == "completed", released
    assert local_b["sessions_rejected_store_unavailable"] == 1, local_b


async def test_a_restart_empty_is_logged_once_by_every_replica_even_one_that_sent_no_command_meanwhile(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # A restart empty shorter than a round trip's failure window left no "failed to ..." nor
    # "answers again" on a replica that sent nothing meanwhile, and "lost N session(s)" only on
    # one that held sessions: B logged nothing at all, though the cluster's totals had restarted.
    config = cluster_config(store_section(own_redis.url, key_prefix), limits={"max_concurrent_sessions": 10})
    lost = "lost its data (it restarted empty, or was flushed)"
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        created = await on_a.call_tool("session_create", {"timeout_seconds": 120})
        assert not created.is_error, created
        await anyio.to_thread.run_sync(own_redis.restart)  # the same port, empty
        warned = [await replica.wait_stderr(lost, within=RECOVERY_SECONDS) for replica in (a, b)]
        await a.wait_stderr("registered them again", within=RECOVERY_SECONDS)
        # Served again through both, and A's session counted: the recovery is over.
        await until_served(on_a, "echo", {"text": "back"})
        await until_served(on_b, "echo", {"text": "back"})
        await cluster_until(on_b, lambda c: c["active_sessions"] == 1, what="A's session registered again")

    for line in warned:
        assert "WARNING" in line, line
        assert f"the session store at {own_redis.url} ([store] url) {lost}" in line, line
        assert "the cluster's totals start again" in line and "admissions are held for about 2s" in line, line
    for replica in (a, b):
        assert sum(lost in line for line in replica.stderr_lines) == 1, replica.stderr
    assert "had lost 1 session(s) of this replica; registered them again" in a.stderr, a.stderr


async def test_calls_fail_fast_while_redis_hangs_and_recover_when_it_answers(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    config = cluster_config(store_section(own_redis.url, key_prefix))
    async with start_replicas(tmp_path, config, 1) as (a,), a.client() as on_a:
        assert text_of(await on_a.call_tool("echo", {"text": "before"})) == "before"

        with paused(own_redis):
            refused = [
                await timed_call(on_a, "echo", {"text": "hung store"}),
                await timed_call(on_a, "session_create", {}),
            ]
            (down, cluster_down), seconds = await timed_metrics(on_a)

        recovered = await until_served(on_a, "echo", {"text": "answering again"})
        _, cluster_back = await cluster_metrics(on_a)

    for result, elapsed in refused:
        assert code_of(result) == "store_unavailable", result
        assert elapsed <= STORE_TIMEOUT_SECONDS + FAIL_FAST_MARGIN, f"{result} took {elapsed:.2f}s"
    assert seconds <= STORE_TIMEOUT_SECONDS + FAIL_FAST_MARGIN, f"session_metrics took {seconds:.2f}s"
    assert cluster_down["available"] is False and cluster_down["error"], cluster_down
    assert down["sessions_rejected_store_unavailable"] == 2, down
    assert text_of(recovered) == "answering again"
    assert cluster_back["available"] is True, cluster_back


async def test_concurrent_calls_while_redis_hangs_are_each_refused_within_one_store_timeout(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # Calls that ask while an admission round trip is failing are refused with it, not after a
    # round trip of their own: none waits much beyond one `store.timeout_seconds`. The timeout is
    # long here so that the margins are seconds: refused with it, the slowest call takes about 3 s;
    # waiting for a round trip of its own, the call that asked 0.2 s into the first one would take
    # about 2 * 3 - 0.2 = 5.8 s.
    timeout = HUNG_STORE_TIMEOUT_SECONDS
    config = cluster_config(store_section(own_redis.url, key_prefix, timeout_seconds=timeout))
    async with start_replicas(tmp_path, config, 1) as (a,), a.client() as on_a:
        assert text_of(await on_a.call_tool("echo", {"text": "before"})) == "before"
        refused: list[tuple[CallToolResult, float]] = []

        async def call(n: int) -> None:
            refused.append(await timed_call(on_a, "echo", {"text": f"call {n}"}))

        with paused(own_redis):
            async with anyio.create_task_group() as tg:
                for n in range(6):  # one every 0.2 s: they arrive while a round trip is failing
                    tg.start_soon(call, n)
                    await anyio.sleep(0.2)

    assert [code_of(result) for result, _ in refused] == ["store_unavailable"] * 6, refused
    slowest = max(seconds for _, seconds in refused)
    assert slowest <= timeout + 1.5, f"a refusal took {slowest:.2f}s: more than one store timeout"


@pytest.mark.parametrize("away", ["stopped", "hung"])
async def test_a_sigterm_while_redis_is_down_exits_0_with_one_warning_for_the_unwritten_session_ends(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str, away: str
) -> None:
    # A session is held when Redis goes away (stopped, or hung: SIGSTOP, where the end's round
    # trip never comes back); SIGTERM's drain cancels it at its short deadline, and its end cannot
    # be written. The README's promise: a clean stop logs no error, and one warning says so.
    config = cluster_config(store_section(own_redis.url, key_prefix))
    config["shutdown"] = {"timeout_seconds": 0.2}
    async with start_replicas(tmp_path, config, 1) as (replica,):
        async with replica.client() as client:
            held = await client.call_tool("session_create", {"timeout_seconds": 60})
            assert not held.is_error, held
        if away == "stopped":
            await anyio.to_thread.run_sync(own_redis.stop)
        else:
            own_redis.pause()
        try:
            replica.send_signal(signal.SIGTERM)
            status = await replica.wait_exit(within=STOP_EXIT_SECONDS)
        finally:
            if away == "hung":
                own_redis.resume()

    assert status == 0, replica.stderr
    assert "Traceback" not in replica.stderr and " ERROR " not in replica.stderr, replica.stderr
    unwritten = [line for line in replica.stderr_lines if "could not be written" in line]
    assert len(unwritten) == 1, replica.stderr
    [line] = unwritten
    assert " WARNING server.cluster: " in line, line
    assert "1 session end(s) could not be written to the session store" in line, line
    assert own_redis.url in line, line
    # The reason is the ends', not that of leaving the cluster, which failed after them.
    assert "leave the cluster" not in line, line
    if away == "hung":  # the end was in a round trip that never came back
        assert f"did not answer within {2 * STORE_TIMEOUT_SECONDS:g}s" in line, line


@pytest.mark.parametrize("transport", ["stdio", "streamable-http-legacy"])
async def test_a_replica_stopping_past_work_that_holds_the_shutdown_off_still_leaves_the_cluster(
    tmp_path: Path, shared_store: dict[str, TomlValue], transport: str
) -> None:
    # Work that holds the drain's cancellation off (a shielded thread wait) makes the replica exit
    # without its lifespan's end (over stdio, and over HTTP with a client of the handshake era,
    # whose session the lifespan waits for). It must still write the call's end and leave the
    # replicas counted live, as a clean stop does: the others see one replica and no active
    # session at once, not only once it has been silent for 3 s.
    shutdown_seconds = 1.0
    config = cluster_config(shared_store)
    config["shutdown"] = {"timeout_seconds": shutdown_seconds}
    results: dict[str, CallToolResult] = {}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        start_server(tmp_path / "a", config, transport=transport.removesuffix("-legacy")) as a,
        start_server(tmp_path / "b", config, transport="streamable-http") as b,
        b.client() as on_b,
    ):
        on_a = a.client() if a.url is None else Client(a.url, mode="legacy", read_timeout_seconds=CALL_SECONDS)
        async with on_a:
            await cluster_until(on_b, lambda c: c["replicas"] == 2, within=10)

            async def call() -> None:
                results["held"] = await on_a.call_tool("thread_wait", {"seconds": HELD_SECONDS})

            with anyio.fail_after(shutdown_seconds + HELD_EXIT_MARGIN + 5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    await cluster_until(on_b, lambda c: c["active_sessions"] == 1)
                    a.send_signal(signal.SIGTERM)
            assert await a.wait_exit(within=shutdown_seconds + HELD_EXIT_MARGIN) == 0, a.stderr
        _, cluster = await cluster_metrics(on_b)  # read once, right away: nothing left to expire

    assert code_of(results["held"]) == "shutting_down", results["held"]
    assert "thread(s) still running" in a.stderr, a.stderr
    assert cluster["replicas"] == 1, cluster
    assert cluster["active_sessions"] == 0 and cluster["total_sessions_cancelled"] == 1, cluster
    assert_cluster_accounts(cluster)


async def test_store_unavailable_sentences_read_cleanly_with_no_stray_full_stop(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # redis-py's reasons end with a full stop; the sentence around them must not read ".;".
    config = cluster_config(store_section(own_redis.url, key_prefix))
    async with start_replicas(tmp_path, config, 1) as (replica,), replica.client() as client:
        await anyio.to_thread.run_sync(own_redis.stop)
        refused_call, _ = await timed_call(client, "echo", {"text": "no store"})
        refused_create, _ = await timed_call(client, "session_create", {})
        refused_release, _ = await timed_call(client, "session_release", {"session_id": "s000000000000-1"})
        refused_long, _ = await timed_call(client, "session_release", {"session_id": "x" * 5000})

    # Any string may be given as an id: the answer (and its log line) quotes a bounded part. One
    # of a shape no replica issues is answered without Redis: unknown, even with Redis away.
    long_error = error_of(refused_long)
    assert long_error["code"] == "unknown_session" and "x" * 81 not in long_error["message"]
    assert len(long_error["session_id"]) <= 81 and long_error["session_id"].endswith("…")
    refusals = (refused_call, refused_release, refused_create)
    messages = [error_of(result)["message"] for result in refusals]
    assert [error_of(result)["code"] for result in refusals] == ["store_unavailable"] * 3, messages
    for message in messages:
        assert ".;" not in message and ".." not in message, message
        assert "Connect call failed" in message or "connecting" in message, message
    assert "; the call was not run. The server reconnects by itself: retry in a moment" in messages[0]
    assert "; session s000000000000-1 was not released. Retry in a moment" in messages[1]
    # session_create runs no call: it is told that no session was created.
    assert "; no session was created. The server reconnects by itself: retry in a moment" in messages[2]


async def test_a_call_that_completed_while_redis_was_away_counts_as_completed_not_timeout(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # The call ends (completed) while Redis hangs; its replica keeps the end and writes it when
    # Redis answers again. By then the session is overdue by more than the grace, and whichever
    # replica runs housekeeping first expires it as `timeout`: the end written after that must
    # still count it as it ended. (Which comes first varies from run to run: the end can also
    # reach Redis before the expiry does. Either way the totals must count it as completed.)
    deadline = 1.0
    tools = {"sleep_async": {"timeout_seconds": deadline}}
    config = cluster_config(store_section(own_redis.url, key_prefix), tools=tools)
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        results: list[CallToolResult] = []
        answered = anyio.Event()

        async def call() -> None:
            results.append(await on_a.call_tool("sleep_async", {"seconds": 0.5}))
            answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await cluster_until(on_b, lambda c: c["active_sessions"] == 1, what="the call admitted")
            own_redis.pause()
            try:
                with anyio.fail_after(10):
                    await answered.wait()  # it completes on its replica with Redis hung
                # Redis comes back only once the session is overdue by more than the grace, and
                # its replica has been silent long enough to count as gone (it cannot be asked
                # meanwhile: the wait is for the clock to pass that point).
                await anyio.sleep(max(deadline + EXPIRY_GRACE_SECONDS, OWNER_LIVE_SECONDS) + 0.5)
            finally:
                own_redis.resume()
            # Expire what is overdue now, before the replica's kept end can be written.
            settings = StoreSettings.model_validate(store_section(own_redis.url, key_prefix))
            store = RedisStore(settings, "test-housekeeper")
            try:
                await store.housekeeping()
            finally:
                await store.close()
        view = await cluster_until(
            on_b, lambda c: c["total_sessions_completed"] == 1, within=10, what="the kept end written"
        )

    assert text_of(results[0]) == "slept 0.5s"
    assert (view["total_sessions_timeout"], view["active_sessions"]) == (0, 0), view
    assert_cluster_accounts(view)


@contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


async def timed_metrics(client: Client) -> tuple[tuple[dict[str, Any], dict[str, Any]], float]:
    started = time.monotonic()
    with anyio.fail_after(10):
        views = await cluster_metrics(client)
    return views, time.monotonic() - started


async def test_a_store_reply_session_metrics_cannot_read_is_an_internal_error_not_invalid_argument(
    tmp_path: Path, shared_redis_url: str, shared_store: dict[str, TomlValue], key_prefix: str
) -> None:
    async with start_replicas(tmp_path, cluster_config(shared_store), 1) as (replica,), replica.client() as client:
        await cluster_metrics(client)  # the cluster totals read fine
        # Something else writes into the service's keys: a counter that is not a number. Redis
        # answers, so it is not `store_unavailable`; reading the totals fails inside the tool.
        store = redis.Redis.from_url(shared_redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            store.hset(f"{key_prefix}counts", "created", "not a number")
        finally:
            store.close()
        with anyio.fail_after(10):
            result = await client.call_tool("session_metrics", {})
        error = error_of(result)
        assert (error["code"], error["tool"]) == ("internal_error", "session_metrics"), error
        assert "not a problem with the arguments" in error["message"]
        logged = await replica.wait_stderr("failed (internal_error)")
        assert "session_metrics" in logged
    assert sum("failed (internal_error)" in line for line in replica.stderr_lines) == 1, replica.stderr
    assert "(invalid_argument)" not in replica.stderr, replica.stderr


async def test_a_store_error_redis_answers_is_store_unavailable_without_the_promise_that_a_retry_cures_it(
    tmp_path: Path, shared_redis_url: str, shared_store: dict[str, TomlValue], key_prefix: str
) -> None:
    # Redis answers with an error (here WRONGTYPE: another program keeps a string where the
    # service keeps its counters; likewise out of memory, a read-only replica after a failover,
    # missing ACL rights). The call is refused `store_unavailable`, as the contract says, but the
    # caller is not told that the server reconnects and a retry in a moment will do.
    async with start_replicas(tmp_path, cluster_config(shared_store), 1) as (replica,), replica.client() as client:
        store = redis.Redis.from_url(shared_redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            store.delete(f"{key_prefix}counts")
            store.set(f"{key_prefix}counts", "not a hash")
        finally:
            store.close()
        with anyio.fail_after(10):
            refused = await client.call_tool("echo", {"text": "x"})
            created = await client.call_tool("session_create", {})
    for result in (refused, created):
        error = error_of(result)
        assert error["code"] == "store_unavailable", error
        assert "refused to admit a session" in error["message"] and "WRONGTYPE" in error["message"], error
        assert "retrying will not cure" in error["message"] and "reconnects" not in error["message"], error


@contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@contextmanager
def nothing_listening() -> Iterator[int]:
    yield free_port()


async def test_a_killed_replica_with_queued_calls_is_no_longer_told_of_freed_slots(
    tmp_path: Path, shared_redis_url: str, shared_store: dict[str, TomlValue], key_prefix: str
) -> None:
    # A replica that dies with calls queued leaves its count of them in Redis; while that count is
    # there, every freed slot anywhere is published to every replica. The live ones forget it once
    # the dead one has been silent for 5 s (and not before).
    limits: dict[str, TomlValue] = {"max_concurrent_sessions": 1, "max_queued": 5, "queue_timeout_seconds": 60}
    config = cluster_config(shared_store, limits=limits)
    store = aioredis.Redis.from_url(shared_redis_url, socket_connect_timeout=5, socket_timeout=5)
    waiting = f"{key_prefix}waiting"
    outcome: list[str] = []

    async def queued_until_its_replica_dies(a: ServerProcess) -> None:
        try:
            async with a.client() as on_a:
                outcome.append(f"answered: {await on_a.call_tool('echo', {'text': 'queued'})}")
        except* httpx2.TransportError:
            outcome.append("disconnected")

    try:
        async with start_replicas(tmp_path, config, 2) as (a, b), b.client() as on_b:
            async with a.client() as on_a:
                held = await on_a.call_tool("session_create", {"timeout_seconds": 60})
                assert not held.is_error, held
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(queued_until_its_replica_dies, a)
                    with anyio.fail_after(5):  # each turn a round trip to Redis
                        while not await store.hlen(waiting):
                            pass
                    a.process.kill()
                    await a.process.wait()
                    killed = time.monotonic()
                    with anyio.fail_after(REPLICA_LIVE_SECONDS + SLACK_SECONDS):
                        while await store.hlen(waiting):
                            pass
                    forgotten_after = time.monotonic() - killed
            session_id = (held.structured_content or {})["session_id"]
            released = await on_b.call_tool("session_release", {"session_id": session_id})
    finally:
        await store.aclose()
    assert outcome == ["disconnected"], outcome
    # A reported at most a second before it was killed; B forgets it 5 s after that report.
    assert forgotten_after >= REPLICA_LIVE_SECONDS - 1.5, forgotten_after
    assert not released.is_error, released


@pytest.mark.parametrize(
    ("transport", "rules", "refusal"),
    [
        ("streamable-http", "-@scripting", "NoPermissionError"),  # no EVAL, EVALSHA
        ("stdio", "-@write", "can't run this command"),  # scripts, but no writes
    ],
)
async def test_startup_with_a_redis_that_answers_but_refuses_scripts_or_writes_exits_2_saying_why(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str, transport: str, rules: str, refusal: str
) -> None:
    # A Redis that answers PING but refuses what the store does (an ACL user without scripting or
    # writes; a read-only replica likewise) is a config problem at start, as an unreachable one is:
    # exit 2 with one line, not a traceback from the first store call once the server had started.
    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.acl_setuser("limited", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", rules])
    finally:
        admin.close()
    url = f"redis://limited:secret@127.0.0.1:{own_redis.port}/0"
    config = cluster_config(store_section(url, key_prefix))
    async with start_server(tmp_path, config, transport=transport, wait_ready=False) as server:
        status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    assert line.startswith("mcp-session-manager: cannot use the session store at redis://limited:***@"), line
    assert "([store] url)" in line and refusal in line and repr(key_prefix) in line, line
    assert "secret" not in server.stderr and "Traceback" not in server.stderr, server.stderr
    assert "Serving" not in server.stderr, "nothing may be served"


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "noeviction"])
async def test_a_replica_starting_on_a_redis_that_may_evict_keys_warns_naming_the_policy(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str, policy: str
) -> None:
    # An evicted session hash (allkeys-lru took one; volatile-* would take exactly those: they
    # carry a TTL) is never finished: its tool's and client's counts stay taken for good. The
    # policy is read from INFO (CONFIG may be disabled on a managed Redis); a warning, not a refusal.
    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.config_set("maxmemory-policy", policy)
    finally:
        admin.close()
    config = cluster_config(store_section(own_redis.url, key_prefix))
    async with start_server(tmp_path, config, transport="streamable-http") as server, server.client() as client:
        served = await client.call_tool("echo", {"text": "served"})
        serving = await server.wait_stderr("Serving MCP over streamable HTTP")

    assert text_of(served) == "served"
    warnings = [line for line in server.stderr_lines if "maxmemory-policy" in line]
    if policy == "noeviction":
        assert not warnings, server.stderr
        return
    [warning] = warnings
    assert "WARNING" in warning and f"(maxmemory-policy {policy})" in warning, warning
    assert f"the session store at {own_redis.url} ([store] url) may evict keys" in warning, warning
    assert "set maxmemory-policy noeviction" in warning, warning
    assert server.stderr_lines.index(warning) < server.stderr_lines.index(serving), "said before serving"


async def test_startup_with_a_database_number_redis_lacks_exits_2_saying_the_number_is_wrong(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # Redis answers (it is reachable) and refuses the database: "cannot reach" would send the
    # operator after the network; the sentence names the part of the URL to fix.
    url = f"redis://127.0.0.1:{own_redis.port}/99"
    config = cluster_config(store_section(url, key_prefix))
    async with start_server(tmp_path, config, transport="streamable-http", wait_ready=False) as server:
        status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    assert line.startswith(f"mcp-session-manager: cannot use the session store at {url} ([store] url): "), line
    assert "DB index is out of range" in line, line
    assert line.rstrip().endswith("0 up to its `databases` setting (16 by default) minus 1"), line


@pytest.mark.parametrize(
    ("transport", "login", "advice"),
    [
        ("stdio", "", "Redis asks for a password and [store] url gives none: write it into the URL"),
        ("streamable-http", ":wrong@", "check the user name and password in [store] url"),
    ],
    ids=["no-password", "wrong-password"],
)
async def test_startup_with_a_redis_that_refuses_the_login_exits_2_saying_where_the_password_goes(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str, transport: str, login: str, advice: str
) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.config_set("requirepass", "s3cret")  # the default user now needs it
    finally:
        admin.close()
    url = f"redis://{login}127.0.0.1:{own_redis.port}/0"
    config = cluster_config(store_section(url, key_prefix))
    async with start_server(tmp_path, config, transport=transport, wait_ready=False) as server:
        status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    shown = url.replace(":wrong@", ":***@")
    assert line.startswith(f"mcp-session-manager: cannot log in to the session store at {shown} ([store] url): "), line
    assert "AuthenticationError" in line and advice in line, line
    assert "wrong" not in server.stderr and "Traceback" not in server.stderr, server.stderr
    assert "Serving" not in server.stderr, "nothing may be served"


@contextmanager
def tls_only_redis(directory: Path) -> Iterator[int]:
    """A redis-server that speaks only TLS (a self-signed certificate) on a free loopback port."""
    cert, key = pem_pair(directory)
    port = free_port()
    command = [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", HOST, "--save", ""]
    command += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no"]
    process = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not ping(f"rediss://{HOST}:{port}/0?ssl_cert_reqs=none", timeout=0.5):
            assert process.poll() is None, f"redis-server with TLS exited with status {process.returncode}"
            assert time.monotonic() < deadline, "redis-server with TLS did not answer PING in 10s"
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


async def test_startup_with_rediss_at_a_redis_without_tls_exits_2_saying_the_port_may_not_speak_tls(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # A plain Redis waits for the end of a line the TLS greeting never sends: redis-py's
    # "Timeout connecting to server" alone sent the operator after the network.
    url = f"rediss://:s3cret@127.0.0.1:{own_redis.port}/0"
    config = cluster_config(store_section(url, key_prefix))
    async with start_server(tmp_path, config, transport="streamable-http", wait_ready=False) as server:
        status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    assert line.startswith("mcp-session-manager: cannot reach the session store at rediss://:***@"), line
    assert line.rstrip().endswith(
        "; that port may not speak TLS (rediss:// is TLS: a Redis without TLS there needs redis://)"
    ), line
    assert "s3cret" not in server.stderr and "Traceback" not in server.stderr, server.stderr


async def test_startup_with_redis_at_a_tls_only_redis_exits_2_saying_the_port_may_speak_only_tls(
    tmp_path: Path, key_prefix: str
) -> None:
    with tls_only_redis(tmp_path) as port:
        url = f"redis://127.0.0.1:{port}/0"
        config = cluster_config(store_section(url, key_prefix))
        async with start_server(tmp_path, config, transport="streamable-http", wait_ready=False) as server:
            status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    assert line.startswith(f"mcp-session-manager: cannot reach the session store at {url} ([store] url): "), line
    assert line.rstrip().endswith(
        "; that port may speak only TLS (redis:// is plain text: a Redis with TLS there needs rediss://)"
    ), line


async def test_startup_with_nothing_listening_has_no_tls_hint(tmp_path: Path, key_prefix: str) -> None:
    url = f"rediss://127.0.0.1:{free_port()}/0"
    config = cluster_config(store_section(url, key_prefix))
    async with start_server(tmp_path, config, transport="streamable-http", wait_ready=False) as server:
        status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)

    assert status == 2, server.stderr
    [line] = [line for line in server.stderr_lines if "session store" in line]
    assert "Connection refused" in line and "TLS" not in line, line


@pytest.mark.parametrize("redis_side", [nothing_listening, silent_listener], ids=["refused", "silent"])
async def test_startup_with_redis_unreachable_exits_2_naming_the_store_url(
    tmp_path: Path, key_prefix: str, redis_side: Any
) -> None:
    with redis_side() as port:
        url = f"redis://127.0.0.1:{port}/0"
        config = cluster_config(store_section(url, key_prefix))
        started = time.monotonic()
        async with start_server(tmp_path, config, transport="streamable-http", wait_ready=False) as server:
            status = await server.wait_exit(within=STARTUP_EXIT_SECONDS)
        elapsed = time.monotonic() - started

    assert status == 2, server.stderr
    lines = [line for line in server.stderr_lines if url in line or f"127.0.0.1:{port}" in line]
    assert lines, f"no line names the store url {url}:\n{server.stderr}"
    reasons = ("refused", "connect", "timed out", "timeout", "unreachable", "answer")
    assert any(reason in line.lower() for line in lines for reason in reasons), f"no reason given:\n{server.stderr}"
    assert any(key in server.stderr for key in ERROR_KEYS), f"the error does not name [store] url:\n{server.stderr}"
    assert "Traceback" not in server.stderr, server.stderr
    assert "/mcp" not in server.stderr and "Serving" not in server.stderr, "nothing may be served"
    assert elapsed < STARTUP_EXIT_SECONDS, elapsed


#: The value size of the keys that fill a Redis to its maxmemory, and the most of them written.
FILLER_BYTES = 10_000
FILLER_KEYS = 1_000


def fill_to_maxmemory(url: str, namespace: str, headroom: int) -> list[str]:
    """Give the Redis at `url` a maxmemory `headroom` bytes above what it uses (noeviction), then
    write keys under `namespace` until it refuses one (bounded), and lower its maxmemory to half
    the headroom below what it uses then: it stays full while a few keys come and go, until the
    keys written (returned) are deleted."""
    admin = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + headroom)
        keys: list[str] = []
        for n in range(FILLER_KEYS):
            try:
                admin.set(f"{namespace}filler:{n}", "x" * FILLER_BYTES)
            except redis.exceptions.OutOfMemoryError:
                admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - headroom // 2)
                return keys
            keys.append(f"{namespace}filler:{n}")
        raise AssertionError(f"Redis took {FILLER_KEYS} keys of {FILLER_BYTES} bytes past its maxmemory")
    finally:
        admin.close()


async def test_a_full_redis_with_noeviction_admits_no_session_and_still_writes_the_ends_of_running_ones(
    tmp_path: Path, own_redis: RedisServer, namespace: str, key_prefix: str
) -> None:
    # A Redis at maxmemory refuses a script's first write that may take memory, and lets every
    # write after any other through: an admission whose round trip began with another write
    # (the count of queued calls) was registered past the limit. Now every new or queued call is
    # refused store_unavailable (OOM), no session is registered, and the ends of running calls
    # (which free memory) are written all the same, also by a replica with calls queued.
    limits: dict[str, TomlValue] = {"max_concurrent_sessions": 2, "max_queued": 5, "queue_timeout_seconds": 60}
    tools: dict[str, dict[str, TomlValue]] = {"hang_async": {"timeout_seconds": DEADLINE_SECONDS + 1}}
    config = cluster_config(store_section(own_redis.url, key_prefix), limits=limits, tools=tools)
    store = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=5, socket_timeout=5)
    queued: list[CallToolResult] = []
    try:
        async with start_replicas(tmp_path, config, 1) as (replica,), replica.client() as client:
            held = await client.call_tool("session_create", {"timeout_seconds": 60})
            assert not held.is_error, held
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.call_tool, "hang_async", {})  # ends at its deadline, as timeout
                    await cluster_until(client, lambda c: c["active_sessions"] == 2)

                    async def queue_one() -> None:
                        queued.append(await client.call_tool("echo", {"text": "queued"}))

                    tg.start_soon(queue_one)
                    await local_until(client, lambda m: m["queued_sessions"] == 1)
                    filler = fill_to_maxmemory(own_redis.url, namespace, headroom=200_000)
                    sessions_before = len([key async for key in store.scan_iter(match=f"{key_prefix}s:*")])
                    refused = [await client.call_tool("echo", {"text": "x"}) for _ in range(20)]
                    refused.append(await client.call_tool("session_create", {}))
            # The queued call, refused when hang_async's end (written while full) freed its slot.
            cluster = await cluster_until(client, lambda c: c["active_sessions"] == 1)
            sessions_after = len([key async for key in store.scan_iter(match=f"{key_prefix}s:*")])
            await store.delete(*filler)
            served = await until_served(client, "echo", {"text": "back"})
            await replica.wait_stderr("has room again")
    finally:
        await store.aclose()
    for result in [*refused, *queued]:
        error = error_of(result)
        assert error["code"] == "store_unavailable", error
        assert "refused to admit a session" in error["message"] and "OOM" in error["message"], error
        assert "retrying will not cure" in error["message"], error
    assert len(queued) == 1
    assert sessions_after == sessions_before, "sessions were registered past maxmemory"
    assert cluster["total_sessions_timeout"] == 1 and cluster["total_sessions_created"] == 2, cluster
    assert text_of(served) == "back"
    [warning] = [line for line in replica.stderr_lines if "until it has room again" in line]
    assert "WARNING" in warning and "OOM" in warning, warning


async def test_a_call_refused_while_redis_hangs_whose_admission_runs_late_counts_in_no_cluster_total(
    tmp_path: Path, own_redis: RedisServer, key_prefix: str
) -> None:
    # The admission of a call refused store_unavailable (Redis hung past the store's timeout) is
    # still in Redis's input, and runs once Redis answers again; the replica then gives the slot
    # back. That session was never opened: the cluster totals counted it created and cancelled,
    # while the replica counted a refusal. Now it is taken back out of `created`.
    config = cluster_config(store_section(own_redis.url, key_prefix))
    store = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=5, socket_timeout=5)
    try:
        async with start_replicas(tmp_path, config, 1) as (a,), a.client() as on_a:
            assert text_of(await on_a.call_tool("echo", {"text": "before"})) == "before"
            with paused(own_redis):
                refused, _ = await timed_call(on_a, "echo", {"text": "hung store"})
            # Redis runs the late admission first (it was in its input), then the withdrawal.
            with anyio.fail_after(10):  # each turn a round trip to Redis
                while True:
                    keys = [key async for key in store.scan_iter(match=f"{key_prefix}s:*")]
                    states = [await store.hget(key, "state") for key in keys]
                    if len(keys) == 2 and b"active" not in states:
                        break
            local, cluster = await cluster_metrics(on_a)
    finally:
        await store.aclose()
    assert code_of(refused) == "store_unavailable", refused
    assert local["sessions_rejected_store_unavailable"] == 1, local
    assert states == [b"cancelled", b"completed"] or states == [b"completed", b"cancelled"], states
    assert (local["total_sessions_created"], cluster["total_sessions_created"]) == (1, 1), cluster
    assert (local["total_sessions_cancelled"], cluster["total_sessions_cancelled"]) == (0, 0), cluster
    assert_cluster_accounts(cluster)
