"""A tool module whose `TOOLS` is empty and that has no `setup`: it hosts nothing (a list left
empty by mistake, say). Valid, but noted."""

from collections.abc import Callable
from typing import Any


def forgotten(text: str) -> str:
    """A tool nobody listed."""
    return text


TOOLS: list[Callable[..., Any]] = []
