"""Log lines through the SDK's in-memory Client: one INFO line per session end with its fields,
one WARNING line per refusal, never the metadata; nothing formatted below the level in force.
A config reload changes process-wide logging only where `configure_logging` set it up (the
standalone server); an embedding host's own logging is left as the host made it."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, MCPError
from mcp.server.mcpserver import MCPServer

from server import SessionsExtension, load_settings
from server.config import LoggingSettings
from server.logs import MAX_MESSAGE_CHARS, MESSAGES_PER_LOGGER, JsonFormatter, configure_logging
from server.reload import ConfigReloader
from tests.helpers import build, code_of, echo, error_of, settings, text_of

SECRET = "metadata-contents-never-logged"


def session_ends(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.sessions.ends" and hasattr(r, "state")]


class Halt(BaseException):
    """A `BaseException` a tool raises: the SDK leaves it to the extension, which ends the session."""


async def test_a_tool_raising_a_base_exception_ends_error_with_the_exception_type_and_text_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def halts() -> str:
        raise Halt("stopped by the tool")

    app, _ = build(settings(), tools=[halts, echo])
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="server.sessions.ends")
    async with Client(app) as client:
        assert (await client.call_tool("halts", {})).is_error
        assert text_of(await client.call_tool("echo", {"text": "still serving"})) == "still serving"

    [end] = [r for r in session_ends(caplog) if r.tool == "halts"]  # type: ignore[attr-defined]
    assert end.state == "error" and end.reason == "Halt: stopped by the tool", end.getMessage()  # type: ignore[attr-defined]
    assert end.getMessage().endswith("(tool halts): Halt: stopped by the tool"), end.getMessage()
    [raised] = [r for r in caplog.records if r.name == "server.extension" and r.levelno == logging.ERROR]
    assert raised.getMessage() == "Tool 'halts' raised Halt: stopped by the tool"


async def test_each_session_end_is_one_info_line_and_each_refusal_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build(settings(max_concurrent_sessions=1, max_metadata_bytes=64))
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="server.sessions.ends")  # off by default for embedding hosts
    async with Client(app) as client:
        await client.call_tool("echo", {"text": "hi"})
        await client.call_tool("boom", {"message": "broken"})
        created = (await client.call_tool("session_create", {"metadata": {"note": SECRET}})).structured_content or {}
        assert code_of(await client.call_tool("echo", {"text": "full"})) == "capacity_exceeded"
        await client.call_tool("session_release", {"session_id": created["session_id"]})
        too_big = await client.call_tool("session_create", {"metadata": {"note": SECRET * 10}})
        assert code_of(too_big) == "metadata_too_large"

    ends = {(r.tool, r.state): r for r in session_ends(caplog)}  # type: ignore[attr-defined]
    assert set(ends) == {("echo", "completed"), ("boom", "error"), (None, "completed")}
    echo = ends[("echo", "completed")]
    assert echo.levelno == logging.INFO and echo.duration_seconds >= 0  # type: ignore[attr-defined]
    assert echo.getMessage().startswith(f"Session {echo.session_id} ended completed after ")  # type: ignore[attr-defined]
    assert "boom" in ends[("boom", "error")].reason  # type: ignore[attr-defined]
    untooled = ends[(None, "completed")]
    assert untooled.session_id == created["session_id"] and "(no tool)" in untooled.getMessage()  # type: ignore[attr-defined]

    refusals = {r.code: r for r in caplog.records if r.name == "server.refusals"}  # type: ignore[attr-defined]
    assert set(refusals) == {"capacity_exceeded", "metadata_too_large"}
    assert all(r.levelno == logging.WARNING for r in refusals.values())
    assert refusals["capacity_exceeded"].getMessage().startswith("Refused echo (capacity_exceeded): ")
    assert refusals["metadata_too_large"].tool == "session_create"  # type: ignore[attr-defined]
    assert SECRET not in caplog.text


async def test_below_info_no_session_end_line_is_made(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    caplog.set_level(logging.WARNING)
    async with Client(app) as client:
        for _ in range(3):
            await client.call_tool("echo", {"text": "quiet"})
    assert session_ends(caplog) == []


async def test_an_embedding_host_at_info_gets_no_session_end_lines_until_it_asks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MCPServer puts the root logger at INFO by itself; a line per call is the host's choice.
    app, _ = build()
    caplog.set_level(logging.INFO)
    async with Client(app) as client:
        await client.call_tool("echo", {"text": "quiet"})
        assert session_ends(caplog) == []
        logging.getLogger("server.sessions.ends").setLevel(logging.INFO)
        try:
            await client.call_tool("echo", {"text": "now logged"})
        finally:
            logging.getLogger("server.sessions.ends").setLevel(logging.WARNING)
    assert [r.state for r in session_ends(caplog)] == ["completed"]  # type: ignore[attr-defined]


# -- a config reload and the process's logging --------------------------------------------

HOST_FORMAT = "HOST %(levelname)s %(threadName)s %(name)s: %(message)s"
QUIET_JSON = '[logging]\nlevel = "warning"\nformat = "json"\n'


def logging_state() -> dict[str, Any]:
    """Everything process-wide that `configure_logging` changes."""
    root = logging.getLogger()
    return {
        "handlers": [(h, h.formatter, h.level) for h in root.handlers],
        "root_level": root.level,
        "ends_level": logging.getLogger("server.sessions.ends").level,
        "flags": (logging.logThreads, logging.logProcesses, logging.logMultiprocessing),
        "srcfile": logging._srcfile,
    }


@pytest.fixture
def host_stream() -> Iterator[io.StringIO]:
    """A host's own logging, as `logging.basicConfig(level=DEBUG, format=...)` makes it (a plain
    `StreamHandler` on the root logger); the process's logging state is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved = list(root.handlers), logging_state()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(HOST_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        for current in list(root.handlers):
            root.removeHandler(current)
        for kept in saved_handlers:
            root.addHandler(kept)
        root.setLevel(saved["root_level"])
        logging.getLogger("server.sessions.ends").setLevel(saved["ends_level"])
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved["flags"]
        logging._srcfile = saved["srcfile"]


async def test_a_reload_in_an_embedding_host_leaves_the_hosts_logging_alone(
    tmp_path: Path, host_stream: io.StringIO
) -> None:
    path = tmp_path / "host.toml"
    path.write_text("[limits]\nmax_concurrent_sessions = 5\n", encoding="utf-8")
    app, sessions = build(load_settings(path))
    before = logging_state()
    path.write_text("[limits]\nmax_concurrent_sessions = 5\nmax_metadata_bytes = 8\n" + QUIET_JSON, encoding="utf-8")

    assert ConfigReloader(sessions, path).reload() is True

    assert logging_state() == before  # handlers, formats, levels, flags: all the host's
    assert sessions.manager.limits.max_metadata_bytes == 8  # the rest of the file applies
    assert sessions.config.logging.level == "info"  # [logging] is not in force: the host's is
    async with Client(app) as client:
        refused = await client.call_tool("session_create", {"metadata": {"note": "longer than eight"}})
        assert code_of(refused) == "metadata_too_large"
    logging.getLogger("host.app").info("host record after the reload")
    lines = host_stream.getvalue().splitlines()
    assert "HOST INFO MainThread host.app: host record after the reload" in lines
    assert any(line.startswith("HOST WARNING MainThread server.refusals: Refused session_create") for line in lines)
    assert any("[logging] left to the host" in line and line.startswith("HOST INFO") for line in lines), lines


def test_a_reload_in_the_standalone_server_applies_the_logging_table(tmp_path: Path, host_stream: io.StringIO) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[logging]\nlevel = "info"\n', encoding="utf-8")
    sessions = SessionsExtension(load_settings(path))
    configure_logging(sessions.config.logging)  # what the standalone server does before serving
    path.write_text(QUIET_JSON, encoding="utf-8")

    assert ConfigReloader(sessions, path).reload() is True

    root = logging.getLogger()
    [ours] = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    assert root.level == logging.WARNING and logging.getLogger("server.sessions.ends").level == logging.WARNING
    assert sessions.config.logging.format == "json"
    # An explicit choice wins over what the process's logging looks like.
    path.write_text('[logging]\nlevel = "debug"\n', encoding="utf-8")
    assert ConfigReloader(sessions, path, manage_logging=False).reload() is True
    assert root.level == logging.WARNING and root.handlers.count(ours) == 1


#: (tool, arguments, code, what to do first): every way a session tool is refused with a code.
#: "{held}" in the arguments is replaced by the id of a session opened (and per `first`, released).
REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    ("session_create", {"metadata": {"note": "x" * 100}}, "metadata_too_large", ""),
    ("session_create", {"timeout_seconds": -1}, "invalid_argument", ""),
    ("session_create", {"timeout_seconds": "soon"}, "invalid_argument", ""),
    ("session_create", {"metadata": [1, 2]}, "invalid_argument", ""),
    ("session_create", {}, "capacity_exceeded", "hold"),
    ("session_create", {}, "shutting_down", "shut down"),
    ("session_release", {"session_id": "s1-not-ours"}, "unknown_session", ""),
    ("session_release", {"session_id": "{held}"}, "already_released", "release"),
    ("session_release", {"session_id": "{held}", "outcome": "weird"}, "invalid_argument", "hold"),
    ("session_release", {}, "invalid_argument", ""),
    ("server_shutdown", {"timeout_seconds": -1}, "invalid_argument", ""),
    ("server_shutdown", {"timeout_seconds": "soon"}, "invalid_argument", ""),
]


@pytest.mark.parametrize(("tool", "arguments", "code", "first"), REFUSALS)
async def test_every_refusal_of_a_session_tool_names_the_tool_and_is_logged_once(
    caplog: pytest.LogCaptureFixture, tool: str, arguments: dict[str, Any], code: str, first: str
) -> None:
    app, _ = build(settings(max_concurrent_sessions=1, max_metadata_bytes=64))
    caplog.set_level(logging.INFO)
    async with Client(app) as client:
        held = ""
        if first in ("hold", "release"):
            held = str((await client.call_tool("session_create", {})).structured_content["session_id"])
        if first == "release":
            assert not (await client.call_tool("session_release", {"session_id": held})).is_error
        if first == "shut down":
            assert not (await client.call_tool("server_shutdown", {"timeout_seconds": 0})).is_error
        caplog.clear()
        args = {key: held if value == "{held}" else value for key, value in arguments.items()}
        error = error_of(await client.call_tool(tool, args))
    assert (error["code"], error["tool"]) == (code, tool)
    refusals = [r for r in caplog.records if r.name == "server.refusals"]
    assert [(r.code, r.tool) for r in refusals] == [(code, tool)]  # type: ignore[attr-defined]
    assert refusals[0].levelno == logging.WARNING and error["message"] in refusals[0].getMessage()


async def test_a_call_refused_for_want_of_the_lifespan_names_its_tool_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sessions = SessionsExtension(settings())
    app: MCPServer[Any] = MCPServer("no-lifespan", extensions=[sessions])
    app.add_tool(echo)
    caplog.set_level(logging.INFO)
    async with Client(app) as client:
        refused = [error_of(await client.call_tool(name, {"text": "x"})) for name in ("echo", "session_create")]
    assert [(e["code"], e["tool"]) for e in refused] == [("not_running", "echo"), ("not_running", "session_create")]
    refusals = [(r.code, r.tool) for r in caplog.records if r.name == "server.refusals"]  # type: ignore[attr-defined]
    assert refusals == [("not_running", "echo"), ("not_running", "session_create")]


# -- one line per record in the text format ------------------------------------------------

#: How every record's line in the text format begins (`logs.TEXT_FORMAT`'s asctime).
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?P<logger>\S+): ")
FORGED = "a\nINJECTED 2026-11-27 03:08:53,245 WARNING server.refusals: Refused echo (unauthorized)\r\x1b[2Kx"


@pytest.fixture
def text_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The standalone server's logging (`configure_logging`, `format = "text"` at INFO), its
    stderr read from a StringIO; the process's logging state is restored afterwards."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved_handlers, saved = list(root.handlers), logging_state()
    configure_logging(LoggingSettings(level="info", format="text"))
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved["root_level"])
        logging.getLogger("server.sessions.ends").setLevel(saved["ends_level"])
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved["flags"]
        logging._srcfile = saved["srcfile"]


def logger_of(line: str) -> str:
    match = RECORD_START.match(line)
    assert match is not None, line
    return match["logger"]


def assert_one_line_per_record(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    strays = [line for line in lines if not RECORD_START.match(line)]
    assert strays == [], f"lines that are not records of their own: {strays}"
    return lines


async def test_an_error_a_client_releases_with_cannot_forge_lines_in_the_text_log(
    text_log: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = build()
    async with Client(app) as client:
        created = (await client.call_tool("session_create", {})).structured_content or {}
        arguments = {"session_id": created["session_id"], "outcome": "error", "error": FORGED}
        released = await client.call_tool("session_release", arguments)
        assert (released.structured_content or {})["state"] == "error"

    lines = assert_one_line_per_record(text_log.getvalue())
    [end] = [line for line in lines if logger_of(line) == "server.sessions.ends"]
    assert end.endswith(
        r"(no tool): a\nINJECTED 2026-11-27 03:08:53,245 WARNING server.refusals: Refused echo (unauthorized)\r\x1b[2Kx"
    )
    assert "server.refusals" not in {logger_of(line) for line in lines}
    # JSON escapes by itself: there the message and the `reason` field keep the text as it came.
    [record] = session_ends(caplog)
    data = json.loads(JsonFormatter().format(record))
    assert data["reason"] == FORGED and data["message"].endswith(f"(no tool): {FORGED}")


def test_a_long_message_is_cut_in_the_text_and_the_json_log(text_log: io.StringIO) -> None:
    # As the SDK logs a Host header it refuses: the client's whole header, 60 KB in one request
    # (the standalone server's test of it is in tests/e2e/test_http.py).
    header = "h" * 60_000
    logging.getLogger("tests.logs").warning("Invalid Host header: %s", header)
    [line] = assert_one_line_per_record(text_log.getvalue())
    message = f"Invalid Host header: {header}"
    more = len(message) - MAX_MESSAGE_CHARS
    assert line.endswith(f"tests.logs: {message[:MAX_MESSAGE_CHARS]}... [{more} more characters]"), line[-100:]

    record = logging.LogRecord("tests.logs", logging.WARNING, __file__, 1, "Invalid Host header: %s", (header,), None)
    record.reason = "r" * (MAX_MESSAGE_CHARS + 1)
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == f"{message[:MAX_MESSAGE_CHARS]}... [{more} more characters]"
    assert data["reason"] == "r" * MAX_MESSAGE_CHARS + "... [1 more character]"


async def test_the_sdks_multi_line_validation_errors_are_one_line_each_in_the_text_log(
    text_log: io.StringIO,
) -> None:
    app, _ = build()
    async with Client(app) as client:
        missing = await client.call_tool("echo", {})  # a hosted tool: its session ends as error
        assert missing.is_error and "\n" in text_of(missing)
        refused = await client.call_tool("server_shutdown", {"timeout_seconds": "abc"})  # a refusal, in one sentence
        assert code_of(refused) == "invalid_argument"
        assert text_of(refused) == (
            'invalid arguments for server_shutdown: timeout_seconds: input should be a valid number (got "abc")'
        )

    lines = assert_one_line_per_record(text_log.getvalue())
    [end] = [line for line in lines if logger_of(line) == "server.sessions.ends"]
    assert "ended error" in end and r"1 validation error for echoArguments\ntext\n  Field required" in end
    [refusal] = [line for line in lines if logger_of(line) == "server.refusals"]
    assert refusal.endswith(f"Refused server_shutdown (invalid_argument): {text_of(refused)}"), refusal


async def test_a_traceback_in_the_text_log_keeps_its_own_lines(text_log: io.StringIO) -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        logging.getLogger("tests.logs").exception("Handling a\nrequest failed")
    record, *traceback = text_log.getvalue().splitlines()
    assert RECORD_START.match(record) and record.endswith(r"tests.logs: Handling a\nrequest failed")
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-2:] == ["ValueError: first line", "second line"]


# -- other libraries' floods ---------------------------------------------------------------


def our_handler() -> logging.Handler:
    [handler] = [h for h in logging.getLogger().handlers if type(h).__module__ == "server.logs"]
    return handler


def test_another_librarys_repeated_record_is_written_once_and_counted_at_the_close(text_log: io.StringIO) -> None:
    # As uvicorn logs garbage on its port, once per connection; our own lines are all written.
    for _ in range(500):
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
        logging.getLogger("server.refusals").warning("Refused %s (%s): full", "echo", "capacity_exceeded")
    lines = assert_one_line_per_record(text_log.getvalue())
    assert [logger_of(line) for line in lines].count("server.refusals") == 500
    [flood] = [line for line in lines if logger_of(line) == "uvicorn.error"]
    assert flood.endswith("uvicorn.error: Invalid HTTP request received."), flood

    our_handler().close()  # as `logging.shutdown` does at the exit
    last = text_log.getvalue().splitlines()[-1]
    assert re.search(
        r"uvicorn.error: Invalid HTTP request received\. \[and 498 more like this in the last \d+ s\]$", last
    ), last


def test_a_reload_writes_the_counts_in_the_old_format_and_json_carries_the_count_as_a_field(
    text_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        logging.getLogger("uvicorn.error").warning("Unsupported upgrade request.")
    monkeypatch.setattr(sys, "stderr", text_log)  # where the new handler writes too
    configure_logging(LoggingSettings(level="info", format="json"))  # as a reload does
    for _ in range(3):
        logging.getLogger("uvicorn.error").warning("Unsupported upgrade request.")
    our_handler().close()
    first, counted, again, at_close = text_log.getvalue().splitlines()
    assert first.endswith("uvicorn.error: Unsupported upgrade request.")
    assert counted.endswith("uvicorn.error: Unsupported upgrade request. [and 1 more like this in the last 1 s]")
    assert json.loads(again)["message"] == "Unsupported upgrade request."
    data = json.loads(at_close)
    assert data["message"] == "Unsupported upgrade request. [and 1 more like this in the last 1 s]"
    assert data["repeats"] == 1 and data["logger"] == "uvicorn.error"


def test_a_reload_puts_back_the_root_level_and_the_handlers_a_tool_changed(
    text_log: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tool that set the root logger to DEBUG, or added a StreamHandler of its own to it, kept
    # that after a reload of an unchanged file: only a missing handler of ours was put back.
    path = tmp_path / "server.toml"
    path.write_text('[logging]\nlevel = "info"\n', encoding="utf-8")
    sessions = SessionsExtension(load_settings(path))
    monkeypatch.setattr(sys, "stderr", text_log)  # the stderr our handler writes to, as when it was made
    root, ours = logging.getLogger(), our_handler()
    extra = logging.StreamHandler(text_log)
    extra.setFormatter(logging.Formatter("DUP %(message)s"))
    root.addHandler(extra)
    root.setLevel(logging.DEBUG)

    assert ConfigReloader(sessions, path, manage_logging=True).reload() is True

    assert root.level == logging.INFO and extra not in root.handlers
    assert our_handler() is ours  # kept, with its counts of repeated records
    logging.getLogger("tools.probe").debug("below the level")
    logging.getLogger("tools.probe").info("at the level")
    lines = text_log.getvalue().splitlines()
    [note] = [line for line in lines if "[logging] applied again" in line]
    assert "something had added 1 handler(s) to the root logger" in note, note
    assert "something had set the root logger's level to DEBUG, not INFO" in note, note
    assert [line for line in lines if "tools.probe" in line or line.startswith("DUP")] == [
        line for line in lines if line.endswith("tools.probe: at the level")
    ]
    # Nothing drifted since: the next reload applies [logging] as quietly as before.
    assert ConfigReloader(sessions, path, manage_logging=True).reload() is True
    assert text_log.getvalue().count("applied again") == 1 and our_handler() is ours


def crash_a(text: str) -> str:
    raise RuntimeError("crash " + text)


def crash_b(key: str) -> str:
    return {"a": "1"}[key]


def parse_order(text: str) -> str:
    return str(json.loads(text))  # fails inside the json module, at the same line as parse_invoice


def parse_invoice(text: str) -> str:
    return str(json.loads(text))


async def test_each_tools_crash_has_its_traceback_written_and_a_repeated_crash_is_counted(
    text_log: io.StringIO,
) -> None:
    # The SDK logs every tool's crash with one message (`Tool %r raised an unexpected exception`):
    # one tool's traceback must not hide another's, while the same crash repeated is counted.
    app, _ = build(tools=[crash_a, crash_b])
    async with Client(app) as client:
        assert (await client.call_tool("crash_a", {"text": "first"})).is_error
        assert (await client.call_tool("crash_b", {"key": "zzz"})).is_error
        assert (await client.call_tool("crash_a", {"text": "second"})).is_error
    text = text_log.getvalue()
    assert "RuntimeError: crash first" in text
    assert "KeyError: 'zzz'" in text
    assert "crash second" not in text
    our_handler().close()  # the one counted is written at the exit, with its traceback
    last = [line for line in text_log.getvalue().splitlines() if RECORD_START.match(line)][-1]
    assert last.endswith("ERROR mcp.server.mcpserver.server: Tool 'crash_a' raised an unexpected exception"), last
    assert "RuntimeError: crash second" in text_log.getvalue().split(last)[1]


async def test_two_tools_failing_at_the_same_line_of_a_library_each_have_their_traceback_written(
    text_log: io.StringIO,
) -> None:
    # The same exception from the same line, but of two tools: two failures, not one repeated.
    app, _ = build(tools=[parse_order, parse_invoice])
    async with Client(app) as client:
        assert (await client.call_tool("parse_order", {"text": "not json"})).is_error
        assert (await client.call_tool("parse_invoice", {"text": "not json"})).is_error
    written = [line for line in text_log.getvalue().splitlines() if RECORD_START.match(line)]
    assert any(line.endswith("Tool 'parse_order' raised an unexpected exception") for line in written), written
    assert any(line.endswith("Tool 'parse_invoice' raised an unexpected exception") for line in written), written


async def test_a_client_reading_many_failing_resources_does_not_hide_a_tools_crash(text_log: io.StringIO) -> None:
    # The SDK logs a resource's crash with the URI the client asked for as its argument: counted
    # as one kind, not one each (25 of them used up the logger's kinds, and then a tool's crash,
    # another kind, was never written).
    app, _ = build(tools=[crash_a])

    @app.resource("items://{item_id}")
    def item(item_id: str) -> str:
        return {"a": "1"}[item_id]

    async with Client(app) as client:
        for n in range(MESSAGES_PER_LOGGER + 5):
            with pytest.raises(MCPError):
                await client.read_resource(f"items://{n}")
        assert (await client.call_tool("crash_a", {"text": "after the resources"})).is_error
    text = text_log.getvalue()
    assert "RuntimeError: crash after the resources" in text, text
    assert text.count("KeyError") == 1, text


def test_a_library_logging_a_structured_message_with_a_traceback_is_written_not_raised(text_log: io.StringIO) -> None:
    # A message that is no string (a dict, as structlog's stdlib bridge passes) cannot raise out
    # of the logging call, whatever the repeat limit keys it by.
    library = logging.getLogger("mcp.server.lowlevel")
    for message in ({"event": "boom"}, ["boom"]):
        try:
            raise ValueError("in the library")
        except ValueError:
            library.exception(message)
    written = text_log.getvalue()
    assert "{'event': 'boom'}" in written and "['boom']" in written, written  # two kinds: a dict's, a list's
    assert written.count("ValueError: in the library") == 2, written
