"""Logging for operators: one stderr handler, text or JSON lines, set from `[logging]`.

Tier: operations. `configure_logging` installs (or, on a config reload, replaces) the one
handler on the root logger, so the SDK's and uvicorn's records come out in the same format as
ours. It is for the standalone server, which owns its process's logging; an embedding host
keeps its own (`configured_here` tells the two apart, so a reload leaves a host's alone). In
text mode every record is one line (`TextFormatter` escapes control characters, which a
client's or a tool's text in a message may hold); only a traceback follows on lines of its own.
In JSON mode every record is one object per line with `ts`, `level`, `logger`, `message` and
the structured fields a record carries (a session end has `session_id`, `tool`, `state`,
`duration_seconds`, `reason`; a refusal has `code`, `tool`, `session_id`). In either format a
message longer than `MAX_MESSAGE_CHARS` is cut. Never logged: the admin token and the contents
of session metadata.

Example:
    ```python
    configure_logging(LoggingSettings(level="info", format="json"))
    ```
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from server.config import LoggingSettings
from server.errors import SessionError

logger = logging.getLogger("server.refusals")
#: The line that says where the streamable HTTP server serves (its URL). The standalone server
#: prints it at every `logging.level`: a deployment tuned to "warning" must still be told where
#: to connect (see `configure_logging`).
serving_logger = logging.getLogger("server.serving")

#: Structured fields copied from a record's `extra` into the JSON object.
FIELDS = ("session_id", "tool", "state", "duration_seconds", "reason", "code")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What could end or rewrite a line of text: the C0 and C1 control characters (newline, carriage
#: return, escape, ...), Unicode's line and paragraph separators, and the bidirectional
#: formatting characters (a right-to-left override shows the rest of a line reordered).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: What `json.dumps(ensure_ascii=False)` leaves raw that a reader splitting lines by Unicode's
#: rules (Python's `str.splitlines`, many log viewers) or a terminal acts on: the same, less
#: the C0 controls JSON always escapes. Only ever inside a JSON string, so `\uXXXX` is safe.
_JSON_RAW_CONTROL = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: A record's message (and a JSON record's `reason`) longer than this is cut, saying by how much.
#: A message can carry a client's text: a Host header the SDK refuses (60 KB of it fits one
#: request), the error a client releases a session with, a tool's exception. Whole, each request
#: could add that much to the log, and a client fill the disk at the rate it can send.
MAX_MESSAGE_CHARS = 8192


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}")


def one_line(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a newline as `\\n`,
    escape as `\\x1b`), so that it cannot end its line or start a forged one."""
    return _CONTROL.sub(_escape, text)


def clipped(text: str) -> str:
    """`text`, cut to `MAX_MESSAGE_CHARS` characters with a note of how many more there were."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    more = len(text) - MAX_MESSAGE_CHARS
    return f"{text[:MAX_MESSAGE_CHARS]}... [{more} more character{'' if more == 1 else 's'}]"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, one line per record: control characters in the record's line are escaped
    (`one_line`). A message can hold text from a client or a tool (the error of a released
    session, the SDK's multi-line validation errors, an unknown tool name), and in a text log a
    newline there would forge a record. Only a traceback keeps its own lines, after the record's."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clipped(record.message)
        return one_line(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": clipped(record.getMessage()),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                data[key] = clipped(value) if isinstance(value, str) else value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return _JSON_RAW_CONTROL.sub(_json_escape, json.dumps(data, ensure_ascii=False, default=str))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a reload replaces it and nothing else."""


def configured_here() -> bool:
    """Whether this process's logging was set up by `configure_logging` (its handler is on the
    root logger), as the standalone server does before it serves. Only then is the logging ours
    to change on a config reload; an embedding host that never called it keeps its own."""
    return any(isinstance(handler, _Handler) for handler in logging.getLogger().handlers)


def configure_logging(settings: LoggingSettings) -> None:
    """Send every record at `settings.level` or above to stderr, formatted as `settings.format`.

    For the standalone server (it changes process-wide logging): records skip what neither
    format shows (caller, thread and process), as the logging HOWTO's "Optimization" section
    suggests, since a session-end line is written for every call.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (documented in the logging HOWTO, "Optimization")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # Session-end lines have their own logger, off by default for embedding hosts (see
    # `server.session.end_logger`); the standalone server follows its configured level.
    logging.getLogger("server.sessions.ends").setLevel(settings.level.upper())
    # The URL line is shown at every level: the records of a logger with a level of its own reach
    # the root's handler whatever the root's level (only the handler's level, unset, would stop them).
    serving_logger.setLevel(logging.INFO)


def log_refusal(error: SessionError, tool: str | None = None) -> None:
    """A refused call of `tool` (default: the error's) at WARNING: its code and sentence (which
    never hold a token or metadata)."""
    if logger.isEnabledFor(logging.WARNING):
        tool = tool or error.tool
        logger.warning(
            "Refused %s (%s): %s",
            tool or "a call",
            error.code.value,
            error.message,
            extra={"code": error.code.value, "tool": tool, "session_id": error.session_id},
        )
