"""A tool module whose `TOOLS` is empty and whose `setup(server)` registers its tool: it hosts
what the hook registers, so nothing is noted."""

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer


def setup(server: MCPServer[Any]) -> None:
    @server.tool()
    def registered_by_setup(key: str) -> str:
        """A tool the hook registers."""
        return key


TOOLS: list[Callable[..., Any]] = []
