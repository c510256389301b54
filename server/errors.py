"""Error codes and the one exception the session layer raises for a refused or failed request.

Tier: runtime foundation. The manager raises `SessionError`; `error_result` turns it into a
tool result with `isError`, a sentence a model can act on, and the machine-readable error in
`_meta` (see `ERROR_META_KEY`). Nothing here knows about MCP transports.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from mcp_types import CallToolResult, TextContent

ERROR_META_KEY = "io.github.mcp-session-manager/error"
EXTENSION_ID = "io.github.mcp-session-manager/sessions"
#: How many characters of a caller's string (an id, a value) a refusal's sentence quotes.
QUOTE_CHARS = 80


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text`, or its first `limit` characters and "…" when it is longer: a caller's string quoted
    in a refusal (which is also logged) must not make the sentence as long as the string."""
    return text if len(text) <= limit else text[:limit] + "…"


#: At most this many names are listed in a message: a server may host thousands of tools.
LISTED_NAMES = 20


def list_names(names: Sequence[str], limit: int = LISTED_NAMES) -> str:
    """`names` joined by commas; past `limit` of them, the first `limit` and how many more (a
    problem or warning naming every one of 5,000 tools would bury what it says)."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... and {len(names) - limit:,} more of {len(names):,}"


def describe(exc: BaseException) -> str:
    """`Type: text` of what a tool raised, for a session's error reason and the log. Never
    raises: a session must end even when the exception's own `__str__` fails."""
    try:
        text = str(exc)
    except Exception as broken:  # noqa: BLE001 - the tool's exception, not ours, is the story
        text = f"(its text could not be read: {type(broken).__name__})"
    return f"{type(exc).__name__}: {text}"


class ErrorCode(StrEnum):
    """The machine-readable reason of a refusal or failure: `code` in a tool error result's `_meta`
    under `io.github.mcp-session-manager/error` (see `ERROR_META_KEY`)."""

    TIMEOUT = "timeout"
    CAPACITY_EXCEEDED = "capacity_exceeded"
    METADATA_TOO_LARGE = "metadata_too_large"
    SHUTTING_DOWN = "shutting_down"
    UNKNOWN_SESSION = "unknown_session"
    ALREADY_RELEASED = "already_released"
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHORIZED = "unauthorized"
    NOT_RUNNING = "not_running"
    #: Cluster mode: the shared session store (Redis) cannot be reached; the call was not run.
    STORE_UNAVAILABLE = "store_unavailable"
    #: A session tool failed for a reason that is not its arguments (an unexpected exception
    #: inside it); the server's log has the details.
    INTERNAL_ERROR = "internal_error"


class SessionError(Exception):
    """A refusal or failure with a stable code, a human message, and what it concerns."""

    def __init__(
        self, code: ErrorCode, message: str, *, session_id: str | None = None, tool: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.session_id = session_id
        self.tool = tool

    def to_meta(self) -> dict[str, Any]:
        """The wire form stored under `ERROR_META_KEY` in a result's `_meta`."""
        data: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.session_id is not None:
            data["session_id"] = self.session_id
        if self.tool is not None:
            data["tool"] = self.tool
        return data


def result_text(result: object) -> str:
    """The text blocks of a tool result, joined with spaces ("" if it has none)."""
    content = getattr(result, "content", None) or []
    return " ".join(block.text for block in content if isinstance(block, TextContent))


def error_result(error: SessionError) -> CallToolResult:
    """A tool result for a refusal or failure: `isError`, a sentence, the code in `_meta`."""
    return CallToolResult(
        content=[TextContent(type="text", text=error.message)],
        is_error=True,
        _meta={ERROR_META_KEY: error.to_meta()},
    )
