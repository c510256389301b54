"""Property-based hostile arguments for the four session tools, through a real server process.

Each bad argument gets a tool result with `isError`, the `invalid_argument` code (or its own
specific code: `metadata_too_large`, `unknown_session`, `already_released`) and a message that
names the problem; the server keeps serving, holds nothing it should not, and only the
counters the refusal concerns change.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ERROR_META_KEY
from tests.hostile.conftest import Raw

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Refusals must not touch these: no session was created, nothing ended.
SESSION_COUNTERS = (
    "total_sessions_created",
    "active_sessions",
    *(f"total_sessions_{s}" for s in ("completed", "error", "timeout", "cancelled")),
)

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200)


def pre_parsed_by_the_sdk(value: str) -> bool:
    """Whether the SDK reads this string argument as the JSON in it: for a parameter that is
    not a `str`, a string holding JSON null, a list or an object is replaced by that value
    before validation (for clients that send JSON inside strings). So `"null"` means the
    parameter was not given, and `'{"k": 1}'` is an object (see the test at the end)."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return False
    return not isinstance(parsed, str | int | float)


#: Text that stays a string for validation (a wrong type for any parameter that is not a `str`).
text_as_such = text.filter(lambda value: not pre_parsed_by_the_sdk(value))
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | text
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
small_metadata = st.dictionaries(st.text(max_size=20), json_values, max_size=5).filter(
    lambda m: len(json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()) <= 2000
)
not_a_string = (
    st.integers() | st.booleans() | st.lists(json_scalars, max_size=3) | st.dictionaries(text, json_scalars, max_size=3)
)
bad_timeout = (
    st.floats(max_value=0.0)
    | st.sampled_from([math.nan, math.inf, -math.inf, 0, -1])
    | st.integers(max_value=0)
    | text_as_such
    | st.booleans()
    | st.lists(st.floats(), max_size=2)
    | st.dictionaries(text, json_scalars, max_size=2)
)
#: server_shutdown takes 0 (cancel at once, like shutdown.timeout_seconds = 0); below 0 is wrong.
bad_shutdown_timeout = (
    st.floats(max_value=-1e-9)
    | st.sampled_from([math.nan, math.inf, -math.inf, -1])
    | st.integers(max_value=-1)
    | text_as_such
    | st.booleans()
    | st.lists(st.floats(), max_size=2)
    | st.dictionaries(text, json_scalars, max_size=2)
)
not_an_object = st.lists(json_scalars, max_size=3) | text_as_such | st.integers() | st.booleans() | st.floats()


def result_of(response: dict[str, Any]) -> dict[str, Any]:
    assert "result" in response, f"expected a tool result, got {response}"
    result: dict[str, Any] = response["result"]
    return result


def refusal(response: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable error of a refused call (asserting it is well formed)."""
    result = result_of(response)
    assert result.get("isError") is True, result
    assert "structuredContent" not in result, result
    error: dict[str, Any] = result["_meta"][ERROR_META_KEY]
    assert error["message"] and result["content"][0]["text"] == error["message"]
    return error


def unchanged(before: dict[str, Any], after: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert after[key] == before[key], (key, before[key], after[key])


@SETTINGS
@given(provider=text, model=text, timeout=st.none() | st.floats(min_value=5.0, max_value=1e9), metadata=small_metadata)
def test_valid_arguments_of_any_content_open_a_session_that_releases(
    raw: Raw, provider: str, model: str, timeout: float | None, metadata: dict[str, Any]
) -> None:
    before = raw.metrics()
    arguments = {"provider": provider, "model": model, "timeout_seconds": timeout, "metadata": metadata}

    created = result_of(raw.call("session_create", arguments))

    assert not created.get("isError"), created
    session = created["structuredContent"]
    assert session["state"] == "active" and 0 < session["timeout_seconds"] <= before["limits"]["max_timeout_seconds"]
    released = result_of(raw.call("session_release", {"session_id": session["session_id"]}))
    assert released["structuredContent"]["state"] == "completed"
    after = raw.metrics()
    assert after["total_sessions_created"] == before["total_sessions_created"] + 1
    assert after["active_sessions"] == before["active_sessions"] and after["current_metadata_bytes"] == 0


@SETTINGS
@given(
    field_value=st.one_of(
        st.tuples(st.just("provider"), not_a_string),
        st.tuples(st.just("model"), not_a_string),
        st.tuples(st.just("timeout_seconds"), bad_timeout),
        st.tuples(st.just("metadata"), not_an_object),
    )
)
def test_a_wrong_type_or_value_for_session_create_is_invalid_argument_naming_the_field(
    raw: Raw, field_value: tuple[str, Any]
) -> None:
    field, value = field_value
    before = raw.metrics()

    error = refusal(raw.call("session_create", {field: value}))

    assert error["code"] == "invalid_argument", error
    assert field in error["message"], error
    unchanged(before, raw.metrics(), *SESSION_COUNTERS, "sessions_rejected_capacity", "sessions_rejected_metadata_size")


@SETTINGS
@given(session_id=text | st.uuids().map(str) | st.from_regex(r"s[0-9a-f]{12}-[0-9]{1,6}", fullmatch=True))
def test_releasing_an_id_never_issued_is_unknown_session(raw: Raw, session_id: str) -> None:
    before = raw.metrics()

    error = refusal(raw.call("session_release", {"session_id": session_id}))

    # A generated id is never one of the server's (their prefix holds 48 random bits), so it is
    # unknown, never a tool call's session (which would be invalid_argument).
    assert error["code"] == "unknown_session", error
    unchanged(before, raw.metrics(), *SESSION_COUNTERS)


@SETTINGS
@given(arguments=st.dictionaries(text, json_scalars, max_size=4) | not_an_object)
def test_release_with_missing_or_wrong_fields_is_invalid_argument(raw: Raw, arguments: Any) -> None:
    if isinstance(arguments, dict) and isinstance(arguments.get("session_id"), str):
        arguments["session_id"] = 12345  # keep it wrong: a string id is the previous test's case
    before = raw.metrics()

    response = raw.call("session_release", arguments)

    if "error" in response:  # arguments that are not an object: the SDK refuses the request itself
        assert not isinstance(arguments, dict), response
        assert response["error"]["code"] == -32602, response  # INVALID_PARAMS
    else:
        assert refusal(response)["code"] == "invalid_argument"
    unchanged(before, raw.metrics(), *SESSION_COUNTERS)


def test_releasing_twice_is_already_released(raw: Raw) -> None:
    session = result_of(raw.call("session_create", {}))["structuredContent"]
    assert result_of(raw.call("session_release", {"session_id": session["session_id"]}))["structuredContent"]
    before = raw.metrics()

    error = refusal(raw.call("session_release", {"session_id": session["session_id"]}))

    assert error["code"] == "already_released" and error["session_id"] == session["session_id"]
    unchanged(before, raw.metrics(), *SESSION_COUNTERS)


@SETTINGS
@given(timeout=bad_shutdown_timeout, token=st.none() | not_a_string)
def test_server_shutdown_with_bad_arguments_is_refused_and_the_server_stays_up(
    raw: Raw, timeout: Any, token: Any
) -> None:
    arguments: dict[str, Any] = {"timeout_seconds": timeout}
    if token is not None:
        arguments["token"] = token

    error = refusal(raw.call("server_shutdown", arguments))

    assert error["code"] == "invalid_argument", error
    assert raw.metrics()["shutdown_requested"] is False


@SETTINGS
@given(
    extra=st.dictionaries(
        text.filter(lambda k: k not in ("provider", "model", "timeout_seconds", "metadata")),
        json_values,
        min_size=1,
        max_size=3,
    )
)
def test_extra_fields_are_refused_by_session_metrics_and_create(raw: Raw, extra: dict[str, Any]) -> None:
    # The SDK would drop unknown keys; the session tools refuse them, whatever their names and
    # values, and no session is made.
    before = raw.metrics()
    for tool in ("session_metrics", "session_create"):
        error = refusal(raw.call(tool, extra))
        assert error["code"] == "invalid_argument" and error["tool"] == tool, error
        assert f"for {tool}:" in error["message"] and len(error["message"]) < 1000, error
    assert raw.metrics()["total_sessions_created"] == before["total_sessions_created"]


def test_ten_megabytes_of_metadata_is_metadata_too_large_and_leaves_no_memory_behind(raw: Raw) -> None:
    huge = {"blob": "x" * (10 * 1024 * 1024)}
    before = raw.metrics()
    error = refusal(raw.call("session_create", {"metadata": huge}))
    assert error["code"] == "metadata_too_large"
    # The allocator keeps some of each 10 MiB message around (RSS swings by ~40 MiB from call to
    # call), so compare peaks: a leak of the refused metadata would grow by 10 MiB a call.
    warm_peak = max(refuse_and_measure(raw, huge) for _ in range(4))
    late_peak = max(refuse_and_measure(raw, huge) for _ in range(12))
    grown_mib = (late_peak - warm_peak) / 1024

    after = raw.metrics()
    assert after["sessions_rejected_metadata_size"] - before["sessions_rejected_metadata_size"] == 17
    assert after["current_metadata_bytes"] == 0
    unchanged(before, after, *SESSION_COUNTERS)
    assert grown_mib < 60, f"the server grew by {grown_mib:.0f} MiB over 12 more 10 MiB refusals"


def refuse_and_measure(raw: Raw, metadata: dict[str, Any]) -> int:
    assert refusal(raw.call("session_create", {"metadata": metadata}))["code"] == "metadata_too_large"
    return raw.rss_kib()


def test_metadata_nested_ten_thousand_levels_is_refused_and_the_server_stays_up(raw: Raw) -> None:
    depth = 10_000
    nested = '{"d":' * depth + '"bottom"' + "}" * depth  # beyond what json.dumps can write

    def line(request_id: int) -> str:
        start = f'{{"jsonrpc":"2.0","id":{request_id},"method":"tools/call","params":{{"name":"session_create",'
        return start + f'"arguments":{{"metadata":{nested}}}}}}}'

    before = raw.metrics()

    # Deeper than the JSON parser reads: a protocol error, answered with the request's id (read
    # from the top level), so the client is not left waiting for its timeout.
    error = raw.portal.call(raw.server.request_text, line)
    assert error["error"]["code"] == -32700, error
    assert error["error"]["message"].startswith("Parse error: the message nests more than 200 levels"), error
    unchanged(before, raw.metrics(), *SESSION_COUNTERS)


def test_json_inside_a_string_argument_is_read_as_that_json(raw: Raw) -> None:
    # The SDK's own leniency, kept by the session tools: "null" is the parameter not given (the
    # configured default timeout), an object in a string is that object. A number in a string
    # stays a string, and is refused.
    assert pre_parsed_by_the_sdk(" null ") and pre_parsed_by_the_sdk('{"k": 1}') and not pre_parsed_by_the_sdk("30")
    created = result_of(raw.call("session_create", {"timeout_seconds": " null ", "metadata": '{"k": 1}'}))
    session = created["structuredContent"]
    assert not created.get("isError") and session["timeout_seconds"] == 30.0, created
    assert raw.metrics()["current_metadata_bytes"] == len('{"k":1}')
    assert result_of(raw.call("session_release", {"session_id": session["session_id"]}))["structuredContent"]
    assert refusal(raw.call("session_create", {"timeout_seconds": "30"}))["code"] == "invalid_argument"
