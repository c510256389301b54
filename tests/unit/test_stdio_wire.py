"""The answer to a line from a stdio client that the SDK cannot read (`server.stdio_wire`)."""

from __future__ import annotations

import mcp_types as types
import pytest
from pydantic import ValidationError

from server.stdio_wire import (
    MAX_DEEP_SCAN_CHARS,
    MAX_NESTING,
    MAX_REREAD_CHARS,
    read_despite_unpaired_surrogates,
    unreadable_line_error,
)

HUGE = "9" * 5000  # more digits than Python turns into an int


def sdk_error(line: str) -> Exception:
    """What the SDK's stdio reader raises for `line` (the exception the server answers)."""
    try:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        return exc
    raise AssertionError(f"the SDK read {line[:80]!r}")


@pytest.mark.parametrize(
    ("line", "answered_id"),
    [
        pytest.param(
            f'{{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {{"n": {HUGE}}}}}', 3, id="request"
        ),
        pytest.param(f'{{"jsonrpc": "2.0", "id": "r", "method": "ping", "params": {{"n": {HUGE}}}}}', "r", id="str-id"),
        # A response to the server's own request 3: answering it with id 3 would read, to the
        # client, as the answer to its own request 3.
        pytest.param(f'{{"jsonrpc": "2.0", "id": 3, "result": {{"n": {HUGE}}}}}', None, id="response"),
        pytest.param(f'{{"jsonrpc": "2.0", "method": "notifications/x", "params": {{"n": {HUGE}}}}}', None, id="note"),
        pytest.param(f'{{"jsonrpc": "2.0", "id": {HUGE}, "method": "ping"}}', None, id="the-id-itself"),
    ],
)
def test_a_number_too_long_to_read_is_answered_with_the_id_of_its_request_only(line: str, answered_id: object) -> None:
    error = unreadable_line_error(sdk_error(line))
    assert error.id == answered_id
    assert error.error.code == types.INVALID_PARAMS
    assert "send such a number as a string" in error.error.message


def test_a_line_too_long_to_read_again_is_answered_without_an_id() -> None:
    padding = "x" * MAX_REREAD_CHARS
    line = f'{{"jsonrpc": "2.0", "id": 3, "method": "ping", "params": {{"n": {HUGE}, "pad": "{padding}"}}}}'
    error = unreadable_line_error(sdk_error(line))
    assert (error.id, error.error.code) == (None, types.INVALID_PARAMS)


def surrogate_request(padding: str) -> str:
    return f'{{"jsonrpc": "2.0", "id": 4, "method": "ping", "params": {{"s": "\\udcff", "pad": "{padding}"}}}}'


def test_a_lone_surrogate_line_is_read_again_up_to_max_reread_chars_characters_and_refused_past_them() -> None:
    # Counted in characters: two-byte ones, more than MAX_REREAD_CHARS bytes in all, are read again.
    within = read_despite_unpaired_surrogates(sdk_error(surrogate_request("é" * (MAX_REREAD_CHARS - 100))))
    assert not isinstance(within, Exception)
    exc = sdk_error(surrogate_request("x" * MAX_REREAD_CHARS))
    assert read_despite_unpaired_surrogates(exc) is exc
    error = unreadable_line_error(exc)
    assert (error.id, error.error.code) == (4, types.PARSE_ERROR)
    assert error.error.message.endswith(
        "this server reads such a message, with U+FFFD in the surrogate's place, only up to 1,048,576 characters"
    )


PAST_THE_SCAN = "x" * MAX_DEEP_SCAN_CHARS


def nested(levels: int, inside: str = "1") -> str:
    """An array `levels` deep, holding `inside` at its deepest."""
    return "[" * levels + inside + "]" * levels


def request_nesting(levels: int, request_id: str = "7", inside: str = "1") -> str:
    """A request nesting `levels` deep in all: its own object, `params`, and arrays in `params`."""
    deep = nested(levels - 2, inside)
    return f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "ping", "params": {{"a": {deep}}}}}'


def test_the_sdk_reads_a_message_nesting_max_nesting_levels_and_no_more() -> None:
    read = types.jsonrpc_message_adapter.validate_json
    read(request_nesting(MAX_NESTING), by_name=False)
    read(request_nesting(MAX_NESTING + 1, inside=""), by_name=False)  # one more, if the deepest is empty
    error = unreadable_line_error(sdk_error(request_nesting(MAX_NESTING + 1)))
    assert (error.id, error.error.code) == (7, types.PARSE_ERROR)
    assert error.error.message == (
        f"Parse error: the message nests more than {MAX_NESTING} levels deep (objects and arrays, its own "
        "included), more than this server reads"
    )


@pytest.mark.parametrize(
    ("line", "answered_id"),
    [
        pytest.param(request_nesting(10_000), 7, id="request"),
        pytest.param(request_nesting(300, '"r"'), "r", id="str-id"),
        pytest.param(
            f'{{ "method" : "ping", "params": [{{"k\\"}}]": "[{{"}}, {nested(300)}, "x"], "jsonrpc": "2.0", "id": 4 }}',
            4,
            id="id-after-the-nesting",
        ),
        pytest.param(f'{{"jsonrpc": "2.0", "id": 3, "result": {nested(300)}}}', None, id="response"),
        pytest.param(f'{{"jsonrpc": "2.0", "method": "notifications/x", "params": {nested(300)}}}', None, id="note"),
        pytest.param(f'{{"jsonrpc": "2.0", "id": {nested(300)}, "method": "ping"}}', None, id="the-id-itself"),
        pytest.param(
            f'{{"jsonrpc": "2.0", "id": true, "method": "ping", "params": {nested(300)}}}', None, id="bool-id"
        ),
        pytest.param(
            f'{{"jsonrpc": "2.0", "method": "ping", "params": {nested(300)}, "pad": "{PAST_THE_SCAN}", "id": 1}}',
            None,
            id="id-past-the-scan",
        ),
    ],
)
def test_a_message_nesting_too_deeply_is_answered_with_the_id_of_its_request_only(
    line: str, answered_id: object
) -> None:
    error = unreadable_line_error(sdk_error(line))
    assert (error.id, error.error.code) == (answered_id, types.PARSE_ERROR)
    assert f"nests more than {MAX_NESTING} levels" in error.error.message
