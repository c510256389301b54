"""The process's stdin and stdout, kept for protocol messages on the stdio transport.

Tier: application wiring (used by `server.cli` and `server.app.serve_stdio`). `divert_stdout`
and `claim_stdin` take fd 1 and fd 0 for the wire before any tool module is imported, so that
nothing a tool prints or reads touches the protocol stream; `StdinLines` reads the client's
lines in a daemon thread that a shutdown never waits for, and `StdoutLines` writes the answers
in one, which a client that stops reading cannot hold at the exit; `Outstanding` tracks the
requests read and not yet answered.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import anyio
import anyio.from_thread
import anyio.lowlevel
from mcp.shared.dispatcher import as_request_id, coerce_request_id
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorData, jsonrpc_message_adapter
from mcp_types.jsonrpc import JSONRPCError, JSONRPCResponse
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

logger = logging.getLogger(__name__)


def unreadable_line_error(exc: Exception) -> JSONRPCError:
    """The protocol error for a line from the client that the SDK could not read as a JSON-RPC
    message (`exc`, what its reader raised). The SDK drops such a line with a debug log, and its
    client would wait for an answer forever: JSON-RPC answers it with a protocol error.

    The answer carries the request's id where it can be read, else null: so the client hears at
    once which request was wrong. It can be read from a request that is JSON but not JSON-RPC (its
    method not a string, say), from one whose only fault is an integer of more digits than Python
    turns into a number (`sys.get_int_max_str_digits()`, 4300 by default; in metadata, say): such
    a line of up to `MAX_REREAD_CHARS` characters is read again with that number left out; and from one that
    nests deeper than the SDK's reader goes (`MAX_NESTING`), whose top level is scanned for it."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    invalid = next((error for error in errors if error["type"] == "json_invalid"), None)
    request_id = None
    if invalid is None and errors:
        code, message = INVALID_REQUEST, "Invalid Request: the line is JSON but not a JSON-RPC 2.0 message"
        # A request whose id could be read (its method is what is wrong, say) is answered with it.
        request_id = next(
            (
                as_request_id(error["input"].get("id"))
                for error in errors
                if isinstance(error.get("input"), dict) and "method" in error["input"]
            ),
            None,
        )
    elif invalid is not None and "number out of range" in invalid["msg"]:
        request_id = _id_despite_a_huge_number(invalid.get("input"))
        code = INVALID_PARAMS
        message = (
            f"Invalid params: a number in the message has more than {sys.get_int_max_str_digits()} digits, more "
            "than this server reads; send such a number as a string"
        )
    elif invalid is not None and _UNPAIRED_ESCAPE.search(invalid["msg"]):
        # Left here only when too long to read again (see `read_despite_unpaired_surrogates`), or
        # no JSON for another reason too: its id from the top level, as for a deep line.
        request_id = _id_of_a_deep_line(invalid.get("input"))
        code = PARSE_ERROR
        message = (
            "Parse error: the message holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff without its "
            "pair), which is no text; this server reads such a message, with U+FFFD in the surrogate's place, "
            f"only up to {MAX_REREAD_CHARS:,} characters"
        )
    elif invalid is not None and "recursion limit exceeded" in invalid["msg"]:
        request_id = _id_of_a_deep_line(invalid.get("input"))
        code = PARSE_ERROR
        message = (
            f"Parse error: the message nests more than {MAX_NESTING} levels deep (objects and arrays, its own "
            "included), more than this server reads"
        )
    else:
        code, message = PARSE_ERROR, "Parse error: the line is not JSON"
    logger.warning("Unreadable message from the client: %s", message)
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


#: Lines longer than this many characters (1 MiB of ASCII) are not read again, for their id or
#: with their lone surrogates replaced (the re-read runs on the event loop).
MAX_REREAD_CHARS = 1024 * 1024

#: What the SDK's reader (pydantic-core's JSON parser) says of a `\\u` escape of a lone UTF-16
#: surrogate: a low one ("lone leading surrogate"), or a high one with no escape after it
#: ("unexpected end of hex escape").
_UNPAIRED_ESCAPE = re.compile(r"lone leading surrogate|unexpected end of hex escape")


def read_despite_unpaired_surrogates(exc: Exception) -> SessionMessage | Exception:
    """The message of a line the SDK's reader refused (`exc`) only for a `\\u` escape of a lone
    UTF-16 surrogate (`"\\udcff"`), read with U+FFFD in each such surrogate's place; else the
    exception to answer (`exc`, or what the line raised once repaired: see `unreadable_line_error`).

    Such a line is JSON (RFC 8259's grammar allows the escape), and clients write it: Python's
    `json.dumps` for a file name `os.fsdecode` made, JavaScript's `JSON.stringify` for a string
    cut inside an emoji. The SDK's reader refuses it, and its request would be answered only with
    a parse error, id null. The replacement is what this server does to invalid UTF-8 in a line,
    and to lone surrogates in its own answers (`WireSafe`); a warning says so. Lines of more
    than `MAX_REREAD_CHARS` characters are not read again (the re-read runs on the event loop)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    invalid = next((error for error in errors if error["type"] == "json_invalid"), None)
    if invalid is None or not _UNPAIRED_ESCAPE.search(invalid["msg"]):
        return exc
    line = invalid.get("input")
    if not isinstance(line, str) or len(line) > MAX_REREAD_CHARS:
        return exc
    try:
        data = json.loads(line)  # Python's reader takes lone surrogates (as str holds them)
    except (ValueError, RecursionError):
        return exc  # no JSON for another reason too
    cleaned, replaced = _without_surrogates(data)
    if not replaced:
        return exc
    try:
        message = jsonrpc_message_adapter.validate_json(json.dumps(cleaned, ensure_ascii=False), by_name=False)
    except ValidationError as again:
        return again  # JSON, but no JSON-RPC message: answered as such
    logger.warning(
        "%s from the client held %s lone UTF-16 surrogate escape(s) (\\ud800 to \\udfff without its pair), "
        "which are no text: read with U+FFFD in their place",
        _what(message),
        replaced,
    )
    return SessionMessage(message)


def _id_despite_a_huge_number(line: object) -> str | int | None:
    """The `id` of a JSON-RPC request whose only fault is an integer too long to convert; None for
    anything else (a response or a notification is not answered), or a line too long to re-read."""
    if not isinstance(line, str | bytes) or len(line) > MAX_REREAD_CHARS:
        return None
    limit = sys.get_int_max_str_digits()
    try:
        message = json.loads(line, parse_int=lambda digits: int(digits) if len(digits) <= limit else None)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None  # a response to the server's own request, say: its id is not ours to answer
    return as_request_id(message.get("id"))


#: How deep a message on stdio may nest (objects and arrays, the message's own object included):
#: the SDK's stdio reader (pydantic-core's JSON parser) refuses a line nesting deeper (it reads
#: one level more only when the deepest object or array is empty).
MAX_NESTING = 200

_SPACE = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: A stretch of a nested value with no string, object or array in it.
_PLAIN = re.compile(r'[^"\[\]{}]+')


#: `_id_of_a_deep_line` reads no further into a line than this: skipping nested values runs in
#: Python, on the event loop (up to about 1 s a MiB: some 50 ms for the worst line of this
#: length). A client writes `id` and `method` first.
MAX_DEEP_SCAN_CHARS = 64 * 1024


def _id_of_a_deep_line(line: object) -> str | int | None:
    """The `id` of a JSON-RPC request nesting deeper than `MAX_NESTING`, read from its top level
    without recursion (the nested values are skipped over, not read) until its `id` and `method`
    are found, within its first `MAX_DEEP_SCAN_CHARS` characters; None for anything else (a
    response or a notification is not answered)."""
    if isinstance(line, bytes):
        line = line[: MAX_DEEP_SCAN_CHARS * 4].decode("utf-8", "ignore")
    if not isinstance(line, str):
        return None
    line = line[:MAX_DEEP_SCAN_CHARS]
    decoder = json.JSONDecoder()
    members: dict[str, object] = {}
    at = _skip(_SPACE, line, 0)
    if line[at : at + 1] != "{":
        return None
    at += 1
    while True:
        at = _skip(_SPACE, line, at)
        key = _STRING.match(line, at)
        if key is None:
            return None
        at = _skip(_SPACE, line, key.end())
        if line[at : at + 1] != ":":
            return None
        at = _skip(_SPACE, line, at + 1)
        if line[at : at + 1] in ("{", "["):
            end = _past_nested_value(line, at)
            if end is None:
                return None
            at = end
        else:
            try:
                members[json.loads(key.group())], at = decoder.raw_decode(line, at)
            except ValueError:
                return None
        if "id" in members and "method" in members:
            break
        at = _skip(_SPACE, line, at)
        if line[at : at + 1] == "}":
            break
        if line[at : at + 1] != ",":
            return None
        at += 1
    if not isinstance(members.get("method"), str):
        return None  # a response to the server's own request, say: its id is not ours to answer
    return as_request_id(members.get("id"))


def _skip(pattern: re.Pattern[str], line: str, at: int) -> int:
    """Where the match of `pattern` at `at` in `line` ends (`at` if none)."""
    match = pattern.match(line, at)
    return at if match is None else match.end()


def _past_nested_value(line: str, at: int) -> int | None:
    """Where the object or array beginning at `at` ends, found by counting brackets outside
    strings (in a loop: it nests too deeply for a recursive reader); None if it does not end."""
    depth = 0
    while at < len(line):
        char = line[at]
        if char == '"':
            string = _STRING.match(line, at)
            if string is None:
                return None
            at = string.end()
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return at + 1
        else:
            at = _skip(_PLAIN, line, at)  # `char` is none of `"{}[]`: this moves on
            continue
        at += 1
    return None


class WireSafe:
    """A message for the SDK's stdio writer (which calls `model_dump_json` on it) that can be
    written even when it holds text that is not valid Unicode: a lone surrogate, which a tool
    gets from `os.fsdecode` or `os.listdir` for a file name that is not UTF-8. pydantic refuses
    to encode one, and the writer's error would end the transport, and with it the server and
    every call still running. Such text is sent with U+FFFD in each surrogate's place, once
    logged as a warning; every other message is dumped as the SDK dumps it."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message

    def model_dump_json(self, **options: Any) -> str:
        try:
            dumped: str = self.message.model_dump_json(**options)
        except PydanticSerializationError:
            data = self.message.model_dump(mode="json", **options)  # text stays text: no encoding yet
            cleaned, replaced = _without_surrogates(data)
            if not replaced:
                raise
            logger.warning(
                "%s held text that is not valid Unicode (%s lone surrogate(s), as os.fsdecode makes of a file name "
                "that is not UTF-8): sent with U+FFFD in their place",
                _what(self.message),
                replaced,
            )
            return json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"))
        return dumped


#: A surrogate code point: never valid alone in text to be encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> tuple[Any, int]:
    """`value` (JSON data) with each surrogate code point in its text replaced by U+FFFD, and how many."""
    if isinstance(value, str):
        return _SURROGATE.subn("\ufffd", value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            key, n = _without_surrogates(key)
            out[key], m = _without_surrogates(item)
            total += n + m
        return out, total
    if isinstance(value, list):
        items = [_without_surrogates(item) for item in value]
        return [item for item, _ in items], sum(n for _, n in items)
    return value, 0


def _what(message: Any) -> str:
    """The message, as a log line names it: the answer to its request, or its method."""
    if isinstance(message, JSONRPCResponse | JSONRPCError):
        return f"The answer to request {message.id!r}"
    return f"A {getattr(message, 'method', 'message')!r} message"


class Outstanding:
    """Request ids read from the client that the server has not answered yet, each with its
    method and params (to answer it at the exit if its work never does, see `server.unanswered`)."""

    def __init__(self) -> None:
        self.requests: dict[Any, tuple[str, Any]] = {}
        self.empty = anyio.Event()
        self.empty.set()

    def add(self, request_id: Any, method: str = "", params: Any = None) -> None:
        self.requests[request_id] = (method, params)
        if self.empty.is_set():
            self.empty = anyio.Event()

    def discard(self, request_id: Any) -> None:
        self.requests.pop(request_id, None)
        if not self.requests:
            self.empty.set()

    def discard_cancelled(self, request_id: Any) -> None:
        """Stop waiting for the request a `notifications/cancelled` names. Like the SDK, which
        cancels the request, take `"7"` and `7` for one id (`coerce_request_id`). Any other
        `requestId` (an object, a list, a bool, a fraction, null) names no request: the SDK drops
        such a notification as malformed, and so is it ignored here."""
        request_id = as_request_id(request_id)  # the SDK's own rule for what may name a request
        if request_id is None:
            return
        if request_id not in self.requests:
            wanted = coerce_request_id(request_id)
            request_id = next((key for key in self.requests if coerce_request_id(key) == wanted), request_id)
        self.discard(request_id)


class StdinLines:
    """The client's lines, read from a private duplicate of fd 0 by a daemon thread.

    The SDK's `stdio_server` reads stdin in an anyio worker thread, which no cancellation
    reaches: a shutdown begun by a signal or by `server_shutdown` while the client keeps stdin
    open would wait for the client's next line forever. A daemon thread can be left blocked in
    `read()`; the loop ends this iterator by closing the stream the thread feeds. fd 0 itself
    points at the null device, so tools cannot steal protocol bytes: from before the tool modules
    are imported when the CLI has claimed it (`claim_stdin`, whose wire is then given here), else
    while serving, like the SDK.
    """

    def __init__(self, wire: BinaryIO | None = None) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[str](32)
        self._wire = wire
        self._restore: Callable[[], None] | None = None
        self.eof = False

    def start(self) -> None:
        wire = self._wire
        if wire is None:
            wire, self._restore = _claim_stdin()
        token = anyio.lowlevel.current_token()
        threading.Thread(target=self._pump, args=(wire, token), name="mcp-stdin-reader", daemon=True).start()

    def _pump(self, wire: BinaryIO, token: anyio.lowlevel.EventLoopToken) -> None:
        try:
            for raw in wire:
                anyio.from_thread.run(self._send.send, raw.decode("utf-8", errors="replace"), token=token)
            anyio.from_thread.run_sync(self._reached_eof, token=token)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.RunFinishedError, OSError, ValueError):
            pass  # the server stopped reading (shutdown) or the loop is gone: nothing left to do

    def _reached_eof(self) -> None:
        self.eof = True
        self._send.close()

    def close(self) -> None:
        """End the iteration (the thread, if blocked in read(), stays behind as a daemon)."""
        self._send.close()
        if self._restore is not None:
            self._restore()
            self._restore = None

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None


class StdoutLines:
    """The SDK's stdio writer's output (its `write` and `flush`), written by a daemon thread.

    The SDK writes each message with one `write` in an anyio worker thread, which no cancellation
    reaches: a client that stops reading its stdout would hold the server's exit forever, blocked
    on a full pipe. Here each `write` waits for the daemon thread to have written and flushed the
    message, and fails as the write did (a `BrokenPipeError` when the client closed its end), but
    `abandon` ends that wait: the exit gives a client that does not read a bound, then leaves the
    thread blocked in `write()`. `written` counts the messages written (or failed). fd 1 points at
    stderr while serving (taken from the CLI's `divert_stdout` if given, whose wire is then this
    one's; else claimed here and given back at `close`), so tools cannot write to the wire.
    """

    def __init__(self, wire: BinaryIO | None = None) -> None:
        self._wire = wire
        self._restore: Callable[[], None] | None = None
        self._jobs: queue.SimpleQueue[tuple[bytes, anyio.Event, list[BaseException]] | None] = queue.SimpleQueue()
        self._waiting: set[anyio.Event] = set()
        self._abandoned = False
        self._progress = anyio.Event()
        self.written = 0

    def start(self) -> None:
        wire = self._wire
        if wire is None:
            wire, self._restore = _claim_stdout()
        token = anyio.lowlevel.current_token()
        threading.Thread(target=self._pump, args=(wire, token), name="mcp-stdout-writer", daemon=True).start()

    def _pump(self, wire: BinaryIO, token: anyio.lowlevel.EventLoopToken) -> None:
        while (job := self._jobs.get()) is not None:
            if self._abandoned:
                continue  # given up at the exit: a client that reads again later must not get them
            data, done, failed = job
            try:
                wire.write(data)
                wire.flush()
            except Exception as exc:  # noqa: BLE001 - raised by the `write` that waits for it
                failed.append(exc)
            try:
                anyio.from_thread.run_sync(self._wrote, done, token=token)
            except (anyio.RunFinishedError, RuntimeError):  # the loop has finished, or closed meanwhile
                return

    def _wrote(self, done: anyio.Event) -> None:
        self.written += 1
        done.set()
        self._progress.set()
        self._progress = anyio.Event()

    async def write(self, text: str) -> None:
        if self._abandoned:
            await anyio.lowlevel.checkpoint()
            return
        done, failed = anyio.Event(), list[BaseException]()
        self._jobs.put((text.encode("utf-8"), done, failed))
        self._waiting.add(done)
        try:
            await done.wait()
        finally:
            self._waiting.discard(done)
        if failed:
            raise failed[0]

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()  # each `write` has flushed

    async def wait_written(self, count: int) -> None:
        """Wait until `count` messages have been written since the start."""
        while self.written < count:
            await self._progress.wait()

    def abandon(self) -> None:
        """Stop waiting for the client to read: the write under way, and every later one, return
        at once without their message (the thread stays blocked in `write()`, a daemon)."""
        self._abandoned = True
        for done in self._waiting:
            done.set()

    def close(self) -> None:
        """End the thread once it has written what it holds; give fd 1 back if it was claimed here."""
        self._jobs.put(None)
        if self._restore is not None:
            self._restore()
            self._restore = None


def _claim_stdout() -> tuple[BinaryIO, Callable[[], None] | None]:
    """`divert_stdout` for the time of serving (an embedding host's `serve_stdio` without a
    wire), as the SDK's own diversion was; the function returned points fd 1 at the wire again
    (None where nothing was diverted)."""
    stdout_buffer = getattr(sys.stdout, "buffer", None)
    wire = divert_stdout()
    if wire is stdout_buffer or getattr(wire, "name", None) == os.devnull:
        return wire, None
    private = wire.fileno()

    def restore() -> None:
        with contextlib.suppress(OSError):
            os.dup2(private, 1)

    return wire, restore


def _private_duplicate(fd: int) -> int | None:
    """A duplicate of `fd` above the standard three, not inherited by child processes; None if
    it cannot be made."""
    try:
        if sys.platform == "win32":  # pragma: no cover
            return os.dup(fd)
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        return None


def _null_stdin() -> None:
    """Point fd 0 at the null device (taking it if it was closed); nothing if that fails."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_RDONLY)
        if devnull != 0:  # 0 if fd 0 was closed: the null device has it already
            try:
                os.dup2(devnull, 0)
            finally:
                os.close(devnull)


def _claim_stdin() -> tuple[BinaryIO, Callable[[], None] | None]:
    """Serve the wire from a private duplicate of fd 0 and point fd 0 at the null device."""
    private = _private_duplicate(0)
    if private is None:
        if sys.stdin is not None:
            return sys.stdin.buffer, None
        # No fd 0 at all (started with stdin closed): no client, so no messages, at once; and
        # fd 0 reads the null device, or the next file opened would be taken for stdin.
        _null_stdin()
        return io.BytesIO(b""), None
    _null_stdin()  # if it fails, fd 0 still carries the wire; reading the duplicate is just as good

    def restore() -> None:
        with contextlib.suppress(OSError):
            os.dup2(private, 0)

    # closefd=False: the reader thread may still block on it when the server exits.
    return os.fdopen(private, "rb", closefd=False), restore


def claim_stdin() -> BinaryIO:
    """Reserve stdin for protocol messages until the process exits; returns the wire to read them from.

    The wire is a private duplicate of fd 0; fd 0 itself (and so `sys.stdin`, `input()`, child
    processes) reads the null device from now on: at once end of file. The CLI calls this before
    any tool module is imported, as it does `divert_stdout`: a module that reads stdin while
    imported or set up must not consume the client's first messages, and serving alone would
    claim fd 0 only once it begins. fd 0 is never given back. If fd 0 cannot be duplicated, the
    wire is stdin itself (nothing claimed), as the SDK does; if there is no fd 0, an empty stream.
    """
    return _claim_stdin()[0]


def _stdout_away() -> bool:
    """Point fd 1 at stderr (True) or, if there is no fd 2 (started with `2>&-`), fd 1 and fd 2
    at the null device (False); nothing if both fail."""
    try:
        os.dup2(2, 1)
    except OSError:
        pass
    else:
        return True
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 1:  # 1 if fd 1 was closed: the null device has it already
            try:
                os.dup2(devnull, 1)
            finally:
                # Kept if it took the free fd 2: the next file or socket opened is not taken for stderr.
                if devnull != 2:
                    os.close(devnull)
    return False


def divert_stdout() -> BinaryIO:
    """Reserve stdout for protocol messages until the process exits; returns the wire to write them to.

    The wire is a private duplicate of fd 1; fd 1 itself (and so `sys.stdout`, `print`, child
    processes) points at stderr from now on (at the null device if there is no fd 2). The CLI
    calls this before any tool module is imported: a module that prints while imported or set up
    must not corrupt the stdio stream or the JSON of `--check-config`, and the SDK's own
    diversion starts only once serving begins. fd 1 is never given back: whatever a stray thread
    or an exit handler prints after the last response still misses the wire. If fd 1 cannot be
    duplicated, the wire is stdout itself (nothing diverted), as the SDK does; if there is no
    fd 1, the null device.
    """
    if sys.stdout is not None:
        sys.stdout.flush()  # anything written before the diversion belongs to where it was written
    private = _private_duplicate(1)
    if private is None:
        if sys.stdout is not None:
            return sys.stdout.buffer
        # No fd 1 at all (started with stdout closed): nobody reads what the wire carries; and
        # fd 1 points away, or the next file or socket opened would be taken for stdout.
        _stdout_away()
        return open(os.devnull, "wb")  # noqa: SIM115 - the wire stays open until the process exits
    if _stdout_away():
        # `print` now writes to stderr, where logs go: a line there at each newline, in order with
        # the log records, not a block held until something flushes (stdout on a pipe is buffered).
        reconfigure = getattr(sys.stdout, "reconfigure", None)
        if callable(reconfigure):
            with contextlib.suppress(ValueError, OSError):
                reconfigure(line_buffering=True)
    # closefd=False: the descriptor stays open (and the client's stdout with it) until the process exits.
    return os.fdopen(private, "wb", closefd=False)
