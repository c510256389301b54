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

import os
from collections.abc import Mapping

from pydantic import BaseModel

from server.config import Settings, ToolSettings

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
        fix = f"load the file first: load_settings({os.fspath(value)!r}) (from server import load_settings)"
    elif isinstance(value, Mapping):
        fix = "build one from the mapping: Settings(**mapping), e.g. Settings(limits={'max_concurrent_sessions': 5})"
    elif isinstance(value, BaseModel) and (field := _settings_field(value)) is not None:
        shown = f"{{'TOOL_NAME': {type(value).__name__}(...)}}" if field == "tools" else f"{type(value).__name__}(...)"
        fix = f"wrap it: Settings({field}={shown})"
    else:
        fix = f"make one with {_HOW}, or Settings(...)"
    raise TypeError(f"{where} takes a Settings, got {kind(value)}: {value!r:.80}; {fix}")


def _settings_field(section: BaseModel) -> str | None:
    """The `Settings` field that holds sections of `section`'s type (`limits` for a LimitsSettings)."""
    for name, field in Settings.model_fields.items():
        if field.annotation is type(section):
            return name
    if isinstance(section, ToolSettings):
        return "tools"
    return None
