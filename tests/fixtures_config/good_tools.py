"""A valid tool module: `TOOLS` is a list of functions with names no one else uses."""

from collections.abc import Callable
from typing import Any


def shout(text: str) -> str:
    """Return the text in capitals."""
    return text.upper()


TOOLS: list[Callable[..., Any]] = [shout]
