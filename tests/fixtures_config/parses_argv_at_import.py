"""A tool module that parses the command line while it is imported, as scripts turned into modules
do: argparse exits (status 2) on the server's own arguments, which it does not know."""

import argparse
from collections.abc import Callable
from typing import Any

OPTIONS = argparse.ArgumentParser(prog="parses_argv_at_import").parse_args()


def noop() -> str:
    """Never hosted."""
    return ""


TOOLS: list[Callable[..., Any]] = [noop]
