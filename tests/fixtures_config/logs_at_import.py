"""A tool module that logs while it is imported and set up, before the server serves.

Its records must come out as `[logging]` says (level and format), as every other record does.
"""

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("logs_at_import")

#: What the module logs at import: an INFO line, and a WARNING on two lines.
IMPORT_INFO = "logs_at_import: info while importing"
IMPORT_WARNING = "logs_at_import: warning while importing\nsecond line"
#: What its `setup(server)` hook logs.
SETUP_WARNING = "logs_at_import: warning in setup"

log.info(IMPORT_INFO)
log.warning(IMPORT_WARNING)


def murmur(text: str) -> str:
    """Return the text as it is."""
    return text


def setup(server: Any) -> None:
    log.warning(SETUP_WARNING)


TOOLS: list[Callable[..., Any]] = [murmur]
