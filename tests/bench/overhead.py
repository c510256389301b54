"""Figure 1: the cost the extension adds to a tool call, against the bare SDK in the same run.

The same `MCPServer` (one no-op async tool, one no-op sync tool) with and without
`SessionsExtension`, through the SDK's in-memory `Client`; rounds alternate the two so the
machine's noise hits both alike. Ratios are ext/base per round; the figure is their median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import SessionsExtension, Settings
from tests.bench.common import Figure, median_spread


async def noop_async() -> str:
    return "ok"


def noop_sync() -> str:
    return "ok"


def _server(with_sessions: bool) -> MCPServer[Any]:
    if with_sessions:
        sessions = SessionsExtension(Settings())
        app: MCPServer[Any] = MCPServer("bench", extensions=[sessions], lifespan=sessions.lifespan)
    else:
        app = MCPServer("bench")
    app.add_tool(noop_async)
    app.add_tool(noop_sync)
    return app


async def _measure(with_sessions: bool, tool: str, calls: int, callers: int) -> tuple[float, float]:
    """(p50 latency in seconds, throughput in calls/s) for `calls` calls from `callers` tasks."""
    latencies: list[float] = []
    async with Client(_server(with_sessions)) as client:
        for _ in range(100):  # warm up
            await client.call_tool(tool, {})

        async def caller(n: int) -> None:
            for _ in range(n):
                started = time.perf_counter()
                await client.call_tool(tool, {})
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(caller, calls // callers)
        elapsed = time.perf_counter() - started
    return statistics.median(latencies), len(latencies) / elapsed


async def run(quick: bool = False) -> list[Figure]:
    rounds = 3 if quick else 9
    figures: list[Figure] = []
    for tool in ("noop_async", "noop_sync"):
        for callers in (1, 50):
            calls = (500 if quick else 1500) if callers == 1 else (1000 if quick else 3000)
            latency_ratios: list[float] = []
            throughput_ratios: list[float] = []
            base_p50: list[float] = []
            for i in range(rounds):
                order = (False, True) if i % 2 == 0 else (True, False)
                results = {flag: await _measure(flag, tool, calls, callers) for flag in order}
                latency_ratios.append(results[True][0] / results[False][0])
                throughput_ratios.append(results[True][1] / results[False][1])
                base_p50.append(results[False][0])
            kind = "async" if tool == "noop_async" else "sync"
            mode = "sequential" if callers == 1 else f"{callers} concurrent"
            lat, lat_spread = median_spread(latency_ratios)
            thr, thr_spread = median_spread(throughput_ratios)
            base = statistics.median(base_p50) * 1e6
            figures.append(
                Figure(
                    f"overhead p50 latency ratio, {kind}, {mode}",
                    lat,
                    "x",
                    "<= 1.05",
                    lat <= 1.05,
                    lat_spread,
                    f"SDK alone p50 {base:.0f} us",
                )
            )
            figures.append(
                Figure(f"overhead throughput ratio, {kind}, {mode}", thr, "x", ">= 0.95", thr >= 0.95, thr_spread)
            )
    return figures
