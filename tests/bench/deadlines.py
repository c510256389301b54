"""Figure 3: deadline precision under load, and metrics latency while everything hangs.

200 concurrent hung calls (100 `await anyio.sleep`, 100 blocked in threads) with a 0.5 s
timeout: how late after its deadline does each caller get its `timeout` result? Meanwhile
`session_metrics` is called in a loop; its latency is recorded.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.to_thread
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import SessionsExtension, Settings
from server.config import LimitsSettings, ToolSettings
from tests.bench.common import Figure, median_spread, percentile

TIMEOUT = 0.5
HUNG = 200


async def _round() -> tuple[float, float]:
    release = threading.Event()

    async def hang_async() -> str:
        await anyio.sleep(3600)
        return "woke"

    def hang_sync() -> str:
        release.wait(60)
        return "woke"

    settings = Settings(
        limits=LimitsSettings(max_concurrent_sessions=1000),
        tools={"hang_async": ToolSettings(timeout_seconds=TIMEOUT), "hang_sync": ToolSettings(timeout_seconds=TIMEOUT)},
    )
    sessions = SessionsExtension(settings)
    app: MCPServer[Any] = MCPServer("bench", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(hang_async)
    app.add_tool(hang_sync)
    lateness: list[float] = []
    metric_latency: list[float] = []
    try:
        async with Client(app) as client:
            await client.call_tool("session_metrics", {})
            done = anyio.Event()

            async def hung(tool: str) -> None:
                started = time.perf_counter()
                result = await client.call_tool(tool, {})
                lateness.append(time.perf_counter() - started - TIMEOUT)
                assert result.is_error
                if len(lateness) == HUNG:
                    done.set()

            async def poll_metrics() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    await client.call_tool("session_metrics", {})
                    metric_latency.append(time.perf_counter() - started)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                for i in range(HUNG):
                    tg.start_soon(hung, "hang_async" if i % 2 == 0 else "hang_sync")
                tg.start_soon(poll_metrics)
    finally:
        release.set()
    return percentile(lateness, 0.99), percentile(metric_latency, 0.99)


async def run(quick: bool = False) -> list[Figure]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = HUNG + 50
    rounds = 2 if quick else 5
    late: list[float] = []
    metrics: list[float] = []
    for _ in range(rounds):
        p99_late, p99_metrics = await _round()
        late.append(p99_late * 1000)
        metrics.append(p99_metrics * 1000)
    late_value, late_spread = median_spread(late)
    metrics_value, metrics_spread = median_spread(metrics)
    return [
        Figure("deadline p99 lateness, 200 hung calls", late_value, "ms", "<= 50 ms", late_value <= 50, late_spread),
        Figure(
            "session_metrics p99 during the hang", metrics_value, "ms", "<= 20 ms", metrics_value <= 20, metrics_spread
        ),
    ]
