"""Figure 6: what cluster mode (`[store] backend = "redis"`) adds to a tool call.

Three servers with a no-op async tool behind in-memory `Client`s, all open at once: the bare
SDK, `SessionsExtension` on the memory backend, and `SessionsExtension` on a real Redis on
loopback. Blocks of calls rotate through all six orders, as in `overhead`; each figure is
the median of per-round ratios (or per-round added microseconds) with its spread. Each call
in cluster mode costs one Redis round trip on admission (the release is written by a
background task, in batches), so the figures are about that round trip and what it does to
throughput when 50 callers share one process.

Redis: `MCP_BENCH_REDIS_URL` if set, else a `redis-server` from PATH started on a free
loopback port for the run (no persistence) and stopped after it. Without either the figures
are reported as not measured (the memory backend's own figures do not depend on it).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import redis
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import SessionsExtension, Settings
from server.config import StoreSettings
from tests.bench.common import Figure, median_spread
from tests.bench.overhead import _block, noop_async

VARIANTS = ("bare", "memory", "redis")
ORDERS = list(itertools.permutations(VARIANTS))


@contextmanager
def _redis_url() -> Iterator[str | None]:
    url = os.environ.get("MCP_BENCH_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(args, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"redis-server did not start on port {port}") from None
                    time.sleep(0.05)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def _server(variant: str, url: str) -> MCPServer[Any]:
    if variant == "bare":
        app: MCPServer[Any] = MCPServer("bench")
    else:
        store = (
            StoreSettings(backend="redis", url=url, key_prefix=f"bench-{os.getpid()}:") if variant == "redis" else None
        )
        sessions = SessionsExtension(Settings(store=store) if store is not None else Settings())
        app = MCPServer("bench", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(noop_async)
    return app


async def run(quick: bool = False) -> list[Figure]:
    with _redis_url() as url:
        if url is None:
            missing = "no redis-server on PATH and MCP_BENCH_REDIS_URL unset"
            return [Figure("redis backend: not measured", 0.0, "", "info", True, detail=missing)]
        figures: list[Figure] = []
        async with AsyncExitStack() as stack:
            clients = {v: await stack.enter_async_context(Client(_server(v, url))) for v in VARIANTS}
            for callers in (1, 50):
                calls = 100 if callers == 1 else 250
                rounds = 6 if quick else 24
                for client in clients.values():
                    await _block(client, "noop_async", 100, min(callers, 10))
                p50: dict[str, list[float]] = {v: [] for v in VARIANTS}
                thr: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for i in range(rounds):
                    for v in ORDERS[i % len(ORDERS)]:
                        latency, throughput = await _block(clients[v], "noop_async", calls, callers)
                        p50[v].append(latency)
                        thr[v].append(throughput)
                mode = "sequential" if callers == 1 else f"{callers} concurrent"
                added = [(r - m) * 1e6 for r, m in zip(p50["redis"], p50["memory"], strict=True)]
                vs_bare = [r / b for r, b in zip(p50["redis"], p50["bare"], strict=True)]
                thr_vs_memory = [r / m for r, m in zip(thr["redis"], thr["memory"], strict=True)]
                medians = ", ".join(f"{v} {statistics.median(p50[v]) * 1e6:.0f} us" for v in VARIANTS)
                detail = f"{rounds} interleaved rounds of {calls} calls; p50 {medians}"
                value, spread = median_spread(added)
                figures.append(
                    Figure(
                        f"redis backend: added p50 per call vs memory, async, {mode}",
                        value,
                        "us",
                        "info",
                        True,
                        spread,
                        detail,
                    )
                )
                value, spread = median_spread(vs_bare)
                figures.append(
                    Figure(
                        f"redis backend: p50 latency ratio vs bare SDK, async, {mode}", value, "x", "info", True, spread
                    )
                )
                value, spread = median_spread(thr_vs_memory)
                figures.append(
                    Figure(
                        f"redis backend: throughput ratio vs memory, async, {mode}", value, "x", "info", True, spread
                    )
                )
        return figures
