"""A tool module whose `setup(server)` raises an exception of its own derived from `BaseException`
(not `Exception`)."""

from collections.abc import Callable
from typing import Any


class FixtureAbort(BaseException):
    """Not an `Exception`: `except Exception` lets it through."""


def fine(text: str) -> str:
    """A tool that would have been hosted."""
    return text


def setup(server: Any) -> None:
    raise FixtureAbort("no licence server")


TOOLS: list[Callable[..., Any]] = [fine]
