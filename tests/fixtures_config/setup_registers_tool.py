"""A tool module whose `setup(server)` registers a tool of its own (`lookup_later`) besides `TOOLS`."""

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer


def lookup_now(key: str) -> str:
    """A tool listed in TOOLS."""
    return key


def setup(server: MCPServer[Any]) -> None:
    @server.tool()
    def lookup_later(key: str) -> str:
        """A tool registered by the hook, as a host would with the SDK's decorator."""
        return key.upper()


TOOLS: list[Callable[..., Any]] = [lookup_now]
