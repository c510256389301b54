"""A tool module that logs while it is imported and set up, before the server serves, and then
sets logging up for itself as a script would (`logging.basicConfig(force=True)` at DEBUG).

Its records must come out as `[logging]` says (level and format), as every other record does,
and the server's own logging stays as `[logging]` says.
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
    logging.basicConfig(level=logging.DEBUG, force=True)  # what a module written as a script may do


TOOLS: list[Callable[..., Any]] = [murmur]
