"""Figure 1: the cost the extension adds to a tool call, against the bare SDK in the same run.

Three servers with the same two tools (a no-op async tool, a no-op sync tool), each behind its
own in-memory `Client`, all open at once: the bare SDK, the SDK with a pass-through
`intercept_tool_call` (the floor any interceptor plugin pays for the SDK's interceptor chain),
and the SDK with `SessionsExtension`. Each round runs one short block of calls on each of the
three, in an order that rotates through all six permutations, so the machine's noise hits all
three alike; a round's ratios are variant/bare for that round, and a figure is the median of
its rounds' ratios with their spread (min .. max).
"""

from __future__ import annotations

import itertools
import statistics
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
from mcp import Client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolRequestParams

from server import SessionsExtension, Settings
from tests.bench.common import Figure, median_spread

VARIANTS = ("bare", "passthrough", "sessions")
ORDERS = list(itertools.permutations(VARIANTS))


async def noop_async() -> str:
    return "ok"


def noop_sync() -> str:
    return "ok"


class PassThrough(Extension):
    """An interceptor that does nothing: what the SDK's interceptor chain itself costs."""

    identifier = "io.github.mcp-session-manager/bench-passthrough"

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        return await call_next(ctx)


def server_for(variant: str) -> MCPServer[Any]:
    if variant == "sessions":
        sessions = SessionsExtension(Settings())
        app: MCPServer[Any] = MCPServer("bench", extensions=[sessions], lifespan=sessions.lifespan)
    elif variant == "passthrough":
        app = MCPServer("bench", extensions=[PassThrough()])
    else:
        app = MCPServer("bench")
    app.add_tool(noop_async)
    app.add_tool(noop_sync)
    return app


async def _block(client: Client, tool: str, calls: int, callers: int) -> tuple[float, float]:
    """(p50 latency in seconds, throughput in calls/s) of `calls` calls from `callers` tasks."""
    latencies: list[float] = []

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


async def _case(
    clients: dict[str, Client], tool: str, callers: int, rounds: int, calls: int
) -> dict[str, dict[str, list[float]]]:
    """Per variant: each round's p50 latency and throughput, and their ratios to `bare`."""
    for client in clients.values():  # warm up each server on this tool
        await _block(client, tool, 100, min(callers, 10))
    out: dict[str, dict[str, list[float]]] = {
        v: {"p50": [], "throughput": [], "p50_ratio": [], "throughput_ratio": []} for v in VARIANTS
    }
    for i in range(rounds):
        measured = {v: await _block(clients[v], tool, calls, callers) for v in ORDERS[i % len(ORDERS)]}
        for v in VARIANTS:
            p50, throughput = measured[v]
            out[v]["p50"].append(p50)
            out[v]["throughput"].append(throughput)
            out[v]["p50_ratio"].append(p50 / measured["bare"][0])
            out[v]["throughput_ratio"].append(throughput / measured["bare"][1])
    return out


def _figures(data: dict[str, dict[str, list[float]]], kind: str, mode: str, detail: str) -> list[Figure]:
    lat, lat_spread = median_spread(data["sessions"]["p50_ratio"])
    thr, thr_spread = median_spread(data["sessions"]["throughput_ratio"])
    floor_lat, floor_lat_spread = median_spread(data["passthrough"]["p50_ratio"])
    floor_thr, floor_thr_spread = median_spread(data["passthrough"]["throughput_ratio"])
    case = f"{kind}, {mode}"
    return [
        Figure(f"overhead p50 latency ratio, {case}", lat, "x", "<= 1.05", lat <= 1.05, lat_spread, detail),
        Figure(f"overhead throughput ratio, {case}", thr, "x", ">= 0.95", thr >= 0.95, thr_spread),
        Figure(f"floor: pass-through p50 ratio, {case}", floor_lat, "x", "info", True, floor_lat_spread),
        Figure(f"floor: pass-through throughput ratio, {case}", floor_thr, "x", "info", True, floor_thr_spread),
    ]


async def run(quick: bool = False) -> list[Figure]:
    figures: list[Figure] = []
    async with AsyncExitStack() as stack:
        clients = {v: await stack.enter_async_context(Client(server_for(v))) for v in VARIANTS}
        for tool in ("noop_async", "noop_sync"):
            for callers in (1, 50):
                calls = 100 if callers == 1 else 250
                # Many short rounds: a single round's ratio ranges about 0.6 .. 1.8 on a noisy VM,
                # and the median of a few dozen still moved by several percent between runs.
                rounds = 12 if quick else (144 if callers == 1 else 72)
                data = await _case(clients, tool, callers, rounds, calls)
                bare_p50 = statistics.median(data["bare"]["p50"]) * 1e6
                bare_throughput = statistics.median(data["bare"]["throughput"])
                detail = (
                    f"{rounds} interleaved rounds of {calls} calls; "
                    f"SDK alone p50 {bare_p50:.0f} us, {bare_throughput:.0f} calls/s"
                )
                kind = "async" if tool == "noop_async" else "sync"
                mode = "sequential" if callers == 1 else f"{callers} concurrent"
                figures += _figures(data, kind, mode, detail)
    return figures
