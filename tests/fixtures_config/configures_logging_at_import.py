"""A tool module that sets logging up for itself at import, as a script would
(`logging.basicConfig(force=True)` at DEBUG), and logs in its `setup(server)` hook: what comes
after its import (another module's import, the SDK's server being built, the hooks) must still log
as `[logging]` says."""

import logging
from collections.abc import Callable
from typing import Any

logging.basicConfig(level=logging.DEBUG, force=True)
log = logging.getLogger("configures_logging_at_import")

#: What its hook logs: an INFO line and a WARNING.
SETUP_INFO = "configures_logging_at_import: info in setup"
SETUP_WARNING = "configures_logging_at_import: warning in setup"


def whisper(text: str) -> str:
    """Return the text in lower case."""
    return text.lower()


def setup(server: Any) -> None:
    log.info(SETUP_INFO)
    log.warning(SETUP_WARNING)


TOOLS: list[Callable[..., Any]] = [whisper]
