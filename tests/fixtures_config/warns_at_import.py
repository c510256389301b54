"""A tool module that makes Python warnings: one while it is imported, and in each call (its own,
and a coroutine it never awaits). They go to stderr in the `[logging]` format, as log records."""

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

#: What the module warns of at import, and in a call.
IMPORT_WARNING = "warns_at_import: warning while importing"
CALL_WARNING = "warns_at_import: warning in a call"

warnings.warn(IMPORT_WARNING, UserWarning, stacklevel=1)


def caution(text: str) -> str:
    """Return the text, with a warning and a coroutine never awaited."""
    warnings.warn(CALL_WARNING, UserWarning, stacklevel=1)
    asyncio.sleep(0)  # type: ignore[unused-coroutine]  # never awaited: Python warns when it is collected
    return text


TOOLS: list[Callable[..., Any]] = [caution]
