"""Where this package reaches into the SDK (`mcp` 2.x): the seams the extension hooks into.

Tier: MCP integration. Each seam is a part of the SDK this package depends on beyond its public
API, kept here so that an SDK upgrade has one place to check:

- `registry_lookup`: how to find a tool's registry entry by name (to tell sync tools from
  async ones, and hosted tools from unknown names); `tool_names`: the names of the tools
  registered (to check `[tools.NAME]` tables against, and to see what a module's hook adds);
- `sdk_interceptor_chain` and `intercepts`: recognising the `tools/call` handler that the SDK's
  `compose_tool_call_handler` built; `serve_tool_calls`: taking this extension's link out of it,
  and serving `tools/call` in its place (`SessionsExtension.take_over_tool_calls`);
- `listed_extensions`: the extensions a server was built with (to tell a host that wired the
  lifespan but left the extension out of `extensions=[...]`);
- `request_client`: who is calling (`SessionsExtension.client_of`), from the HTTP request's
  headers or the stream a connection talks over;
- `progress_session`: a copy of the request's `ServerSession` that sees the tool's progress;
- `argument_validation_failure`: recognising the SDK's answer to arguments that fail a tool's
  input schema (the SDK marks it only in its wording); `argument_errors`: what is wrong with
  them, from the SDK's own check (`FuncMetadata.validate_arguments`), for the answer's sentence;
- `screened_tool_registrations`: seeing each tool a tool module's `setup(server)` registers
  before the SDK does (`@server.tool()` goes through `MCPServer.add_tool`, and the SDK keeps the
  first tool of a name, only logging "Tool already exists" for the next);
- `end_listen_streams`: the graceful close of the `subscriptions/listen` streams, which the SDK
  itself never calls;
- (no code here) the advertised settings: `MCPServer` asks `Extension.settings()` once, at
  construction, and keeps the very dict it returns in its lowlevel server's `extensions` map,
  which `server/discover` reads at every request. `SessionsExtension` updates that dict in
  place on a reload; an SDK that copied it would advertise the limits of construction time
  (`test_the_advertised_limits_follow_a_reload_for_clients_that_connect_after_it` would say so).

Each one degrades rather than fails when the SDK's shape differs: no registry (every tool is of
unknown kind), no take-over (the SDK's chain keeps running), as the extension's docs say; no
graceful close of listen streams (they are cut when the server stops, as before).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from types import CodeType
from typing import Any

from mcp.server.context import HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, compose_tool_call_handler
from mcp.server.mcpserver.tools.tool_manager import ToolManager
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ListenHandler
from mcp_types import CallToolRequestParams
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from pydantic_core import ErrorDetails

#: A `tools/call` request handler, as the lowlevel server calls it: `handler(ctx, params)`.
ToolCallHandler = Callable[[ServerRequestContext[Any, Any], CallToolRequestParams], Awaitable[HandlerResult]]


def registry_lookup(app: Any) -> Callable[[str], Any] | None:
    """How to find a tool's registry entry in `app` (an `MCPServer`) by name; None if it has no
    registry to ask. That is its tool manager's `get_tool`; where that is the SDK's own, which
    returns `self._tools.get(name)`, the dict's `get` itself: the same answer without a Python
    call on every tool call."""
    tool_manager = getattr(app, "_tool_manager", None)
    tools = getattr(tool_manager, "_tools", None)
    sdk_own = isinstance(tool_manager, ToolManager) and type(tool_manager).get_tool is ToolManager.get_tool
    if sdk_own and type(tools) is dict:
        return tools.get
    get_tool: Callable[[str], Any] | None = getattr(tool_manager, "get_tool", None)
    return get_tool


def tool_names(app: Any) -> list[str]:
    """The names of the tools registered on `app` (an `MCPServer`), sorted; empty where its tool
    manager is not the SDK's own (a custom one may list them otherwise, or not at all)."""
    tool_manager = getattr(app, "_tool_manager", None)
    if not isinstance(tool_manager, ToolManager):
        return []
    return sorted(tool.name for tool in tool_manager.list_tools())


def listed_extensions(app: Any) -> list[Extension] | None:
    """The extensions `app` (an `MCPServer`) was built with (its `extensions=[...]`); None where
    it keeps them otherwise. `MCPServer` fixes them at construction, in `_extensions`."""
    listed = getattr(app, "_extensions", None)
    if not isinstance(listed, list):
        return None
    return listed


@contextmanager
def screened_tool_registrations(app: Any, admit: Callable[[Callable[..., Any], str | None], bool]) -> Iterator[None]:
    """While open, each tool registered on `app` (an `MCPServer`) through `add_tool`, and so
    through the `@app.tool()` decorator, which calls it, is first shown to `admit(fn, name)`
    (`name` as given, None for the function's own): registered if it returns True, dropped if
    not. A tool added to the tool manager directly is not seen (`tool_names` before and after
    finds it)."""
    register = app.add_tool

    def add_tool(fn: Callable[..., Any], name: str | None = None, *args: Any, **kwargs: Any) -> None:
        if admit(fn, name):
            register(fn, name, *args, **kwargs)

    app.add_tool = add_tool  # on the instance: the class's method is untouched
    try:
        yield
    finally:
        del app.add_tool


def intercepts(extension: Extension) -> bool:
    """Whether `extension` overrides `intercept_tool_call` (as the SDK decides it)."""
    return type(extension).intercept_tool_call is not Extension.intercept_tool_call


def _chain_code() -> CodeType | None:
    for const in compose_tool_call_handler.__code__.co_consts:
        if isinstance(const, CodeType) and const.co_name == "wrapped":
            return const
    return None  # pragma: no cover - an SDK that composes its chain differently


#: The code of the handler `compose_tool_call_handler` returns, to recognise the SDK's chain.
_CHAIN_CODE: CodeType | None = _chain_code()


def sdk_interceptor_chain(handler: object) -> tuple[list[Extension], ToolCallHandler] | None:
    """The extensions and the wrapped handler of a `tools/call` handler that the SDK's
    `compose_tool_call_handler` made; None for any other handler."""
    code = _CHAIN_CODE
    if code is None:  # pragma: no cover - see `_chain_code`
        return None
    names = code.co_freevars  # before the `is not` below, which would narrow `code` to Any | None
    if getattr(handler, "__code__", None) is not code:
        return None
    cells = dict(zip(names, getattr(handler, "__closure__", None) or (), strict=False))
    try:
        extensions = list(cells["extensions"].cell_contents)
        wrapped: ToolCallHandler = cells["handler"].cell_contents
    except (KeyError, ValueError, TypeError):  # pragma: no cover - a chain of another shape
        return None
    return extensions, wrapped


def serve_tool_calls(
    app: Any, extension: Extension, handler: ToolCallHandler
) -> tuple[ToolCallHandler, Callable[[], None]] | None:
    """Serve `app`'s (an `MCPServer`) `tools/call` requests with `handler`, in place of
    `extension`'s link in the interceptor chain the SDK composed; return what `handler` is to
    call next (the rest of the chain, down to the SDK's own handler) and what puts the chain
    back. None, with nothing changed, where `app`'s handler is not that chain (a handler
    someone else registered, recognised by its code), or `extension` is not on it once.

    The chain is rebuilt without `extension`'s link, the same order kept: the interceptors of
    the extensions listed before it run outside `handler`, those listed after it in what
    `handler` calls next. The lowlevel server's handler map (`add_request_handler`,
    `get_request_handler` and the entry's `params_type`) is the seam."""
    server = getattr(app, "_lowlevel_server", None)
    if server is None or not hasattr(server, "get_request_handler"):
        return None
    entry = server.get_request_handler("tools/call")
    chain = sdk_interceptor_chain(entry.handler) if entry is not None else None
    if chain is None:
        return None
    extensions, wrapped = chain
    mine = [i for i, other in enumerate(extensions) if other is extension]
    if len(mine) != 1:
        return None
    outer = [e for e in extensions[: mine[0]] if intercepts(e)]
    inner = [e for e in extensions[mine[0] + 1 :] if intercepts(e)]
    next_handler = compose_tool_call_handler(inner, wrapped) if inner else wrapped
    top = compose_tool_call_handler(outer, handler) if outer else handler
    server.add_request_handler("tools/call", entry.params_type, top)

    def give_back() -> None:
        current = server.get_request_handler("tools/call")
        if current is not None and current.handler is top:  # nobody replaced it since
            server.add_request_handler("tools/call", entry.params_type, entry.handler)

    return next_handler, give_back


def argument_validation_failure(text: str, tool: str) -> bool:
    """Whether `text`, the text of an error result of `tool`, is the SDK's answer to arguments
    that failed the tool's input schema (and not a failure inside the tool).

    mcp 2.x marks it only in its wording: `Tool.run` raises `ToolError(f"Error executing tool
    {name}: {exc}")` from the pydantic `ValidationError` of the tool's arguments model, which
    `func_metadata` names `<function name>Arguments` and whose text starts `N validation
    error(s) for <model>` and a newline; `MCPServer._handle_call_tool` returns that text as the
    result's one text block. Every other failure reads differently: a crash inside the tool is
    `Error executing tool <name>` alone (`UnexpectedToolError`, the cause kept off the wire), and a
    `ToolError` the tool raises on purpose has its own message after the prefix. `tool` must be
    registered under its function's name, as the session tools are. An SDK that words it
    differently makes this False, and such failures are then reported as internal errors.
    """
    name = re.escape(tool)
    pattern = rf"Error executing tool {name}: [1-9][0-9]* validation errors? for {name}Arguments\n"
    return re.match(pattern, text) is not None


def argument_errors(entry: Any, arguments: Mapping[str, Any] | None) -> list[ErrorDetails]:
    """What is wrong with `arguments` for the tool registry entry `entry`, as the SDK's own check
    of them finds (`FuncMetadata.validate_arguments`, which `Tool.run` calls): pydantic's error
    details, or [] if they pass (or the entry has no such check)."""
    validate = getattr(getattr(entry, "fn_metadata", None), "validate_arguments", None)
    if validate is None:
        return []
    try:
        validate(dict(arguments or {}))
    except ValidationError as exc:
        return exc.errors(include_url=False)
    return []


def progress_session(session: ServerSession, on_progress: Callable[[], bool]) -> ServerSession:
    """A copy of the request's `ServerSession` that calls `on_progress` whenever the tool reports
    progress (`Context.report_progress`, or a progress notification it sends itself), then
    forwards it if `on_progress` returned True: False drops it (the call has been answered, and
    progress may reference only operations in progress: a sync tool's abandoned thread reports on).
    The SDK hands the tool `ctx.session` from the context the interceptor passes on, so this is
    the seam where progress becomes visible, whether or not the client asked for progress
    notifications."""
    proxy = _ProgressSession.__new__(_ProgressSession)
    proxy.__dict__.update(session.__dict__)
    proxy._on_progress = on_progress
    return proxy


class _ProgressSession(ServerSession):
    _on_progress: Callable[[], bool]

    async def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        if self._on_progress():
            await super().report_progress(progress, total, message)

    async def send_progress_notification(
        self,
        progress_token: str | int,
        progress: float,
        total: float | None = None,
        message: str | None = None,
        related_request_id: str | None = None,
    ) -> None:
        if self._on_progress():
            await super().send_progress_notification(progress_token, progress, total, message, related_request_id)


def request_client(ctx: ServerRequestContext[Any, Any]) -> Hashable:
    """Who is calling, for `limits.max_sessions_per_client`.

    On streamable HTTP: the MCP session (`Mcp-Session-Id`, in the handshake era, where the SDK
    checks it); the stateless 2026-07-28 era has none (a header sent there is ignored), so there
    it is the credential (`Authorization`, kept only as a digest), else
    the peer's IP address (the port left out: one client's requests come from many ports; so
    every client behind one proxy or NAT is one client). Otherwise the stream the connection talks over: stdio is one
    client in either protocol era, and so is each in-process handshake-era client.

    The stream, not the `Connection`: in the 2026-07-28 era the SDK builds a `Connection`
    per request, sharing the stream's channel (`outbound`) among them. Where there is no
    channel (in-process 2026-era clients: every request is a connection of its own, on the
    SDK's one no-channel sentinel) the connection is all there is, so such clients are not
    told apart from their own earlier requests: each request is a client.
    """
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is not None:
        mcp_session = headers.get("mcp-session-id")
        # Only where the SDK checked it: it routes a request whose MCP-Protocol-Version names no
        # handshake-era version to the stateless 2026-07-28 path, which ignores the header (so
        # a made-up one per request would be a new client each time).
        version = headers.get("mcp-protocol-version")
        if mcp_session and (version is None or version in HANDSHAKE_PROTOCOL_VERSIONS):
            return ("mcp-session", mcp_session)
        credential = headers.get("authorization")
        if credential:
            return ("credential", hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest())
        peer = getattr(request, "client", None)
        if peer is not None:
            return ("http-peer", peer.host)
    connection = getattr(ctx.session, "_connection", None)
    if connection is None:
        return ("connection", ctx.session)
    if getattr(connection, "has_standalone_channel", False):
        return ("stream", connection.outbound)
    return ("connection", connection)


def end_listen_streams(app: Any) -> bool:
    """Close every open `subscriptions/listen` stream of `app` (an `MCPServer`) gracefully: each
    sends its buffered events, then its result as the last frame, so the client knows the stream
    ended on purpose. `MCPServer` serves the method with the SDK's `ListenHandler` on its
    lowlevel server and never closes it; a listen stream otherwise lasts until the transport
    cuts it. False if `app` serves `subscriptions/listen` otherwise (or not at all)."""
    lowlevel = getattr(app, "_lowlevel_server", None)
    get_request_handler = getattr(lowlevel, "get_request_handler", None)
    entry = get_request_handler("subscriptions/listen") if get_request_handler is not None else None
    handler = getattr(entry, "handler", None)
    if not isinstance(handler, ListenHandler):
        return False
    handler.close()
    return True
