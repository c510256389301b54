"""How a host embeds the extension, and what it is told when it gets it wrong: arguments of the
wrong kind are refused where they are passed (the constructor, `apply_settings`, `shutdown`,
`add_exit_listener`, the lifespan) with an error that names the fix, and leave nothing changed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from server import SessionManager, SessionsExtension
from server.config import LimitsSettings, ToolSettings
from server.session import Session
from tests.helpers import build, code_of, settings, text_of

BAD_TIMEOUTS: list[tuple[Any, type[Exception], str]] = [
    (math.nan, ValueError, "finite number of seconds >= 0"),
    (math.inf, ValueError, "finite number of seconds >= 0"),
    (-1, ValueError, "finite number of seconds >= 0"),
    ("5", TypeError, "got str"),
    (True, TypeError, "got bool"),
]


@pytest.mark.parametrize(("bad", "error", "says"), BAD_TIMEOUTS)
async def test_a_shutdown_with_a_bad_timeout_is_refused_and_the_server_keeps_serving(
    bad: Any, error: type[Exception], says: str
) -> None:
    app, sessions = build()
    async with Client(app) as client:
        with pytest.raises(error, match=says):
            await sessions.shutdown(bad)
        assert sessions.ready and not sessions.manager.shutting_down
        assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
        with anyio.fail_after(5):  # a later shutdown runs (it used to wait forever)
            result = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
        assert not result.is_error and result.structured_content["final_active_sessions"] == 0
        assert code_of(await client.call_tool("echo", {"text": "late"})) == "shutting_down"


@pytest.mark.parametrize(("bad", "error", "says"), BAD_TIMEOUTS)
async def test_the_manager_refuses_a_bad_shutdown_timeout_before_it_stops_admitting(
    bad: Any, error: type[Exception], says: str
) -> None:
    manager = SessionManager()
    with pytest.raises(error, match=says):
        await manager.shutdown(bad)
    assert not manager.shutting_down
    with anyio.fail_after(5):
        report = await manager.shutdown(0)
    assert report.initial_active_sessions == 0


async def test_a_shutdown_that_fails_half_way_leaves_no_caller_waiting_forever() -> None:
    manager = SessionManager()

    def stop_fails() -> None:
        raise RuntimeError("the work would not stop")

    failures: list[BaseException] = []

    async def first_shutdown() -> None:
        try:
            await manager.shutdown(0.05)
        except RuntimeError as exc:
            failures.append(exc)

    async with manager.running():
        session: Session = await manager.create(tool="work", timeout_seconds=60)
        session.on_cancel = stop_fails  # what shutdown calls for a session cancelled at its deadline
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first_shutdown)
                await manager.wait_shutting_down()
                joined = await manager.shutdown(0.05)  # joins the failing one, then runs it again
            again = await manager.shutdown(0)
    assert [str(exc) for exc in failures] == ["the work would not stop"]
    assert joined is again and joined.final_active_sessions == 0
    assert manager.metrics().total_sessions_cancelled == 1


NOT_SETTINGS: list[tuple[Any, str]] = [
    ("config/default.toml", r"load_settings\('config/default.toml'\)"),
    (Path("config/default.toml"), r"load_settings\('config/default.toml'\)"),
    ({"limits": {"max_concurrent_sessions": 3}}, r"Settings\(\*\*mapping\)"),
    (LimitsSettings(max_concurrent_sessions=3), r"Settings\(limits=LimitsSettings\(...\)\)"),
    (ToolSettings(timeout_seconds=1), r"Settings\(tools=\{'TOOL_NAME': ToolSettings\(...\)\}\)"),
    (42, r"load_settings\(path\)"),
]


@pytest.mark.parametrize(("wrong", "fix"), NOT_SETTINGS)
def test_the_extension_refuses_what_is_not_a_settings_and_says_how_to_make_one(wrong: Any, fix: str) -> None:
    with pytest.raises(TypeError, match=r"SessionsExtension\(\) takes a Settings, got ") as raised:
        SessionsExtension(wrong)
    assert re.search(fix, str(raised.value)), str(raised.value)


@pytest.mark.parametrize(("wrong", "fix"), [*NOT_SETTINGS, (None, r"load_settings\(path\)")])
async def test_apply_settings_refuses_what_is_not_a_settings_and_keeps_the_settings_in_force(
    wrong: Any, fix: str
) -> None:
    app, sessions = build(settings(max_concurrent_sessions=7))
    before = sessions.config
    async with Client(app) as client:
        with pytest.raises(TypeError, match=r"apply_settings\(\) takes a Settings, got ") as raised:
            sessions.apply_settings(wrong)
        assert re.search(fix, str(raised.value)), str(raised.value)
        assert sessions.config is before and sessions.manager.limits.max_concurrent_sessions == 7
        assert text_of(await client.call_tool("echo", {"text": "served"})) == "served"
        created = await client.call_tool("session_create", {})
        assert not created.is_error and created.structured_content["timeout_seconds"] == 30.0
        # A Settings is still taken, and applies.
        sessions.apply_settings(settings(max_concurrent_sessions=9))
        limits = (await client.call_tool("session_metrics", {})).structured_content["limits"]
    assert limits["max_concurrent_sessions"] == 9
