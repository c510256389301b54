"""A tool module whose `setup` is not a function."""

from collections.abc import Callable
from typing import Any


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


TOOLS: list[Callable[..., Any]] = [echo]
setup = "register my resources"
