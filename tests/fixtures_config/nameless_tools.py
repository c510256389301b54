"""A tool module whose `TOOLS` holds callables with no name of their own: a lambda and a
`functools.partial`, which the SDK refuses to register."""

import functools
from collections.abc import Callable
from typing import Any


def scale(value: float, factor: float) -> float:
    """Multiply."""
    return value * factor


TOOLS: list[Callable[..., Any]] = [lambda x: x, functools.partial(scale, factor=2.0)]
