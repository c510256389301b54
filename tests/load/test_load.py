"""1,000 concurrent tool calls over streamable HTTP against `max_concurrent_sessions = 50`.

The calls come from several SDK clients (one MCP session each, many calls in flight per
session). Every call must be answered, with the tool's result or a `capacity_exceeded`
refusal; the peak stays at or under the cap; the counters add up exactly; and the server
answers normally afterwards.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
from mcp import Client

from tests.e2e.conftest import metrics, server_config, start_server
from tests.helpers import code_of, text_of

CALLS = 1_000
CLIENTS = 10
CAP = 50
#: Long enough that the calls overlap and the cap is reached, short enough to keep the test quick.
WORK_SECONDS = 0.3
#: The whole burst, on a slow shared CI machine.
BURST_SECONDS = 120.0


async def test_a_thousand_concurrent_calls_never_exceed_the_cap_and_all_are_answered(tmp_path: Path) -> None:
    config = server_config(limits={"max_concurrent_sessions": CAP})
    outcomes: Counter[str] = Counter()

    async with start_server(tmp_path, config, transport="streamable-http") as server:
        assert server.url is not None

        async def one_client(calls: int) -> None:
            async with Client(server.url or "", read_timeout_seconds=BURST_SECONDS) as client:

                async def one_call() -> None:
                    result = await client.call_tool("sleep_async", {"seconds": WORK_SECONDS})
                    if result.is_error:
                        outcomes[code_of(result)] += 1
                    else:
                        assert text_of(result) == f"slept {WORK_SECONDS:g}s", result
                        outcomes["ok"] += 1

                async with anyio.create_task_group() as calls_group:
                    for _ in range(calls):
                        calls_group.start_soon(one_call)

        async with server.client() as observer:
            before = await metrics(observer)
            with anyio.fail_after(BURST_SECONDS):
                async with anyio.create_task_group() as tg:
                    for _ in range(CLIENTS):
                        tg.start_soon(one_client, CALLS // CLIENTS)
            after = await metrics(observer)
            # Healthy afterwards: a call is admitted and answered as usual.
            assert text_of(await observer.call_tool("echo", {"text": "still here"})) == "still here"

    assert sum(outcomes.values()) == CALLS, outcomes
    assert set(outcomes) <= {"ok", "capacity_exceeded"}, outcomes
    assert outcomes["ok"] >= CAP, outcomes  # at least one full house ran
    assert 0 < after["peak_concurrent_sessions"] <= CAP, after
    assert after["active_sessions"] == 0, after

    def delta(key: str) -> int:
        return int(after[key]) - int(before[key])

    assert delta("total_sessions_created") == outcomes["ok"]
    assert delta("total_sessions_completed") == outcomes["ok"]
    assert delta("sessions_rejected_capacity") == outcomes["capacity_exceeded"]
    for state in ("error", "timeout", "cancelled"):
        assert delta(f"total_sessions_{state}") == 0, after
    assert after["tools"]["sleep_async"]["completed"] == outcomes["ok"]
