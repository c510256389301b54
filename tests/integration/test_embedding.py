"""How a host embeds the extension, and what it is told when it gets it wrong: arguments of the
wrong kind are refused where they are passed (the constructor, `apply_settings`, `shutdown`,
`add_exit_listener`, the lifespan) with an error that names the fix, and leave nothing changed."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from mcp import Client

from server import SessionManager
from server.session import Session
from tests.helpers import build, code_of, text_of

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
