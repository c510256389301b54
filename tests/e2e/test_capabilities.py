"""Where the extension is advertised: `capabilities.extensions` exists only on protocol
2026-07-28 (the SDK's `Client` by default); a client that starts with the `initialize`
handshake (2025-11-25 and earlier, as the MCP Inspector does) gets the same capabilities
without it, since the SDK writes that result in the older schema, which has no `extensions`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import EXTENSION_ID, SessionsExtension, load_settings
from server.reload import ConfigReloader
from tests.e2e.conftest import PROTOCOL_VERSION, server_config, start_server
from tests.helpers import build, settings


async def test_the_extension_is_in_capabilities_extensions_on_2026_07_28_only(tmp_path: Path) -> None:
    app, _ = build(settings(max_concurrent_sessions=7, default_timeout_seconds=12.0))
    async with Client(app) as client:
        assert client.protocol_version == "2026-07-28"
        assert client.server_capabilities is not None
        advertised = client.server_capabilities.extensions or {}
    assert advertised[EXTENSION_ID] == {"maxConcurrentSessions": 7, "defaultTimeoutSeconds": 12.0}

    async with start_server(tmp_path, server_config(limits={"max_concurrent_sessions": 7})) as server:
        result = (await server.initialize())["result"]
    assert result["protocolVersion"] == PROTOCOL_VERSION == "2025-11-25"
    assert "tools" in result["capabilities"] and "extensions" not in result["capabilities"]


async def test_the_advertised_limits_follow_a_reload_for_clients_that_connect_after_it(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[limits]\nmax_concurrent_sessions = 7\ndefault_timeout_seconds = 12.0\n", encoding="utf-8")
    sessions = SessionsExtension(load_settings(path))
    app = MCPServer("reloaded", extensions=[sessions], lifespan=sessions.lifespan)

    async def advertised() -> dict[str, Any]:
        async with Client(app) as client:
            assert client.server_capabilities is not None
            extensions = client.server_capabilities.extensions or {}
            limits = (await client.call_tool("session_metrics", {})).structured_content["limits"]
        assert extensions[EXTENSION_ID]["maxConcurrentSessions"] == limits["max_concurrent_sessions"]
        assert extensions[EXTENSION_ID]["defaultTimeoutSeconds"] == limits["default_timeout_seconds"]
        return extensions[EXTENSION_ID]

    assert await advertised() == {"maxConcurrentSessions": 7, "defaultTimeoutSeconds": 12.0}
    path.write_text("[limits]\nmax_concurrent_sessions = 3\ndefault_timeout_seconds = 2.5\n", encoding="utf-8")
    assert ConfigReloader(sessions, path, manage_logging=False).reload() is True  # what SIGHUP does
    assert await advertised() == {"maxConcurrentSessions": 3, "defaultTimeoutSeconds": 2.5}
    sessions.apply_settings(settings(max_concurrent_sessions=9, default_timeout_seconds=4.0))  # an embedding host's
    assert await advertised() == {"maxConcurrentSessions": 9, "defaultTimeoutSeconds": 4.0}


async def test_the_standalone_server_gives_its_package_version_in_server_info(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config()) as server:
        result = (await server.initialize())["result"]
    assert result["serverInfo"]["version"] == importlib.metadata.version("mcp-session-manager")
