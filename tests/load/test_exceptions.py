"""A tool that raises every kind of exception, in a real server process over stdio: each call is
answered, its session is accounted (as `error`, or `timeout` for the one raised during its
deadline's cancellation), and the server keeps serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Config, ServerProcess, start_server
from tests.fixtures.fault_tools import RAISERS
from tests.helpers import code_of, text_of

MODULE = "tests.fixtures.fault_tools"
ENDED = ("completed", "error", "timeout", "cancelled")


def config() -> Config:
    return {
        "server": {"tool_modules": [MODULE]},
        "shutdown": {"timeout_seconds": 2.0},
        "tools": {"raise_while_cancelled": {"timeout_seconds": 0.5}},
    }


async def metrics(server: ServerProcess) -> dict[str, Any]:
    result = await server.call("session_metrics")
    data: dict[str, Any] = result.structured_content or {}
    assert data["total_sessions_created"] == data["active_sessions"] + sum(
        data[f"total_sessions_{state}"] for state in ENDED
    ), data
    return data


@pytest.mark.parametrize("tool", ["raise_async", "raise_sync"])
async def test_every_kind_of_exception_is_answered_accounted_and_the_server_keeps_serving(
    tmp_path: Path, tool: str
) -> None:
    async with start_server(tmp_path, config()) as server:
        await server.initialize()
        await raise_each_kind(server, tool)


async def raise_each_kind(server: ServerProcess, tool: str) -> None:
    before = await metrics(server)
    answers: dict[str, str] = {}
    for kind in RAISERS:
        response = await server.request("tools/call", {"name": tool, "arguments": {"kind": kind}})
        result = server_result(response)  # a tool result, never a protocol error or no answer
        assert result["isError"] is True, (kind, result)
        answers[kind] = result["content"][0]["text"]
        # Still serving, with nothing left active.
        assert text_of(await server.call("echo", {"text": kind})) == kind
        now = await metrics(server)
        assert now["active_sessions"] == 0, (kind, now)

    after = await metrics(server)
    calls = len(RAISERS) * 2  # each kind, then an echo
    assert after["total_sessions_created"] - before["total_sessions_created"] == calls
    assert after["total_sessions_completed"] - before["total_sessions_completed"] == len(RAISERS)
    assert after["total_sessions_error"] - before["total_sessions_error"] == len(RAISERS), answers
    assert after["tools"][tool]["errors"] == len(RAISERS)
    # What the SDK does not turn into a result (a BaseException) is logged by the server, naming
    # the tool and the exception's type.
    assert f"server.extension: Tool {tool!r} raised CustomBaseError: not an Exception\n" in server.stderr
    assert f"server.extension: Tool {tool!r} raised SystemExit: 3\n" in server.stderr
    assert server.returncode is None
    assert server.stray_stdout == []


def server_result(response: dict[str, Any]) -> dict[str, Any]:
    assert "result" in response, response
    result: dict[str, Any] = response["result"]
    return result


async def test_an_exception_raised_during_cancellation_still_ends_as_timeout(tmp_path: Path) -> None:
    async with start_server(tmp_path, config()) as server:
        await server.initialize()
        await raise_during_cancellation(server)


async def raise_during_cancellation(server: ServerProcess) -> None:
    before = await metrics(server)

    result = await server.call("raise_while_cancelled")

    assert code_of(result) == "timeout"
    assert text_of(await server.call("echo", {"text": "after"})) == "after"
    after = await metrics(server)
    assert after["total_sessions_timeout"] - before["total_sessions_timeout"] == 1
    assert after["active_sessions"] == 0
    assert server.returncode is None
