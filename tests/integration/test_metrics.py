"""The metrics through real clients: tools whose names are the pseudo-tool names `(none)` and
`(other)` (the SDK's in-memory `Client`), and `/metrics` scraped over streamable HTTP on loopback
from a server run in this process, whose event loop the test watches."""

from __future__ import annotations

from typing import Any

import anyio
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server import SessionsExtension
from server.manager_state import NO_TOOL, OTHER_TOOLS
from server.prometheus import build_registry, render
from tests.helpers import Gate, build, settings

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
