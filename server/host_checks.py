"""Setup-time checks of what a host hands the extension, each failing with an error that names the fix.

Tier: MCP integration, cold path. `SessionsExtension` runs these where the host passes things in
(its constructor, `apply_settings`, `add_exit_listener`, the lifespan's start), never on a call:
a wrong argument is refused there, before anything has changed, instead of surfacing later as an
`AttributeError` in a tool call or a listener that is never awaited.

Example:
    ```python
    settings = require_settings(value, "SessionsExtension()")  # the Settings, or a TypeError
    ```
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Mapping

from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

from server.config import Settings, ToolSettings
from server.sdk_seams import listed_extensions
from server.store_url import safe_url

#: How to build a `Settings` (what the TypeErrors below suggest).
_HOW = "load_settings(path) for a TOML file, load_settings() for the defaults and MCP_SESSIONS_* variables"


def kind(value: object) -> str:
    """`value`'s type, qualified by its module unless a builtin: `starlette.applications.Starlette`."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def require_settings(value: object, where: str) -> Settings:
    """`value` if it is a `Settings`; else a TypeError that says how to make one from it.

    `where` names what was called (`SessionsExtension()`, `apply_settings()`)."""
    if isinstance(value, Settings):
        return value
    if isinstance(value, str | os.PathLike):
        path = safe_url(repr(os.fspath(value)))
        fix = f"load the file first: load_settings({path}) (from server import load_settings)"
    elif isinstance(value, Mapping):
        fix = "build one from the mapping: Settings(**mapping), e.g. Settings(limits={'max_concurrent_sessions': 5})"
    elif isinstance(value, BaseModel) and (field := _settings_field(value)) is not None:
        shown = f"{{'TOOL_NAME': {type(value).__name__}(...)}}" if field == "tools" else f"{type(value).__name__}(...)"
        fix = f"wrap it: Settings({field}={shown})"
    else:
        fix = f"make one with {_HOW}, or Settings(...)"
    raise TypeError(f"{where} takes a Settings, got {kind(value)}{_shown(value)}; {fix}")


def _shown(value: object) -> str:
    """What of a wrongly passed `value` a message may show: a path, a mapping's keys, a plain
    value; never a settings model's or a mapping's values, nor a URL's password (the store URL
    may hold one)."""
    if isinstance(value, BaseModel):
        return ""  # its fields may hold the store URL
    if isinstance(value, Mapping):
        keys = ", ".join(repr(str(key))[:40] for key in list(value)[:8]) + (", ..." if len(value) > 8 else "")
        return f" with the keys {keys}" if value else " (empty)"
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    return f": {safe_url(repr(text))[:80]}"


def _settings_field(section: BaseModel) -> str | None:
    """The `Settings` field that holds sections of `section`'s type (`limits` for a LimitsSettings)."""
    for name, field in Settings.model_fields.items():
        if field.annotation is type(section):
            return name
    if isinstance(section, ToolSettings):
        return "tools"
    return None


def is_async_callable(fn: object) -> bool:
    """Whether calling `fn` makes a coroutine: an `async def` function or method, a partial of
    one, or an object whose `__call__` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False  # a plain function or method, or a class (calling it builds an instance)
    return inspect.iscoroutinefunction(inspect.getattr_static(type(fn), "__call__", None))


def require_server(app: object) -> None:
    """Refuse, for `SessionsExtension.lifespan(app)`, an `app` that is neither None nor an
    `MCPServer`: a Starlette app, the lowlevel server, a string. The extension reads the
    server's tool registry and serves its `tools/call`; with anything else it could do neither."""
    if app is None or isinstance(app, MCPServer):
        return
    raise TypeError(
        f"sessions.lifespan(app) takes the MCPServer the extension is installed in, got {kind(app)}: {app!r:.80}. "
        "Pass that MCPServer: MCPServer(..., lifespan=sessions.lifespan) does, and from your own lifespan "
        "(a Starlette app's included) enter sessions.lifespan(mcp_server), where mcp_server is the MCPServer "
        "whose app you mount; or enter sessions.lifespan() with no app, to run without the server's registry"
    )


def describe_server(app: object) -> str:
    """`app` for a message: "the MCPServer 'my-tools'", "a starlette.applications.Starlette", "no app"."""
    if app is None:
        return "no app (sessions.lifespan())"
    if isinstance(app, MCPServer):
        return f"the {type(app).__name__} {app.name!r}"
    return f"a {kind(app)}"


def warn_if_not_listed(extension: Extension, app: object, logger: logging.Logger) -> None:
    """Warn when `app`, an `MCPServer` whose lifespan runs `extension`'s, does not list
    `extension` in its `extensions=[...]`: it then contributes no tools and sees no call, so no
    call gets a session or a deadline. Only warned, not refused: a host may serve `tools/call`
    with the extension's `handle_tool_call` by its own means."""
    if not isinstance(app, MCPServer):
        return
    listed = listed_extensions(app)
    if listed is None or any(other is extension for other in listed):
        return  # an SDK that keeps them elsewhere: nothing to tell
    name = type(extension).__name__
    twin = next((other for other in listed if other.identifier == extension.identifier), None)
    if twin is not None:
        logger.warning(
            "The lifespan of %s runs a %s the server does not list: it lists another one (%r), so this "
            "one sees no call and its limits apply to nothing. Pass the same object to both: "
            "MCPServer(..., extensions=[sessions], lifespan=sessions.lifespan)",
            describe_server(app),
            name,
            twin,
        )
        return
    logger.warning(
        "The lifespan of %s runs a %s that is not in the server's extensions: its tool calls get no "
        "session and no deadline, and the session tools are missing. Add it: "
        "MCPServer(..., extensions=[sessions], lifespan=sessions.lifespan)",
        describe_server(app),
        name,
    )
