"""A tool module that reads stdin while it is imported and set up, as careless modules do.

On stdio, stdin is the client's stream of JSON-RPC messages: whatever the module reads there is
a message the server never sees. It reads a line through `sys.stdin` at import and raw bytes
from fd 0 in `setup(server)`; `stdin_read_at_startup` reports both, so a test can check through
the protocol itself that the module read nothing (end of file at once) and consumed no message.
"""

import json
import os
import sys
from collections.abc import Callable
from typing import Any

#: What a buffered read of `sys.stdin` gave while the module was imported.
READ_AT_IMPORT = sys.stdin.readline() if sys.stdin is not None else ""
#: What a raw read of fd 0 gave in `setup(server)`.
READ_IN_SETUP: list[str] = []


def stdin_read_at_startup() -> str:
    """What the module read from stdin while imported and set up, as JSON."""
    return json.dumps({"import": READ_AT_IMPORT, "setup": "".join(READ_IN_SETUP)})


def setup(server: Any) -> None:
    READ_IN_SETUP.append(os.read(0, 65536).decode("utf-8", errors="replace"))


TOOLS: list[Callable[..., Any]] = [stdin_read_at_startup]
