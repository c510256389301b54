"""Logging for operators: one stderr handler, text or JSON lines, set from `[logging]`.

Tier: operations. `configure_logging` installs (or, on a config reload, puts back: a new format,
or a handler something took off) the one handler on the root logger, so the SDK's and uvicorn's
records come out in the same format as ours. It is for the standalone server, which owns its
process's logging; an embedding host keeps its own (`configured_here` tells the two apart, so a
reload leaves a host's alone). In text mode every record is one line (`TextFormatter` escapes
control characters, which a client's or a tool's text in a message may hold); only a traceback
follows on lines of its own. In JSON mode every record is one object per line with `ts`,
`level`, `logger`, `message` and the structured fields a record carries (a session end has
`session_id`, `tool`, `state`, `duration_seconds`, `reason`; a refusal has `code`, `tool`,
`session_id`). In either format a message longer than `MAX_MESSAGE_CHARS` is cut. Never logged:
the admin token and the contents of session metadata.

The handler also rate-limits other libraries' records (`RepeatLimit`): one client could make
uvicorn or the SDK write a line or a traceback per request or connection, thousands a second.
Per logger and message (and exception, for a record with a traceback: each tool's crash is its
own), the first record in `REPEAT_SECONDS` is written and the ones like it are counted; the next
one written carries the count (`[and 1,234 more like this in the last 12 s]`), and counts still
pending are written when the handler is closed (`logging.shutdown`, at the exit) or replaced (a
reload). This package's own loggers (`server.*`, `tools.*`: a session's end, a
refusal) and asyncio's are never limited. `EventReport` does the same for one event of this
package's (a connection refused or cut off): one line per `REPORT_SECONDS` at most, with a count.
While the standalone HTTP server serves, the SDK's traceback for a client that went away mid-body
is a DEBUG line (`quiet_client_disconnects`).

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.requests import ClientDisconnect

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
        record.message = clipped(record.message) + repeats_note(record)
        return one_line(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": clipped(record.getMessage()) + repeats_note(record),
        }
        if record.__dict__.get("repeats"):
            data["repeats"] = record.__dict__["repeats"]
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                data[key] = clipped(value) if isinstance(value, str) else value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return _JSON_RAW_CONTROL.sub(_json_escape, json.dumps(data, ensure_ascii=False, default=str))


#: `RepeatLimit`'s period: a (logger, message) of another library writes one record per period.
REPEAT_SECONDS = 10.0
#: `RepeatLimit`: how many messages of one logger are told apart at once; past that, the logger's
#: other messages share one count (a message written with values in it that `template` does not
#: recognize differs with each value).
MESSAGES_PER_LOGGER = 20
#: The loggers `RepeatLimit` limits: those of the HTTP stack a client's requests reach (uvicorn,
#: the SDK, Starlette, sse-starlette), and their children. Not this package's own (each of their
#: per-event lines, a session's end, a refusal, is by design), nor the hosted tool modules' (their
#: lines are their authors' choice), nor asyncio's (filtering its accept-error records made its
#: accept loop, which logs and retries, spin faster).
LIMITED = ("uvicorn", "mcp", "starlette", "sse_starlette")
#: A logger's messages past `MESSAGES_PER_LOGGER`, counted as one.
_OTHER = object()


def limited(name: str) -> bool:
    """Whether records of the logger `name` are rate-limited by `RepeatLimit`."""
    return any(name == library or name.startswith(library + ".") for library in LIMITED)


@dataclass
class _Repeats:
    """One (logger, message)'s current period: when it began, and the records dropped since."""

    began: float
    dropped: int = 0
    #: The last record dropped (written, with the count of the others, if none follows).
    last: logging.LogRecord | None = None


class RepeatLimit:
    """Rate limit on the records of other libraries' loggers (see `limited`), per (logger name,
    message template and, for a record with a traceback, its exception: `kind`): the first record
    in a period of `period` seconds passes; those like it within the period are counted and
    dropped; the next one to pass after the period carries the count (`... [and 1,234 more like
    this in the last 12 s]`), and `pending()` gives the counts not yet written (the last record
    dropped of each, dated now, carrying the count of the others).

    One client can make uvicorn or the SDK write a line or a traceback per request or connection
    (`Invalid HTTP request received.` for garbage or a TLS handshake on the HTTP port, two upgrade
    warnings per request, a traceback per POST whose client went away mid-body, `Invalid Host
    header` per request): thousands of lines a second, megabytes of log. Not thread-safe: its
    handler calls it under its lock.
    """

    def __init__(
        self,
        period: float = REPEAT_SECONDS,
        per_logger: int = MESSAGES_PER_LOGGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.period = period
        self.per_logger = per_logger
        self.clock = clock
        self._periods: dict[tuple[str, object], _Repeats] = {}
        #: Messages told apart now, per logger (at most `per_logger`, `_OTHER` aside).
        self._messages: dict[str, int] = {}
        self._next_sweep = 0.0

    def admit(self, record: logging.LogRecord) -> logging.LogRecord | None:
        """The record to write for `record` (itself, or a copy carrying a count), or None to drop it."""
        if not limited(record.name):
            return record
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key = self._key(record)
        repeats = self._periods.get(key)
        if repeats is None:
            self._periods[key] = _Repeats(now)
            if key[1] is not _OTHER:
                self._messages[record.name] = self._messages.get(record.name, 0) + 1
            return record
        if now - repeats.began < self.period:
            repeats.dropped += 1
            repeats.last = record
            return None
        dropped, began = repeats.dropped, repeats.began
        self._periods[key] = _Repeats(now)
        return _carrying(record, dropped, now - began, key[1] is _OTHER)

    def pending(self) -> list[logging.LogRecord]:
        """The counts not yet written, each on the last record dropped; forgets them."""
        now, written = self.clock(), time.time()
        out = []
        for key, repeats in self._periods.items():
            if repeats.last is not None:
                record = _carrying(repeats.last, repeats.dropped - 1, now - repeats.began, key[1] is _OTHER)
                out.append(_dated(record, written))
        self._periods.clear()
        self._messages.clear()
        return out

    def _key(self, record: logging.LogRecord) -> tuple[str, object]:
        key = (record.name, kind(record))
        if key not in self._periods and self._messages.get(record.name, 0) >= self.per_logger:
            return (record.name, _OTHER)
        return key

    def _sweep(self, now: float) -> None:
        """Forget the periods over with nothing dropped (at most once a period): what a logger
        logged once is not kept for ever."""
        self._next_sweep = now + self.period
        for key, repeats in list(self._periods.items()):
            if repeats.dropped == 0 and now - repeats.began >= self.period:
                del self._periods[key]
                if key[1] is not _OTHER:
                    self._messages[key[0]] -= 1


#: A word of a message holding a digit: an id, a number, an address.
_NUMBERED = re.compile(r"\S*\d\S*")


def template(record: logging.LogRecord) -> str:
    """What `record` says without the values in it: its `msg` when the values are its `args`.
    A message written whole (an f-string: the SDK logs `f"Invalid Host header: {host}"`, and
    `f"Session {session_id} idle timeout"`) is cut at its first `": "`, and its words that hold a
    digit are `#`; any other `msg` (an exception logged as is) is its type's name."""
    if not isinstance(record.msg, str):
        return type(record.msg).__qualname__
    if record.args:
        return record.msg
    return _NUMBERED.sub("#", record.msg.split(": ", 1)[0])


#: `kind`: how many causes of a record's exception are followed, at most, to find where it began.
_CHAIN_LINKS = 8


#: `kind`: the messages whose arguments tell their records apart: the SDK's for a tool's crash,
#: whose argument is the tool's name (one of the server's tools). Not the others: a resource's
#: crash names the URI the client asked for, and would make one kind per URI, each written (a
#: client reading 25 ids used up the logger's kinds, and a tool's crash was never written).
_KEYED_BY_ARGS = frozenset({"Tool %r raised an unexpected exception"})
#: `kind`: how much of a record's arguments (their repr) tells it apart, at most.
_ARGS_CHARS = 200


def kind(record: logging.LogRecord) -> object:
    """What `RepeatLimit` counts `record` with: its `template`, and for a record with an exception
    the exception's type and the line of code that raised it, and for the SDK's record of a
    tool's crash the tool's name (`_KEYED_BY_ARGS`). The SDK logs every tool's crash with one
    template (`Tool %r raised an unexpected exception`): without the rest, the traceback of one
    tool's crash would hide every other tool's for the period, even two tools failing at one
    line of a library they share (`json.loads`). The exception is the first of its chain (its
    cause's cause ...); the same failure repeated (the same tool, the same exception type from
    the same line) is still one kind."""
    raised = record.exc_info[1] if record.exc_info else None
    if raised is None:
        return template(record)
    args = ""
    if isinstance(record.msg, str) and record.msg in _KEYED_BY_ARGS and isinstance(record.args, tuple):
        args = "|".join(str(arg)[:_ARGS_CHARS] for arg in record.args if isinstance(arg, str))
    # The SDK wraps a tool's exception (`UnexpectedToolError ... from exc`), raised at one line for
    # every tool: the failure is where the chain began.
    for _ in range(_CHAIN_LINKS):
        cause = raised.__cause__ or (None if raised.__suppress_context__ else raised.__context__)
        if cause is None:
            break
        raised = cause
    tb = raised.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
    return (template(record), args, type(raised).__module__, type(raised).__qualname__, where)


def _carrying(record: logging.LogRecord, more: int, seconds: float, other: bool) -> logging.LogRecord:
    """A copy of `record` whose message says `more` records like it (`other`: of its logger) were
    not written in the last `seconds`."""
    if more <= 0:
        return record
    copy = logging.makeLogRecord(record.__dict__)
    copy.repeats = more
    copy.repeats_note = (
        f" [and {more:,} more {'from this logger' if other else 'like this'} in the last {max(1, round(seconds))} s]"
    )
    return copy


def _dated(record: logging.LogRecord, created: float) -> logging.LogRecord:
    """A copy of `record` written at `created` (a wall-clock time), so that lines stay in order."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.created = created
    copy.msecs = int((created - int(created)) * 1000) + 0.0
    return copy


def repeats_note(record: logging.LogRecord) -> str:
    """What a record carrying a `RepeatLimit` count adds to its message ("" for any other)."""
    note = record.__dict__.get("repeats_note")
    return note if isinstance(note, str) else ""


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a reload replaces it and nothing else; limits
    other libraries' repeated records (`RepeatLimit`), and writes the counts left when closed
    (by `logging.shutdown` at the exit) or replaced."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.repeats = RepeatLimit()

    def handle(self, record: logging.LogRecord) -> bool:
        passed: object = self.filter(record)
        if not passed:
            return False
        if isinstance(passed, logging.LogRecord):
            record = passed  # Python 3.12: a filter may return the record to handle instead
        self.acquire()
        try:
            admitted = self.repeats.admit(record)
            if admitted is not None:
                self.emit(admitted)
        finally:
            self.release()
        return True

    def write_pending(self) -> None:
        """Write the counts of records dropped and not yet told."""
        self.acquire()
        try:
            for record in self.repeats.pending():
                self.emit(record)
        finally:
            self.release()

    def close(self) -> None:
        self.write_pending()
        super().close()


#: `write_pending_at_exit`: how long a forced exit waits, at most, for the counts to be written.
EXIT_WRITE_SECONDS = 1.0


def write_pending_at_exit(timeout: float = EXIT_WRITE_SECONDS) -> None:
    """For an exit that runs no `logging.shutdown` (`os._exit`): write this module's pending
    counts of repeated records and flush stderr, waiting at most `timeout` seconds. Done in a
    thread of its own, joined with that bound: a stuck tool's thread may hold a log handler's
    lock for good (its own handler to a collector that is down, say), or stderr may be a full
    pipe nobody reads, and such an exit must never wait for either. `logging.shutdown` takes
    every handler's lock: a forced exit that called it hung until SIGKILL."""

    def write() -> None:
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, _Handler):
                handler.write_pending()
        if sys.stderr is not None:
            sys.stderr.flush()

    writer = threading.Thread(target=write, name="mcp-log-exit", daemon=True)
    writer.start()
    writer.join(timeout)


def configured_here() -> bool:
    """Whether this process's logging was set up by `configure_logging` (its handler is on the
    root logger), as the standalone server does before it serves. Only then is the logging ours
    to change on a config reload; an embedding host that never called it keeps its own."""
    return any(isinstance(handler, _Handler) for handler in logging.getLogger().handlers)


def _formatter_class(settings: LoggingSettings) -> type[logging.Formatter]:
    return JsonFormatter if settings.format == "json" else TextFormatter


def _replaceable(handler: logging.Handler) -> bool:
    """A root handler `configure_logging` takes off: its own, or a plain `StreamHandler` (what
    `logging.basicConfig` adds). A handler of another class (a file's, say) is left where it is."""
    return isinstance(handler, _Handler) or type(handler) is logging.StreamHandler


def logging_drift(settings: LoggingSettings) -> list[str]:
    """How the process's logging has drifted from what `configure_logging(settings)` set up, in
    words (empty if it has not): its handler gone from the root logger (replaced, as
    `logging.basicConfig(force=True)` does, or removed), a handler added that writes every record
    again, the root logger's level changed. For a reload to say why it applies `[logging]` again."""
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _Handler)]
    plain = [handler for handler in root.handlers if type(handler) is logging.StreamHandler]
    drift = []
    if not ours:
        drift.append(
            "something had replaced its handler on the root logger"
            if plain
            else "something had removed its handler from the root logger"
        )
    else:
        if len(ours) + len(plain) > 1:
            extra = len(ours) + len(plain) - 1
            drift.append(f"something had added {extra} handler(s) to the root logger, writing every record again")
        if not any(type(handler.formatter) is _formatter_class(settings) for handler in ours):
            drift.append("something had changed its handler's format")
    level = settings.level.upper()
    if root.level != logging.getLevelName(level):
        drift.append(f"something had set the root logger's level to {logging.getLevelName(root.level)}, not {level}")
    return drift


def configure_logging(settings: LoggingSettings) -> None:
    """Send every record at `settings.level` or above to stderr, formatted as `settings.format`.

    For the standalone server (it changes process-wide logging): records skip what neither
    format shows (caller, thread and process), as the logging HOWTO's "Optimization" section
    suggests, since a session-end line is written for every call. Idempotent: called again (a
    reload does, every time), it keeps its handler if that already writes `settings.format` to
    stderr (its counts of repeated records with it), and puts back whatever drifted (see
    `logging_drift`).
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (documented in the logging HOWTO, "Optimization")
    root = logging.getLogger()
    formatter = _formatter_class(settings)
    kept: _Handler | None = None
    for handler in list(root.handlers):
        if not _replaceable(handler):
            continue
        if (
            kept is None
            and isinstance(handler, _Handler)
            and type(handler.formatter) is formatter
            and handler.stream is sys.stderr
        ):
            kept = handler
            continue
        root.removeHandler(handler)
        if isinstance(handler, _Handler):
            handler.write_pending()  # in the old format, before the new one takes over
    if kept is None:
        handler = _Handler(sys.stderr)
        handler.setFormatter(formatter())
        root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # Session-end lines have their own logger, off by default for embedding hosts (see
    # `server.session.end_logger`); the standalone server follows its configured level.
    logging.getLogger("server.sessions.ends").setLevel(settings.level.upper())
    # The URL line is shown at every level: the records of a logger with a level of its own reach
    # the root's handler whatever the root's level (only the handler's level, unset, would stop them).
    serving_logger.setLevel(logging.INFO)


def capture_warnings() -> None:
    """Have Python's warnings logged (`logging.captureWarnings`: the `py.warnings` logger), in the
    configured format like every record, without the newline `warnings.formatwarning` ends them
    with (a text line ended in a stray `\n`)."""
    logging.captureWarnings(True)
    warned = logging.getLogger("py.warnings")
    if _strip_warning_end not in warned.filters:
        warned.addFilter(_strip_warning_end)


def _strip_warning_end(record: logging.LogRecord) -> bool:
    if isinstance(record.msg, str) and not record.args:  # logging logs the formatted warning as its msg
        record.msg = record.msg.rstrip("\n")
    return True


#: `EventReport`'s period: one line per this many seconds at most.
REPORT_SECONDS = 10.0


class EventReport:
    """At most one log line per `period` about an event that can come thousands of times a
    second (a connection refused, or cut off): the first at once (`first()`); those within
    `period` of the last line counted, and told as one line (`more(count)`) by `flush()` or by the
    first of them past the period. Thread-safe.

    `note()` tells its caller when a count starts, and how long until it is due: a caller with an
    event loop flushes it then (the count of a flood is told every period, while it lasts); one
    without leaves it to the next event past the period, or to the `flush()` at its stop.
    """

    def __init__(
        self,
        log: logging.Logger,
        level: int,
        first: Callable[[], str],
        more: Callable[[int], str],
        period: float = REPORT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._level = level
        self._first = first
        self._more = more
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._unreported = 0
        self._last_line: float | None = None

    def note(self) -> float | None:
        """One more event: written now, or counted. For the first one counted since the last line,
        the seconds until its count is due (`flush()` it then); else None."""
        with self._lock:
            now = self._clock()
            last = self._last_line
            if last is not None and now - last < self.period:
                self._unreported += 1
                return self.period - (now - last) if self._unreported == 1 else None
            count, self._unreported, self._last_line = self._unreported, 0, now
        # A count left over (nobody flushed it) is told with this one, else this one is the first.
        self._log.log(self._level, "%s", self._more(count + 1) if count else self._first())
        return None

    def flush(self) -> None:
        """Write the count not yet told, if any (at the end of a period, or at the stop)."""
        with self._lock:
            count, self._unreported = self._unreported, 0
            if count:
                self._last_line = self._clock()
        if count:
            self._log.log(self._level, "%s", self._more(count))

    def close(self) -> None:
        """Write the count not yet told; from now on, every event is written as it comes (after a
        server's stop there are few, and nobody would flush a count)."""
        self.flush()
        self.period = 0.0


#: The SDK's logger of its streamable HTTP transport (`quiet_client_disconnects`).
SDK_HTTP_LOGGER = "mcp.server.streamable_http"


#: The SDK's record of a POST it could not handle (`mcp.server.streamable_http`). Only this one is
#: a client's doing when it comes with a ClosedResourceError: the SDK's others with one (its message
#: router's) tell of the server's end of a session.
_SDK_POST_FAILED = "Error handling POST request"


class _ClientDisconnects(logging.Filter):
    """Turns the SDK's ERROR and traceback for a POST whose client went away before its body had
    arrived into a DEBUG line: the client's doing, not the server's, and as often the connection
    guard's (`server.http_connections`: a request not sent in time is cut off, and that is
    reported there). Likewise for a message delivered as its client ended its session."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ClientDisconnect):
            said = "A client went away before sending its whole request (%s)"
        elif isinstance(exc, anyio.ClosedResourceError) and record.msg == _SDK_POST_FAILED:
            # Its session's streams closed as the request was delivered: the client ended the
            # session (its DELETE) right after a message it sent (a cancel, say), answered already.
            said = "A client's message came as the client ended its session (%s)"
        else:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = said, (record.getMessage(),)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_client_disconnects() -> Callable[[], None]:
    """Install `_ClientDisconnects` on the SDK's transport logger (the standalone HTTP server
    does, while it serves); the function that removes it."""
    sdk = logging.getLogger(SDK_HTTP_LOGGER)
    quiet = _ClientDisconnects()
    sdk.addFilter(quiet)
    return lambda: sdk.removeFilter(quiet)


def log_refusal(error: SessionError) -> None:
    """A refused call (of the error's tool) at WARNING: its code and sentence (which never hold
    a token or metadata)."""
    if logger.isEnabledFor(logging.WARNING):
        tool = error.tool
        logger.warning(
            "Refused %s (%s): %s",
            tool or "a call",
            error.code.value,
            error.message,
            extra={"code": error.code.value, "tool": tool, "session_id": error.session_id},
        )
