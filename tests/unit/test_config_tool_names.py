"""Per-tool settings from the environment, for tools whose names have capitals or dashes.

Environment variable names are matched without regard to case, so a tool name taken from
`MCP_SESSIONS_TOOLS__<NAME>__...` is lower-cased; the JSON form `MCP_SESSIONS_TOOLS='{...}'`
keeps a name as written. These tests hold the README to both.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import SessionsExtension, load_settings
from tests.helpers import code_of


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MCP_SESSIONS_"):
            monkeypatch.delenv(name)


async def getWeather() -> str:  # noqa: N802 - a mixed-case tool name is the point
    await anyio.sleep(3600)
    return "sunny"


async def call_get_weather(sessions: SessionsExtension) -> str:
    app: MCPServer[Any] = MCPServer("weather", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(getWeather)
    with anyio.fail_after(10):
        async with Client(app) as client:
            return code_of(await client.call_tool("getWeather", {}))


async def test_the_json_form_keeps_a_mixed_case_tool_name_and_its_deadline_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MCP_SESSIONS_TOOLS", '{"getWeather": {"timeout_seconds": 0.2}, "get-forecast": {}}')
    settings = load_settings(None)

    assert set(settings.tools) == {"getWeather", "get-forecast"}
    assert settings.timeout_for("getWeather") == 0.2
    assert await call_get_weather(SessionsExtension(settings)) == "timeout"


def test_a_tool_name_in_a_variable_name_is_lower_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_TOOLS__GETWEATHER__TIMEOUT_SECONDS", "0.2")
    settings = load_settings(None)

    assert list(settings.tools) == ["getweather"]
    assert settings.timeout_for("getweather") == 0.2
    assert settings.timeout_for("getWeather") == settings.limits.default_timeout_seconds
