"""`RepeatLimit` and `EventReport` on their own, on a clock the test moves: which records or
events are written, which are counted, and where the counts are written. The standalone
server's log under real floods is in `tests/e2e/test_http_floods.py` and
`tests/e2e/test_http_connections.py`; the handler `configure_logging` installs, in
`tests/integration/test_logs.py`."""

from __future__ import annotations

import logging
import sys

import anyio
import pytest
from starlette.requests import ClientDisconnect

from server.logs import (
    MESSAGES_PER_LOGGER,
    REPEAT_SECONDS,
    REPORT_SECONDS,
    SDK_HTTP_LOGGER,
    EventReport,
    RepeatLimit,
    quiet_client_disconnects,
    repeats_note,
    template,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def written(limit: RepeatLimit, records: list[logging.LogRecord]) -> list[str]:
    """The messages of what `limit` lets through of `records`, with their notes."""
    out = (limit.admit(r) for r in records)
    return [r.getMessage() + repeats_note(r) for r in out if r is not None]


def test_repeats_within_the_period_are_counted_and_the_next_one_after_it_carries_the_count() -> None:
    clock = Clock()
    limit = RepeatLimit(clock=clock)
    flood = [record("uvicorn.error", "Invalid HTTP request received.") for _ in range(1235)]
    assert written(limit, flood) == ["Invalid HTTP request received."]
    clock.now += REPEAT_SECONDS + 2
    assert written(limit, flood[:3]) == ["Invalid HTTP request received. [and 1,234 more like this in the last 12 s]"]
    # A new period began with that one: the two after it are counted again, and wait for the next.
    assert [r.getMessage() + repeats_note(r) for r in limit.pending()] == [
        "Invalid HTTP request received. [and 1 more like this in the last 1 s]"
    ]
    assert limit.pending() == []


def test_each_message_of_each_logger_has_its_own_count_and_values_in_args_do_not_split_it() -> None:
    limit = RepeatLimit(clock=Clock())
    records = [
        record("uvicorn.error", "Unsupported upgrade request."),
        record("uvicorn.error", "No supported WebSocket library detected."),
        record("mcp.server.streamable_http", "Unsupported upgrade request."),
        *(record("starlette.h11", "Bad request from %s: %s", f"10.0.0.{i}", i) for i in range(50)),
    ] * 2
    assert written(limit, records) == [
        "Unsupported upgrade request.",
        "No supported WebSocket library detected.",
        "Unsupported upgrade request.",
        "Bad request from 10.0.0.0: 0",
    ]
    assert sorted(r.getMessage() + repeats_note(r) for r in limit.pending()) == [
        "Bad request from 10.0.0.49: 49 [and 98 more like this in the last 1 s]",
        "No supported WebSocket library detected.",  # one dropped: the line is itself, no note
        "Unsupported upgrade request.",
        "Unsupported upgrade request.",
    ]


@pytest.mark.parametrize(
    "name", ["server", "server.sessions.ends", "server.refusals", "tools.sessions", "asyncio", "my_tools", "root"]
)
def test_only_the_http_stack_s_loggers_are_limited(name: str) -> None:
    # This package's own lines, a hosted tool module's and asyncio's are written every one.
    limit = RepeatLimit(clock=Clock())
    records = [record(name, "Refused echo (%s): full", "capacity_exceeded") for _ in range(100)]
    assert [limit.admit(r) for r in records] == records
    assert limit.pending() == []
    # A logger whose name only begins like a limited one's is not limited.
    assert written(limit, [record("uvicornx", "m") for _ in range(3)]) == ["m", "m", "m"]
    assert written(limit, [record("uvicorn.error", "m") for _ in range(3)]) == ["m"]


def test_a_message_written_whole_with_its_values_is_one_template() -> None:
    # The SDK writes values into the message (f-strings): one template each all the same.
    hosts = [record("mcp.server.transport_security", f"Invalid Host header: evil{i}.example") for i in range(3)]
    sessions = [record("mcp.server.streamable_http", f"Session {i:032x}{i} idle timeout") for i in range(3)]
    assert {template(r) for r in hosts} == {"Invalid Host header"}
    assert {template(r) for r in sessions} == {"Session # idle timeout"}
    assert template(record("x", "Took %s s: %d", 1, 2)) == "Took %s s: %d"
    error = logging.LogRecord("x", logging.ERROR, __file__, 1, ValueError("no"), None, None)
    assert template(error) == "ValueError"


def test_past_its_share_of_messages_a_loggers_other_messages_are_counted_together() -> None:
    limit = RepeatLimit(clock=Clock())
    distinct = [record("mcp.chatty", f"message {chr(65 + i % 26)}{chr(65 + i // 26)}") for i in range(100)]
    lines = written(limit, distinct)
    assert lines == [r.getMessage() for r in distinct[: MESSAGES_PER_LOGGER + 1]]
    [summary] = [r.getMessage() + repeats_note(r) for r in limit.pending()]
    more = 100 - MESSAGES_PER_LOGGER - 2
    assert summary == f"message {distinct[-1].getMessage()[-2:]} [and {more} more from this logger in the last 1 s]"


def test_what_is_logged_once_is_forgotten_once_its_period_is_over() -> None:
    clock = Clock()
    limit = RepeatLimit(clock=clock)
    for i in range(MESSAGES_PER_LOGGER):
        assert limit.admit(record("mcp.once", f"m{chr(65 + i)}")) is not None
    clock.now += REPEAT_SECONDS
    # Its share is free again: a new message is told apart, not counted with the others.
    assert written(limit, [record("mcp.once", "fresh"), record("mcp.once", "fresh")]) == ["fresh"]
    assert [r.getMessage() for r in limit.pending()] == ["fresh"]


def test_a_dropped_record_keeps_its_traceback_for_the_line_written_at_the_end() -> None:
    limit = RepeatLimit(clock=Clock())
    for _ in range(3):
        try:
            raise ConnectionResetError("gone")
        except ConnectionResetError:
            r = record("mcp.server.streamable_http", "Error handling POST request", level=logging.ERROR)
            r.exc_info = sys.exc_info()
            limit.admit(r)
    [last] = limit.pending()
    assert last.exc_info is not None and last.levelno == logging.ERROR
    assert repeats_note(last) == " [and 1 more like this in the last 1 s]"


def reporting(clock: Clock, caplog: pytest.LogCaptureFixture) -> EventReport:
    caplog.set_level(logging.INFO, logger="tests.report")
    return EventReport(
        logging.getLogger("tests.report"),
        logging.WARNING,
        lambda: "refused one",
        lambda n: f"refused {n} more",
        clock=clock,
    )


def test_an_event_report_writes_the_first_at_once_and_counts_the_rest_until_it_is_flushed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    report = reporting(clock, caplog)
    assert report.note() is None  # written
    clock.now += 4
    # The first one counted says when its count is due; the others do not (one timer per count).
    assert report.note() == REPORT_SECONDS - 4
    assert [report.note() for _ in range(998)] == [None] * 998
    assert caplog.messages == ["refused one"]
    clock.now += REPORT_SECONDS - 4
    report.flush()  # the count's period is over
    report.flush()  # nothing left to tell
    assert caplog.messages == ["refused one", "refused 999 more"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    # A new period began with that line: the next one is counted, not written.
    clock.now += 1
    assert report.note() == REPORT_SECONDS - 1
    assert caplog.messages == ["refused one", "refused 999 more"]


def test_an_event_report_nobody_flushed_tells_its_count_with_the_next_event_past_the_period_and_at_its_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    report = reporting(clock, caplog)
    for _ in range(3):
        report.note()
    clock.now += REPORT_SECONDS
    report.note()  # past the period: the two counted and this one
    clock.now += REPORT_SECONDS + 1
    report.note()  # past the period, nothing counted: a first one again
    report.note()
    assert caplog.messages == ["refused one", "refused 3 more", "refused one"]
    report.close()  # the count left, then each as it comes
    report.note()
    report.note()
    assert caplog.messages == [
        "refused one",
        "refused 3 more",
        "refused one",
        "refused 1 more",
        "refused one",
        "refused one",
    ]


def test_the_sdks_error_for_a_message_delivered_as_its_client_ended_its_session_is_a_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A legacy client cancels a call and ends its session at once (its DELETE): the SDK's delivery
    # of the cancel fails on the closed session. The client's doing: no ERROR and traceback.
    sdk = logging.getLogger(SDK_HTTP_LOGGER)
    remove = quiet_client_disconnects()
    try:
        with caplog.at_level(logging.INFO, logger=SDK_HTTP_LOGGER):
            for error in (anyio.ClosedResourceError(), ClientDisconnect()):
                try:
                    raise error
                except Exception:
                    sdk.exception("Error handling POST request")
            try:
                raise RuntimeError("a real failure")
            except RuntimeError:
                sdk.exception("Error handling POST request")
            try:
                raise anyio.ClosedResourceError
            except anyio.ClosedResourceError:
                sdk.exception("Unexpected closure of read stream in message router")  # the server's end of a session
    finally:
        remove()
    assert [(r.levelname, r.exc_info is not None) for r in caplog.records] == [("ERROR", True), ("ERROR", True)]
    assert "a real failure" in caplog.text and "message router" in caplog.text
