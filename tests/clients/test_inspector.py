"""The MCP Inspector CLI (`@modelcontextprotocol/inspector`, pinned) driving the standalone server
over stdio (the Inspector launches it) and over streamable HTTP, in both protocol eras.

Each call is one Inspector process, run with `--format json -q` and bounded in time; the tests
assert on its JSON output and its exit status: 0 for a result, 5 when the result has `isError`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest

from server.errors import ERROR_META_KEY
from tests.clients.node import INSPECTOR, Completed, run_node
from tests.e2e.conftest import ROOT, Config, ServerProcess, render_toml, server_config, start_server

#: One Inspector call: Node start, (on stdio) the server's start, the call, the exit.
CALL_SECONDS = 60.0
EXIT_TOOL_IS_ERROR = 5
ERAS = ["legacy", "modern"]
TRANSPORTS = ["stdio", "streamable-http"]
METADATA_LIMIT = 64


def config() -> Config:
    return server_config(limits={"max_metadata_bytes": METADATA_LIMIT}, shutdown={"timeout_seconds": 1.0})


@pytest.fixture(scope="module")
def stdio_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspector-stdio") / "server.toml"
    path.write_text(render_toml(config()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("inspector-http")
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, config(), transport="streamable-http")) as server,
    ):
        yield server


class Inspector:
    """The Inspector CLI aimed at one server, in one protocol era."""

    def __init__(self, transport: str, target: list[str], era: str, home: Path) -> None:
        self.transport = transport
        self.target = target
        self.era = era
        # The Inspector keeps a catalog and client config under HOME: keep them out of the user's.
        self.env = {"HOME": str(home), "MCP_CATALOG_PATH": str(home / "mcp.json")}

    async def run(self, *args: str) -> Completed:
        return await run_node(
            INSPECTOR,
            ["--cli", "--format", "json", "-q", "--protocol-era", self.era, *args, *self.target],
            within=CALL_SECONDS,
            cwd=ROOT,
            env=self.env,
        )

    async def list_tools(self) -> list[dict[str, Any]]:
        done = await self.run("--method", "tools/list")
        assert done.returncode == 0, done
        tools: list[dict[str, Any]] = json.loads(done.stdout)["result"]["tools"]
        return tools

    async def call(self, tool: str, arguments: dict[str, Any] | None = None, *, status: int = 0) -> dict[str, Any]:
        """Call `tool`; assert the exit `status`; return the result object from stdout."""
        done = await self.run(
            "--method", "tools/call", "--tool-name", tool, "--tool-args-json", json.dumps(arguments or {})
        )
        assert done.returncode == status, done
        result: dict[str, Any] = json.loads(done.stdout)["result"]
        assert bool(result.get("isError")) == (status == EXIT_TOOL_IS_ERROR), result
        return result

    async def refused(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call `tool` expecting a refusal: exit 5, `isError`, no structured content; returns the error."""
        result = await self.call(tool, arguments, status=EXIT_TOOL_IS_ERROR)
        assert "structuredContent" not in result, result
        error: dict[str, Any] = result["_meta"][ERROR_META_KEY]
        assert result["content"][0]["text"] == error["message"]
        return error


@pytest.fixture(params=[(t, e) for t in TRANSPORTS for e in ERAS], ids=lambda p: f"{p[0]}-{p[1]}")
def inspector(
    request: pytest.FixtureRequest, tmp_path: Path, stdio_config: Path, http_server: ServerProcess
) -> Inspector:
    transport, era = request.param
    if transport == "stdio":
        target = ["--cwd", str(ROOT), "--", sys.executable, "-m", "server", "--config", str(stdio_config)]
    else:
        assert http_server.url is not None
        target = [http_server.url]
    return Inspector(transport, target, era, tmp_path)


def over_http(inspector: Inspector) -> bool:
    return inspector.transport == "streamable-http"


async def test_the_inspector_lists_the_session_tools_and_the_hosted_ones(inspector: Inspector) -> None:
    tools = {tool["name"]: tool for tool in await inspector.list_tools()}

    assert {"session_create", "session_release", "session_metrics", "server_shutdown"} <= set(tools)
    assert {"echo", "hang_async", "hang_sync"} <= set(tools)
    assert "provider" in tools["session_create"]["inputSchema"]["properties"]
    assert "session_id" in tools["session_create"]["outputSchema"]["properties"]


async def test_the_inspector_calls_each_session_tool(inspector: Inspector) -> None:
    created = (await inspector.call("session_create", {"provider": "inspector", "timeout_seconds": 30}))[
        "structuredContent"
    ]
    assert created["state"] == "active" and created["timeout_seconds"] == 30

    metrics = (await inspector.call("session_metrics"))["structuredContent"]
    ended = sum(metrics[f"total_sessions_{state}"] for state in ("completed", "error", "timeout", "cancelled"))
    assert metrics["total_sessions_created"] == metrics["active_sessions"] + ended

    if over_http(inspector):
        # One server across calls: the session the first call created is still there to release.
        released = (await inspector.call("session_release", {"session_id": created["session_id"]}))["structuredContent"]
        assert released["state"] == "completed"
        again = await inspector.refused("session_release", {"session_id": created["session_id"]})
        assert again["code"] == "already_released"
        # Anyone who reaches the port could stop the server: refused without the admin token.
        refused = await inspector.refused("server_shutdown", {"timeout_seconds": 1})
        assert refused["code"] == "unauthorized"
    else:
        # Every call launches its own server: the first call's session is not this server's.
        unknown = await inspector.refused("session_release", {"session_id": created["session_id"]})
        assert unknown["code"] == "unknown_session"
        # Over stdio the client owns the process and may stop it.
        report = (await inspector.call("server_shutdown", {"timeout_seconds": 1}))["structuredContent"]
        assert report["final_active_sessions"] == 0 and report["timeout_reached"] is False


async def test_the_inspector_gets_a_hosted_tool_result(inspector: Inspector) -> None:
    result = await inspector.call("echo", {"text": "héllo from the inspector"})

    assert result["content"] == [{"type": "text", "text": "héllo from the inspector"}]


async def test_the_inspector_sees_a_deadline_as_a_timeout_with_exit_5(inspector: Inspector) -> None:
    error = await inspector.refused("hang_async")

    assert error["code"] == "timeout" and error["tool"] == "hang_async"
    assert "deadline of 0.5s" in error["message"]


async def test_the_inspector_sees_a_refusal_with_its_code_and_exit_5(inspector: Inspector) -> None:
    error = await inspector.refused("session_create", {"metadata": {"notes": "x" * METADATA_LIMIT}})

    assert error["code"] == "metadata_too_large"
    bad = await inspector.refused("session_create", {"timeout_seconds": -1})
    assert bad["code"] == "invalid_argument"
