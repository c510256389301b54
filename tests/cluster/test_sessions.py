"""One session space across replicas: create on one, release on another, and the metrics that
show both this replica's view and the cluster's.
"""

from __future__ import annotations

from pathlib import Path

from tests.cluster.conftest import (
    assert_cluster_accounts,
    cluster_config,
    cluster_metrics,
    cluster_until,
    local_until,
    quiescent_cluster,
    start_replicas,
    store_section,
)
from tests.e2e.conftest import TomlValue, metrics, server_config, start_server
from tests.e2e.test_operations import base_of, counter, scrape
from tests.helpers import code_of, error_of, text_of

#: How long replica A may take to learn (through Redis pub/sub) that B released its session.
LEARN_SECONDS = 5.0
MADE_UP_ID = "s000000000000-999999"
METADATA = {"note": "x"}
#: Compact UTF-8 JSON: `{"note":"x"}`.
METADATA_BYTES = 12


async def test_a_session_created_on_one_replica_is_released_on_another(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    config = cluster_config(shared_store, limits={"max_concurrent_sessions": 10})
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        created = await on_a.call_tool(
            "session_create", {"provider": "acme", "timeout_seconds": 60, "metadata": METADATA}
        )
        assert not created.is_error, created
        session_id = (created.structured_content or {})["session_id"]
        local_a, cluster = await cluster_metrics(on_a)
        assert local_a["active_sessions"] == 1 and cluster["active_sessions"] == 1, (local_a, cluster)
        assert local_a["current_metadata_bytes"] == cluster["current_metadata_bytes"] == METADATA_BYTES, cluster
        assert (await metrics(on_b))["active_sessions"] == 0  # B's own view: the session is A's

        released = await on_b.call_tool("session_release", {"session_id": session_id})
        again_on_a = await on_a.call_tool("session_release", {"session_id": session_id})
        again_on_b = await on_b.call_tool("session_release", {"session_id": session_id})
        unknown_on_a = await on_a.call_tool("session_release", {"session_id": MADE_UP_ID})
        unknown_on_b = await on_b.call_tool("session_release", {"session_id": MADE_UP_ID})

        # A learns of the release without being asked to release anything.
        learned = "A's own active count after B released A's session"
        local_a = await local_until(on_a, lambda m: m["active_sessions"] == 0, within=LEARN_SECONDS, what=learned)
        cluster = await quiescent_cluster(on_b)

    assert not released.is_error, released
    result = released.structured_content or {}
    assert result["session_id"] == session_id and result["state"] == "completed", result
    assert result["duration_seconds"] >= 0, result
    for again in (again_on_a, again_on_b):
        error = error_of(again)
        assert error["code"] == "already_released" and error["session_id"] == session_id, error
    assert code_of(unknown_on_a) == "unknown_session" and code_of(unknown_on_b) == "unknown_session"
    assert local_a["total_sessions_created"] == 1, local_a
    assert cluster["active_sessions"] == 0 and cluster["total_sessions_completed"] == 1, cluster
    assert cluster["total_sessions_created"] == 1 and cluster["current_metadata_bytes"] == 0, cluster
    assert local_a["current_metadata_bytes"] == 0, local_a
    assert_cluster_accounts(cluster)


async def test_an_unknown_session_in_cluster_mode_is_worded_for_the_whole_cluster(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    async with start_replicas(tmp_path, cluster_config(shared_store), 1) as (replica,), replica.client() as client:
        unknown = await client.call_tool("session_release", {"session_id": MADE_UP_ID})

    error = error_of(unknown)
    assert error["code"] == "unknown_session" and error["session_id"] == MADE_UP_ID, error
    # The check covers every replica sharing the store, and ended sessions for an hour.
    assert "this server" not in error["message"], error
    assert error["message"] == (
        f"no replica sharing the session store issued a session with id {MADE_UP_ID!r} in the last hour; "
        "use the session_id that session_create returned"
    ), error


async def test_a_released_id_no_replica_could_issue_never_reaches_redis(
    tmp_path: Path, shared_redis_url: str, shared_store: dict[str, TomlValue], namespace: str
) -> None:
    # Two services on one Redis whose prefixes overlap (README: they must not): the session key
    # of an id is the prefix, "s:" and the id, so "s:<id>" through the first named the second
    # service's session (and released it), and "epoch" one of the first's own keys (WRONGTYPE:
    # store_unavailable, the operator's error, at a client's will).
    first = cluster_config(store_section(shared_redis_url, f"{namespace}svc:"))
    second = cluster_config(store_section(shared_redis_url, f"{namespace}svc:s:"))
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    async with (
        start_replicas(tmp_path / "first", first, 1) as (x,),
        start_replicas(tmp_path / "second", second, 1) as (y,),
        x.client() as on_x,
        y.client() as on_y,
    ):
        created = await on_y.call_tool("session_create", {"timeout_seconds": 60})
        assert not created.is_error, created
        theirs = (created.structured_content or {})["session_id"]
        named = ["epoch", "active", "counts", "replicas", f"s:{theirs}", f"{theirs} ", theirs.upper()]
        refused = [await on_x.call_tool("session_release", {"session_id": name}) for name in named]
        still_theirs = await on_y.call_tool("session_release", {"session_id": theirs})
        served = await on_x.call_tool("echo", {"text": "still served"})
        local_x = await metrics(on_x)

    for name, result in zip(named, refused, strict=True):
        error = error_of(result)
        assert error["code"] == "unknown_session", (name, error)
        assert error["message"].startswith("no replica sharing the session store issued a session with id"), error
    assert not still_theirs.is_error and (still_theirs.structured_content or {})["state"] == "completed", still_theirs
    assert text_of(served) == "still served"
    assert local_x["sessions_rejected_store_unavailable"] == 0, local_x


async def test_a_release_on_another_replica_keeps_its_outcome(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    config = cluster_config(shared_store)
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        created = await on_a.call_tool("session_create", {"timeout_seconds": 60})
        session_id = (created.structured_content or {})["session_id"]
        released = await on_b.call_tool(
            "session_release", {"session_id": session_id, "outcome": "error", "error": "model refused"}
        )
        await local_until(on_a, lambda m: m["active_sessions"] == 0, within=LEARN_SECONDS)
        cluster = await quiescent_cluster(on_a)

    assert (released.structured_content or {})["state"] == "error", released
    assert cluster["total_sessions_error"] == 1 and cluster["total_sessions_completed"] == 0, cluster
    assert_cluster_accounts(cluster)


async def test_the_cluster_section_names_the_replica_and_counts_the_live_ones(
    tmp_path: Path, shared_store: dict[str, TomlValue]
) -> None:
    config = cluster_config(shared_store)
    async with start_replicas(tmp_path, config, 3) as replicas:
        views = []
        for replica in replicas:
            async with replica.client() as client:
                views.append(await cluster_until(client, lambda c: c["replicas"] == 3, within=10))

    ids = [view["replica"] for view in views]
    assert all(isinstance(replica_id, str) and replica_id for replica_id in ids), ids
    assert len(set(ids)) == 3, f"each replica must have its own id: {ids}"
    for view in views:
        assert view["backend"] == "redis" and view["available"] is True and view["error"] is None, view
        assert view["active_sessions"] == 0 and view["total_sessions_created"] == 0, view
        assert all(tool["active"] == 0 for tool in view["tools"].values()), view  # idle tools: 0 or absent


async def test_prometheus_metrics_stay_per_replica(tmp_path: Path, shared_store: dict[str, TomlValue]) -> None:
    config = cluster_config(shared_store)
    async with start_replicas(tmp_path, config, 2) as (a, b), a.client() as on_a, b.client() as on_b:
        for text in ("1", "2", "3"):
            assert text_of(await on_a.call_tool("echo", {"text": text})) == text
        assert text_of(await on_b.call_tool("echo", {"text": "4"})) == "4"
        created = await on_a.call_tool("session_create", {})
        session_id = (created.structured_content or {})["session_id"]
        assert not (await on_b.call_tool("session_release", {"session_id": session_id})).is_error
        await local_until(on_a, lambda m: m["active_sessions"] == 0, within=LEARN_SECONDS)
        local_a, local_b = await metrics(on_a), await metrics(on_b)
        cluster = await quiescent_cluster(on_a)
        scraped_a, scraped_b = await scrape(base_of(a)), await scrape(base_of(b))

    assert counter(scraped_a, "created") == local_a["total_sessions_created"] == 4
    assert counter(scraped_b, "created") == local_b["total_sessions_created"] == 1
    assert cluster["total_sessions_created"] == 5, cluster
    for scraped in (scraped_a, scraped_b):
        assert not [name for name in scraped if "cluster" in name], sorted(scraped)


async def test_the_memory_backend_reports_no_cluster(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server, server.client() as c:
        snapshot = await metrics(c)

    assert "cluster" in snapshot and snapshot["cluster"] is None, snapshot
