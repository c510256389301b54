"""A tool module whose tool `session_create` clashes with a management tool of the extension."""

from collections.abc import Callable
from typing import Any


def session_create() -> str:
    """Pretends to create a session."""
    return "not a session"


TOOLS: list[Callable[..., Any]] = [session_create]
