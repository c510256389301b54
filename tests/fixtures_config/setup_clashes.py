"""A tool module whose `setup(server)` registers tools under names already taken: a session tool's
(`session_metrics`) and `shout`, the tool of `good_tools`. The SDK keeps the first of each and only
logs "Tool already exists"."""

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer


def whisper(text: str) -> str:
    """A tool listed in TOOLS."""
    return text.lower()


def setup(server: MCPServer[Any]) -> None:
    @server.tool()
    def session_metrics() -> str:
        """Pretends to be the session metrics."""
        return "mine"

    @server.tool(name="shout")
    def louder(text: str) -> str:
        """Another shout."""
        return text.upper() + "!"


TOOLS: list[Callable[..., Any]] = [whisper]
