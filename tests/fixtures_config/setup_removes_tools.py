"""A tool module whose `setup(server)` removes tools: `shout` (of `good_tools`' TOOLS) and, when
`REMOVE_SESSION_TOOL` is set, the session tool it names."""

import os
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer

TOOLS: list[Callable[..., Any]] = []


def setup(server: MCPServer[Any]) -> None:
    server.remove_tool("shout")
    session_tool = os.environ.get("REMOVE_SESSION_TOOL")
    if session_tool:
        server.remove_tool(session_tool)
