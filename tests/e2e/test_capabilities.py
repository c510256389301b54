"""Where the extension is advertised: `capabilities.extensions` exists only on protocol
2026-07-28 (the SDK's `Client` by default); a client that starts with the `initialize`
handshake (2025-11-25 and earlier, as the MCP Inspector does) gets the same capabilities
without it, since the SDK writes that result in the older schema, which has no `extensions`.
"""

from __future__ import annotations

from pathlib import Path

from mcp import Client

from server import EXTENSION_ID
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
