"""The lifespan serves `tools/call` with `SessionsExtension.handle_tool_call` itself, in place of
the SDK's interceptor chain, and gives the chain back on exit; other extensions' interceptors keep
their places, and where the take-over must not happen calls still run through the chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client, MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolRequestParams

from server import SessionsExtension, load_settings
from server.app import _StandaloneSessions, build_app
from server.sdk_seams import sdk_interceptor_chain
from tests.helpers import build, code_of, echo, hang_async, settings, text_of

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.toml"


def tools_call_handler(app: MCPServer[Any]) -> Any:
    entry = app._lowlevel_server.get_request_handler("tools/call")
    assert entry is not None
    return entry.handler


class Recorder(Extension):
    """An interceptor that notes, as each call passes it, how many sessions are active."""

    def __init__(self, identifier: str, sessions: SessionsExtension, seen: list[tuple[str, int]]) -> None:
        self.identifier = identifier
        self._sessions = sessions
        self._seen = seen

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        self._seen.append((self.identifier, self._sessions.manager.active_count))
        return await call_next(ctx)


class Additive(Extension):
    """An extension that only adds (no interceptor of its own)."""

    identifier = "test/additive"


async def test_the_lifespan_serves_tools_call_itself_and_gives_the_sdk_chain_back() -> None:
    app, sessions = build()
    before = tools_call_handler(app)
    assert sdk_interceptor_chain(before) == ([sessions], app._handle_call_tool)
    async with Client(app) as client:
        during = tools_call_handler(app)
        assert during == sessions.handle_tool_call and sdk_interceptor_chain(during) is None
        assert text_of(await client.call_tool("echo", {"text": "direct"})) == "direct"
        metrics = (await client.call_tool("session_metrics", {})).structured_content
        assert metrics is not None and metrics["tools"]["echo"]["completed"] == 1
    assert tools_call_handler(app) is before


async def test_other_extensions_interceptors_keep_their_places_around_the_session() -> None:
    seen: list[tuple[str, int]] = []
    sessions = SessionsExtension(settings())
    outer, inner = Recorder("test/outer", sessions, seen), Recorder("test/inner", sessions, seen)
    app: MCPServer[Any] = MCPServer(
        "ordered", extensions=[outer, Additive(), sessions, inner], lifespan=sessions.lifespan
    )
    app.add_tool(echo)
    async with Client(app) as client:
        # The chain now: the outer interceptor around the extension's own handler, which calls
        # a chain of the inner one around the SDK's handler.
        assert sdk_interceptor_chain(tools_call_handler(app)) == ([outer], sessions.handle_tool_call)
        assert sdk_interceptor_chain(sessions._next_handler) == ([inner], app._handle_call_tool)
        assert text_of(await client.call_tool("echo", {"text": "x"})) == "x"
    # As the SDK orders them (first listed outermost): the outer one before the session opens,
    # the inner one inside it; each once.
    assert seen == [("test/outer", 0), ("test/inner", 1)]
    assert sessions.manager.metrics().total_sessions_completed == 1


async def test_a_tools_call_handler_a_host_registered_is_left_alone() -> None:
    app, sessions = build()
    served: list[str] = []

    async def own_handler(ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> HandlerResult:
        served.append(params.name)
        return await app._handle_call_tool(ctx, params)

    app._lowlevel_server.add_request_handler("tools/call", CallToolRequestParams, own_handler)
    assert sessions.take_over_tool_calls(app) is None
    async with Client(app) as client:
        assert tools_call_handler(app) is own_handler
        assert text_of(await client.call_tool("echo", {"text": "mine"})) == "mine"
    assert served == ["echo"] and tools_call_handler(app) is own_handler


async def test_a_host_handler_calling_handle_tool_call_with_no_handler_is_told_what_to_pass() -> None:
    app, sessions = build()
    raised: list[str] = []

    async def own_handler(ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> HandlerResult:
        try:
            return await sessions.handle_tool_call(ctx, params)  # the take-over left this handler alone
        except RuntimeError as exc:
            raised.append(str(exc))
            raise

    app._lowlevel_server.add_request_handler("tools/call", CallToolRequestParams, own_handler)
    async with Client(app) as client:
        with pytest.raises(MCPError):
            await client.call_tool("session_metrics", {})
    assert raised == [
        "SessionsExtension.handle_tool_call needs a handler until take_over_tool_calls has run: pass handler=, "
        "the tools/call handler that runs the tool, or enter sessions.lifespan(app) first (it takes the server's "
        "tools/call over, unless a handler of your own serves it)"
    ]


class Observing(SessionsExtension):
    """A subclass that overrides the SDK hook itself: the take-over would skip it."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.intercepted: list[str] = []

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        self.intercepted.append(params.name)
        return await super().intercept_tool_call(params, ctx, call_next)


async def test_a_subclass_overriding_the_sdk_hook_keeps_the_chain_with_every_guarantee() -> None:
    sessions = Observing(settings(tool_timeouts={"hang_async": 0.2}))
    app: MCPServer[Any] = MCPServer("observed", extensions=[sessions], lifespan=sessions.lifespan)
    for fn in (echo, hang_async):
        app.add_tool(fn)
    async with Client(app) as client:
        assert sdk_interceptor_chain(tools_call_handler(app)) == ([sessions], app._handle_call_tool)
        assert text_of(await client.call_tool("echo", {"text": "seen"})) == "seen"
        assert code_of(await client.call_tool("hang_async", {})) == "timeout"
    assert sessions.intercepted == ["echo", "hang_async"]
    snapshot = sessions.manager.metrics()
    assert (snapshot.total_sessions_completed, snapshot.total_sessions_timeout) == (1, 1)


class AuditedSessions(SessionsExtension):
    """The README's subclass that observes calls through `handle_tool_call`, as written there."""

    audited: list[str]

    async def handle_tool_call(self, ctx, params, handler=None):  # type: ignore[no-untyped-def]
        self.audited.append(params.name)
        return await super().handle_tool_call(ctx, params, handler)


async def test_the_readme_s_handle_tool_call_override_sees_every_call_with_every_guarantee() -> None:
    # The take-over serves calls with the override, with (ctx, params) only: an override without
    # the `handler=None` default would fail every call with a TypeError.
    sessions = AuditedSessions(settings(tool_timeouts={"hang_async": 0.2}))
    sessions.audited = []
    app: MCPServer[Any] = MCPServer("audited", extensions=[sessions], lifespan=sessions.lifespan)
    for fn in (echo, hang_async):
        app.add_tool(fn)
    async with Client(app) as client:
        assert tools_call_handler(app) == sessions.handle_tool_call  # taken over, override and all
        assert text_of(await client.call_tool("echo", {"text": "audited"})) == "audited"
        assert code_of(await client.call_tool("hang_async", {})) == "timeout"
        assert (await client.call_tool("session_metrics", {})).structured_content is not None
    assert sessions.audited == ["echo", "hang_async", "session_metrics"]
    snapshot = sessions.manager.metrics()
    assert (snapshot.total_sessions_completed, snapshot.total_sessions_timeout) == (1, 1)


async def test_the_standalone_server_hears_of_each_call_reaching_the_session_layer() -> None:
    # Its stdio loop waits on this at stdin EOF; the take-over must not skip it.
    built = build_app(load_settings(DEMO_CONFIG))
    assert isinstance(built.sessions, _StandaloneSessions)
    heard: list[object] = []
    built.sessions.on_tool_call = heard.append
    async with Client(built.server) as client:
        assert tools_call_handler(built.server) == built.sessions.handle_tool_call
        assert text_of(await client.call_tool("echo", {"text": "heard"})) == "heard"
    assert len(heard) == 1 and heard[0] is not None
