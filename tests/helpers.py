"""Shared helpers for the test suite: servers under test, result inspection, bounded waits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

from server import ERROR_META_KEY, SessionsExtension, Settings
from server.config import LimitsSettings, ShutdownSettings, ToolSettings

#: How late after its deadline a call's timeout may come and still be "on time" in a test: the
#: deadline itself is kept to the millisecond (`make bench`), this is a loaded 2-core machine's
#: margin for the round trip (a reaper a whole second late fails it).
ON_TIME_MARGIN = 1.0


def settings(
    *,
    max_concurrent_sessions: int = 100,
    default_timeout_seconds: float = 30.0,
    max_timeout_seconds: float = 300.0,
    max_metadata_bytes: int = 10240,
    shutdown_timeout_seconds: float = 5.0,
    admin_token_env: str = "",
    tool_timeouts: dict[str, float] | None = None,
    tools: dict[str, dict[str, Any]] | None = None,
    **limits: Any,
) -> Settings:
    """Settings for a test server; `limits` are further `LimitsSettings` keys, `tools` per-tool keys."""
    per_tool: dict[str, dict[str, Any]] = {name: {"timeout_seconds": t} for name, t in (tool_timeouts or {}).items()}
    for name, keys in (tools or {}).items():
        per_tool.setdefault(name, {}).update(keys)
    return Settings(
        limits=LimitsSettings(
            max_concurrent_sessions=max_concurrent_sessions,
            default_timeout_seconds=default_timeout_seconds,
            max_timeout_seconds=max_timeout_seconds,
            max_metadata_bytes=max_metadata_bytes,
            **limits,
        ),
        shutdown=ShutdownSettings(timeout_seconds=shutdown_timeout_seconds, admin_token_env=admin_token_env),
        tools={name: ToolSettings(**keys) for name, keys in per_tool.items()},
    )


class Gate:
    """Tools that block until the test opens the gate, so a test controls when work ends.

    `block_async` awaits an anyio event; `block_sync` blocks its worker thread on a
    threading.Event (bounded, so a failing test cannot leave a thread behind forever).
    """

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.async_open = anyio.Event()
        self.entered = 0
        self.entered_event = anyio.Event()
        self.threads_running = 0
        self._lock = threading.Lock()
        self.expected = 1

    def open(self) -> None:
        self.opened.set()
        self.async_open.set()

    def _enter(self) -> None:
        self.entered += 1
        if self.entered >= self.expected:
            self.entered_event.set()

    def tools(self) -> list[Callable[..., Any]]:
        gate = self

        async def block_async() -> str:
            gate._enter()
            await gate.async_open.wait()
            return "opened"

        def block_sync() -> str:
            with gate._lock:
                gate.threads_running += 1
            try:
                gate.opened.wait(timeout=60)
            finally:
                with gate._lock:
                    gate.threads_running -= 1
            return "opened"

        return [block_async, block_sync]


async def hang_async(seconds: float = 3600) -> str:
    """An async tool that hangs (cancellable)."""
    await anyio.sleep(seconds)
    return "woke"


def echo(text: str) -> str:
    return text


def boom(message: str = "boom") -> str:
    raise ValueError(message)


def build(
    config: Settings | None = None, tools: list[Callable[..., Any]] | None = None
) -> tuple[MCPServer[Any], SessionsExtension]:
    """An MCPServer with the extension wired the README's way, plus the given tools."""
    sessions = SessionsExtension(config or settings())
    app: MCPServer[Any] = MCPServer("test-server", extensions=[sessions], lifespan=sessions.lifespan)
    for fn in tools or [echo, boom, hang_async]:
        app.add_tool(fn)
    return app, sessions


def error_of(result: CallToolResult) -> dict[str, Any]:
    """The machine-readable error of an error result (asserting it is one, and well-formed)."""
    assert result.is_error, f"expected an error result, got {result}"
    assert result.structured_content is None, "error results must carry no structuredContent"
    meta = result.meta or {}
    assert ERROR_META_KEY in meta, f"error result without {ERROR_META_KEY} in _meta: {result}"
    error: dict[str, Any] = meta[ERROR_META_KEY]
    assert error["message"] == text_of(result)
    return error


def code_of(result: CallToolResult) -> str:
    return str(error_of(result)["code"])


def text_of(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Yield to the event loop until `predicate()` holds; fail after `within` seconds.

    For states with no event to wait on (a call sitting in the admission queue): each turn
    is one scheduling checkpoint, so the wait ends as soon as the loop has made the state true.
    """
    with anyio.fail_after(within):
        while not predicate():
            await anyio.lowlevel.checkpoint()
