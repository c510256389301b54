"""A tool module whose `setup` is an object with an `async def __call__`: no `async def` to see
before it is called, but what it returns is a coroutine nobody awaits."""

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


TOOLS: list[Callable[..., Any]] = [echo]


class _Setup:
    async def __call__(self, server: MCPServer[Any]) -> None:
        server.add_tool(echo, name="registered_by_async_setup")


setup = _Setup()
