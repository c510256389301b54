"""A real Redis for the cluster-mode tests, and replicas of the standalone server sharing it.

Redis: `RedisServer` runs `redis-server` (found on PATH; `make redis` installs it) on a free
loopback port with no persistence, in a temporary directory, and waits (bounded) until it
answers PING. `stop()`, `start()` and `restart()` (the same port) let a test take it away
mid-test, `pause()`/`resume()` (SIGSTOP/SIGCONT) make it stop answering without closing a
connection. Tests that only need a Redis use `shared_redis_url`: the server named by
`MCP_TEST_REDIS_URL` (`.ci/run` starts one) or else one started for the whole test session.
Tests that stop Redis always start their own (`own_redis`). Every test gets its own
`key_prefix`, so tests sharing a Redis never see each other's sessions or counters; the
shared server's keys under it are deleted when the test ends.

Replicas: `start_replicas(...)` runs N standalone servers over streamable HTTP on loopback with
the same `[store]` section, hosting the e2e tools and `tests.fixtures.cluster_tools`; every
process is killed when the block ends (see `tests.e2e.conftest.start_server`).

A missing `redis-server` fails the test with the fix (`make redis`): it is never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import redis
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.conftest import (
    CALL_SECONDS,
    TOOL_MODULE,
    ServerProcess,
    TomlValue,
    free_port,
    metrics,
    server_config,
    start_server,
)

REDIS_URL_ENV = "MCP_TEST_REDIS_URL"
CLUSTER_TOOLS = "tests.fixtures.cluster_tools"
#: How long a fresh redis-server may take to answer PING.
REDIS_READY_SECONDS = 10.0
#: How long a stopped redis-server may take to exit before it is killed.
REDIS_STOP_SECONDS = 10.0
#: `[store] timeout_seconds` in the tests: short, so a dead Redis is noticed quickly.
STORE_TIMEOUT_SECONDS = 0.5


def redis_server_binary() -> str:
    """The path of `redis-server`, or a test failure naming the fix."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the cluster-mode tests run a real Redis. "
            "Run `make redis` (it installs Debian's redis-server package). "
            f"{REDIS_URL_ENV} alone is not enough: the tests that stop and restart Redis start their own.",
            pytrace=False,
        )
    return path


def ping(url: str, timeout: float = 1.0) -> bool:
    """Whether the Redis at `url` answers PING within `timeout` seconds."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def pem_pair(folder: Path, password: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its private key (encrypted with `password` if given), by openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    secret = ["-passout", f"pass:{password}"] if password else ["-noenc"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=localhost", *secret],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


class RedisServer:
    """One `redis-server` process on 127.0.0.1:`port`, no persistence, logging to `directory`."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start it on its port and return once it answers PING (bounded)."""
        assert self.process is None, "already running"
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
        ]
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + REDIS_READY_SECONDS
        while not ping(self.url, timeout=0.5):
            # The wait between two PINGs is a wait for the process to exit: an early exit
            # (the port taken, a bad flag) is reported at once instead of after the bound.
            try:
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    self.stop()
                    reason = f"did not answer PING on port {self.port} within {REDIS_READY_SECONDS}s"
                    raise AssertionError(f"redis-server {reason}:\n{self.log}") from None
                continue
            self.process = None
            raise AssertionError(f"redis-server exited with status {code} on port {self.port}:\n{self.log}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after a bound) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=REDIS_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=REDIS_STOP_SECONDS)

    def restart(self) -> None:
        """Stop it and start it again on the same port (empty: nothing is persisted)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        assert self.process is not None, "not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None, "not running"
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis every test may share (each under its own key prefix): `MCP_TEST_REDIS_URL`, or
    one started for the session."""
    url = os.environ.get(REDIS_URL_ENV, "")
    if url:
        if not ping(url, timeout=REDIS_READY_SECONDS):
            pytest.fail(f"{REDIS_URL_ENV}={url} does not answer PING", pytrace=False)
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis for this test alone, which it may stop, restart and pause."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    """This test's own corner of a Redis, `mcp-test-<uuid>:`: the servers' `key_prefix` and the
    test's own keys (`observer_key`) both start with it."""
    return f"mcp-test-{uuid.uuid4().hex[:16]}:"


@pytest.fixture
def key_prefix(namespace: str) -> str:
    """The `[store] key_prefix` of this test's replicas."""
    return f"{namespace}sessions:"


@pytest.fixture
def observer_key(namespace: str) -> str:
    """Where this test's observer tools (`tests.fixtures.cluster_tools`) count, outside the servers' keys."""
    return f"{namespace}observer"


@pytest.fixture
def shared_store(shared_redis_url: str, namespace: str, key_prefix: str) -> Iterator[dict[str, TomlValue]]:
    """The `[store]` section for replicas sharing the shared Redis under this test's prefix; the
    test's keys are deleted afterwards."""
    yield store_section(shared_redis_url, key_prefix)
    client = redis.Redis.from_url(shared_redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def store_section(url: str, key_prefix: str, timeout_seconds: float = STORE_TIMEOUT_SECONDS) -> dict[str, TomlValue]:
    return {"backend": "redis", "url": url, "key_prefix": key_prefix, "timeout_seconds": timeout_seconds}


def cluster_config(
    store: Mapping[str, TomlValue],
    *,
    limits: Mapping[str, TomlValue] | None = None,
    tools: Mapping[str, Mapping[str, TomlValue]] | None = None,
) -> dict[str, Any]:
    """`server_config(...)` with the cluster tools hosted too and the given `[store]` section."""
    config = server_config(limits=limits, tools=tools)
    config["server"] = {**config["server"], "tool_modules": [TOOL_MODULE, CLUSTER_TOOLS]}
    config["store"] = dict(store)
    return config


@asynccontextmanager
async def start_replicas(
    directory: Path, config: Mapping[str, Any], count: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[list[ServerProcess]]:
    """`count` replicas over streamable HTTP with the same config; all killed when the block ends."""
    async with AsyncExitStack() as stack:
        replicas: list[ServerProcess] = []
        for n in range(count):
            replica_dir = directory / f"replica-{n}"
            replica_dir.mkdir()
            replicas.append(
                await stack.enter_async_context(start_server(replica_dir, config, transport="streamable-http", env=env))
            )
        yield replicas


@asynccontextmanager
async def client_with_credential(replica: ServerProcess, token: str) -> AsyncIterator[Client]:
    """An SDK client of `replica` sending `Authorization: Bearer <token>` with every request: in
    the stateless protocol era the credential is what makes calls through different replicas
    one client (`limits.max_sessions_per_client`)."""
    assert replica.url is not None, "not an HTTP server"
    timeout = httpx2.Timeout(CALL_SECONDS, read=300.0)
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http,
        Client(streamable_http_client(replica.url, http_client=http), read_timeout_seconds=CALL_SECONDS) as client,
    ):
        yield client


def cluster_of(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The `cluster` object of a `session_metrics` snapshot (asserting it is one)."""
    cluster = snapshot.get("cluster")
    assert isinstance(cluster, dict), f"expected a cluster object in session_metrics, got {cluster!r}"
    return cluster


ENDED = ("completed", "error", "timeout", "cancelled")


def tool_active(cluster: Mapping[str, Any], tool: str) -> int:
    """`cluster.tools[tool].active`; a tool with no entry has none active (idle tools may be left out)."""
    entry = cluster["tools"].get(tool, {"active": 0})
    active: int = entry["active"]
    return active


def assert_cluster_accounts(cluster: Mapping[str, Any]) -> None:
    """The cluster invariant at a quiescent moment: created == active + every ended state."""
    accounted = cluster["active_sessions"] + sum(cluster[f"total_sessions_{state}"] for state in ENDED)
    assert cluster["total_sessions_created"] == accounted, f"cluster totals do not add up: {cluster}"


async def cluster_metrics(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """`session_metrics` (its local invariant checked): (the local snapshot, its cluster object)."""
    snapshot = await metrics(client)
    return snapshot, cluster_of(snapshot)


async def cluster_until(
    client: Client, predicate: Callable[[dict[str, Any]], bool], within: float = 5.0, what: str = "the cluster view"
) -> dict[str, Any]:
    """Ask `session_metrics` until `predicate(cluster)` holds; each ask is a round trip; bounded."""
    last: dict[str, Any] = {}
    try:
        with anyio.fail_after(within):
            while True:
                _, last = await cluster_metrics(client)
                if predicate(last):
                    return last
    except TimeoutError:
        raise AssertionError(f"{what} did not reach the expected state within {within}s: {last}") from None


async def quiescent_cluster(client: Client, within: float = 5.0) -> dict[str, Any]:
    """The cluster view once no session is active anywhere (bounded), its totals checked to add up.

    A replica may report a session's end to Redis a moment after answering the call, so the
    cluster totals are read at a quiescent moment rather than right after the last answer."""
    cluster = await cluster_until(client, lambda c: c["active_sessions"] == 0, within=within)
    assert_cluster_accounts(cluster)
    return cluster


async def local_until(
    client: Client, predicate: Callable[[dict[str, Any]], bool], within: float = 5.0, what: str = "the local view"
) -> dict[str, Any]:
    """Ask `session_metrics` until `predicate(local snapshot)` holds; bounded, with the last view on failure."""
    last: dict[str, Any] = {}
    try:
        with anyio.fail_after(within):
            while True:
                last = await metrics(client)
                if predicate(last):
                    return last
    except TimeoutError:
        raise AssertionError(f"{what} did not reach the expected state within {within}s: {last}") from None


async def stored_text(url: str, namespace: str) -> list[str]:
    """Everything the Redis at `url` holds under `namespace`, as text: each key's name, and its
    value, hash fields and values, set, sorted-set or list members, or stream entries."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    items: list[Any] = []
    try:
        async for key in client.scan_iter(match=f"{namespace}*", count=1000):
            items.append(key)
            kind = await client.type(key)
            if kind == b"string":
                items.append(await client.get(key))
            elif kind == b"hash":
                for field, value in (await client.hgetall(key)).items():
                    items += [field, value]
            elif kind == b"set":
                items += await client.smembers(key)
            elif kind == b"zset":
                items += await client.zrange(key, 0, -1)
            elif kind == b"list":
                items += await client.lrange(key, 0, -1)
            elif kind == b"stream":
                for entry_id, fields in await client.xrange(key) or []:
                    items.append(entry_id)
                    for field, value in (fields or {}).items():
                        items += [field, value]
            else:
                raise AssertionError(f"a key of a type the scan cannot read: {key!r} ({kind!r})")
    finally:
        await client.aclose()
    return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in items]
