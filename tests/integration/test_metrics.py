"""The metrics through real clients: tools whose names are the pseudo-tool names `(none)` and
`(other)` (the SDK's in-memory `Client`), and `/metrics` scraped over streamable HTTP on loopback
from a server run in this process, whose event loop the test watches."""

from __future__ import annotations

import gc
import socket
import time
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import uvicorn
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server import SessionsExtension, SessionState
from server.endpoints import add_operational_routes
from server.manager_state import MAX_TRACKED_TOOLS, NO_TOOL, OTHER_TOOLS
from server.prometheus import build_registry, render
from tests.helpers import Gate, build, settings, until

HISTOGRAM = "mcp_sessions_duration_seconds"


def samples_of(sessions: SessionsExtension) -> list[Sample]:
    body, _ = render(build_registry(sessions.manager, process=False), None)
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


def named(fn: Any, name: str) -> Any:
    fn.__name__ = fn.__qualname__ = name
    return fn


# -- the pseudo-tool names ----------------------------------------------------------------


async def test_a_tool_named_none_shares_session_create_s_histogram_and_the_counts_still_add_up() -> None:
    def none() -> str:
        return "ran"

    # The SDK only warns of a tool name outside [A-Za-z0-9_.-] (logged, SEP-986).
    app, sessions = build(tools=[named(none, NO_TOOL)])
    async with Client(app) as client:
        for _ in range(2):
            assert not (await client.call_tool(NO_TOOL, {})).is_error
        created = await client.call_tool("session_create", {})
        await client.call_tool("session_release", {"session_id": created.structured_content["session_id"]})
        snapshot = sessions.manager.metrics()
        samples = samples_of(sessions)

    finished = snapshot.total_sessions_completed + snapshot.total_sessions_error
    finished += snapshot.total_sessions_timeout + snapshot.total_sessions_cancelled
    counts = {s.labels["tool"]: s.value for s in samples if s.name == HISTOGRAM + "_count"}
    assert counts == {NO_TOOL: 3}  # the tool's two calls and session_create's session, neither overwritten
    assert sum(counts.values()) == finished == 3
    calls = [s.value for s in samples if s.name == "mcp_sessions_tool_calls_total" and s.labels["tool"] == NO_TOOL]
    assert calls == [2]  # the tool's own calls; session_create's sessions are no tool's


async def test_a_tool_named_other_counts_its_running_call_as_active() -> None:
    gate = Gate()
    block = gate.tools()[0]
    app, sessions = build(settings(tools={OTHER_TOOLS: {"max_concurrent": 1}}), [named(block, OTHER_TOOLS)])
    async with Client(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, OTHER_TOOLS, {})
        with anyio.fail_after(5):
            await gate.entered_event.wait()
        data = (await client.call_tool("session_metrics", {})).structured_content
        gate.open()

    entry = data["tools"][OTHER_TOOLS]
    assert (entry["calls"], entry["active"], entry["max_concurrent"]) == (1, 1, 1)


# -- /metrics over streamable HTTP --------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_scrape_of_a_large_registry_leaves_the_event_loop_serving() -> None:
    # 1,025 tool entries (1,024 tools and "(other)"): rendering them takes about 150 ms here. On
    # the event loop, that held every MCP call of the server as long at each scrape (a tiny
    # call's p99 went from 6.5 ms to 348 ms with a scrape every 0.2 s).
    app, sessions = build()
    registry = build_registry(sessions.manager)
    add_operational_routes(app, sessions, registry)
    port = free_port()
    config = uvicorn.Config(
        app.streamable_http_app(), host="127.0.0.1", port=port, ws="none", log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    worst_lag = 0.0
    scraped: list[httpx2.Response] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await until(lambda: server.started, within=20)
            manager = sessions.manager
            for index in range(MAX_TRACKED_TOOLS + 10):
                manager.end(await manager.create(tool=f"t{index:04d}"), SessionState.COMPLETED)
            began = time.perf_counter()
            body, _ = await anyio.to_thread.run_sync(render, registry, None)
            one_render = time.perf_counter() - began  # in a thread, as the server renders it
            assert OTHER_TOOLS in body.decode()

            watching = anyio.Event()

            async def watch_the_loop() -> None:
                # The loop's lag: how much later than asked each short sleep ends.
                nonlocal worst_lag
                tick = 0.002
                watching.set()
                while True:
                    before = time.perf_counter()
                    await anyio.sleep(tick)
                    worst_lag = max(worst_lag, time.perf_counter() - before - tick)

            # Every thread of anyio's default limiter taken, as by a pool full of sync tools: the
            # scrape renders through a limiter of its own.
            pool = anyio.to_thread.current_default_thread_limiter()
            tools = [object() for _ in range(int(pool.total_tokens))]
            for tool in tools:
                pool.acquire_on_behalf_of_nowait(tool)
            scraper = anyio.CapacityLimiter(1)
            gc.collect()  # so that no full collection owed to earlier garbage falls in the window
            try:
                async with anyio.create_task_group() as watcher:
                    watcher.start_soon(watch_the_loop)
                    await watching.wait()
                    for _ in range(3):  # from a thread: the scraper's own reading of the body is not on the loop
                        scraped.append(
                            await anyio.to_thread.run_sync(
                                lambda: httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10), limiter=scraper
                            )
                        )
                    watcher.cancel_scope.cancel()
            finally:
                for tool in tools:
                    pool.release_on_behalf_of(tool)
                server.should_exit = True  # serve() returns, its socket closed

    assert [response.status_code for response in scraped] == [200] * 3
    assert all(OTHER_TOOLS in response.text for response in scraped)
    # Generous: rendered on the loop, a scrape stalled it for about one whole render.
    assert worst_lag < one_render / 2, (worst_lag, one_render)
