"""A tool module that writes to stdout while it is imported and set up, as careless modules do.

Both a buffered `print` and a raw write to file descriptor 1: neither may reach the protocol
stream on stdio, nor the settings JSON of `--check-config`.
"""

import os
from collections.abc import Callable
from typing import Any

#: What the module writes at import, through `print` and straight to fd 1.
IMPORT_PRINT = "noisy_at_import: print while importing"
IMPORT_FD = "noisy_at_import: fd 1 while importing"
#: What its `setup(server)` hook writes.
SETUP_PRINT = "noisy_at_import: print in setup"

print(IMPORT_PRINT)  # noqa: T201 - the point of this fixture
os.write(1, f"{IMPORT_FD}\n".encode())


def whisper(text: str) -> str:
    """Return the text in lower case."""
    return text.lower()


def setup(server: Any) -> None:
    print(SETUP_PRINT)  # noqa: T201 - the point of this fixture


TOOLS: list[Callable[..., Any]] = [whisper]
