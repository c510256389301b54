"""A tool module whose `setup(server)` calls `sys.exit("no database")`."""

import sys
from collections.abc import Callable
from typing import Any


def query(sql: str) -> str:
    """Pretend to query."""
    return sql


def setup(server: Any) -> None:
    sys.exit("no database")


TOOLS: list[Callable[..., Any]] = [query]
