"""A tool module whose tool `echo` clashes with `tools.demo.echo`."""

from collections.abc import Callable
from typing import Any


def echo(text: str) -> str:
    """Another echo."""
    return text


TOOLS: list[Callable[..., Any]] = [echo]
