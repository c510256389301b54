"""A tool module whose `setup(server)` raises: the start would fail after the tools are registered."""

from collections.abc import Callable
from typing import Any


def fine(text: str) -> str:
    """A tool that would have been hosted."""
    return text


def setup(server: Any) -> None:
    raise KeyError("API_KEY")


TOOLS: list[Callable[..., Any]] = [fine]
