"""A tool module whose `setup` is an `async def`: called, it makes a coroutine nobody awaits, so
the tool and the resource it registers would never exist."""

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


TOOLS: list[Callable[..., Any]] = [echo]


async def setup(server: MCPServer[Any]) -> None:
    @server.tool()
    def registered_by_async_setup() -> str:
        return "never"
