"""How a host embeds the extension, and what it is told when it gets it wrong: arguments of the
wrong kind are refused where they are passed (the constructor, `apply_settings`, `shutdown`,
`add_exit_listener`, the lifespan) with an error that names the fix, and leave nothing changed."""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.routing import Mount

from server import SessionManager, SessionsExtension, ShutdownReport, build_server
from server.config import LimitsSettings, StoreSettings, ToolSettings
from server.session import Session
from tests.helpers import build, code_of, echo, hang_async, settings, text_of

BAD_TIMEOUTS: list[tuple[Any, type[Exception], str]] = [
    (math.nan, ValueError, "finite number of seconds >= 0"),
    (math.inf, ValueError, "finite number of seconds >= 0"),
    (-1, ValueError, "finite number of seconds >= 0"),
    (10**400, ValueError, "finite number of seconds >= 0"),
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


@pytest.mark.parametrize(
    "wrong",
    [
        {"store": {"backend": "redis", "url": "redis://:hunter2@redis.internal:6379/0"}},
        StoreSettings(backend="redis", url="redis://:hunter2@redis.internal:6379/0"),
        "redis://:hunter2@redis.internal:6379/0",
    ],
    ids=["mapping", "store-section", "url-string"],
)
def test_a_refused_settings_argument_never_shows_a_store_password(wrong: Any) -> None:
    with pytest.raises(TypeError) as raised:
        SessionsExtension(wrong)
    assert "hunter2" not in str(raised.value), str(raised.value)
    with pytest.raises(TypeError) as raised:
        SessionManager(wrong)
    assert "hunter2" not in str(raised.value), str(raised.value)


@pytest.mark.parametrize(("wrong", "fix"), NOT_SETTINGS)
def test_the_extension_refuses_what_is_not_a_settings_and_says_how_to_make_one(wrong: Any, fix: str) -> None:
    with pytest.raises(TypeError, match=r"SessionsExtension\(\) takes a Settings, got ") as raised:
        SessionsExtension(wrong)
    assert re.search(fix, str(raised.value)), str(raised.value)


def test_the_extension_refuses_a_manager_that_is_not_a_session_manager() -> None:
    with pytest.raises(TypeError, match=r"manager=\.\.\.\) takes a SessionManager, got str"):
        SessionsExtension(settings(), manager="x")  # type: ignore[arg-type]


async def test_a_manager_given_to_the_extension_advertises_the_limits_it_enforces() -> None:
    # Its own limits (50 at once, 0.2 s deadlines), not those of the settings beside it (5, 30 s),
    # are the ones calls meet.
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=50, default_timeout_seconds=0.2))
    sessions = SessionsExtension(settings(max_concurrent_sessions=5, default_timeout_seconds=30.0), manager=manager)
    app = MCPServer("own-manager", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(echo)
    app.add_tool(hang_async)
    async with Client(app) as client:
        assert text_of(await client.call_tool("echo", {"text": "served"})) == "served"
        with anyio.fail_after(5):
            hung = await client.call_tool("hang_async", {})
        m = (await client.call_tool("session_metrics", {})).structured_content or {}
    assert code_of(hung) == "timeout" and "0.2s" in text_of(hung), text_of(hung)
    assert m["limits"]["max_concurrent_sessions"] == 50
    assert sessions.settings() == {"maxConcurrentSessions": 50, "defaultTimeoutSeconds": 0.2}
    sessions.apply_settings(settings(max_concurrent_sessions=7))
    assert sessions.settings()["maxConcurrentSessions"] == sessions.manager.limits.max_concurrent_sessions == 7


@pytest.mark.parametrize(("wrong", "fix"), [*NOT_SETTINGS, (None, r"load_settings\(path\)")])
def test_build_server_refuses_what_is_not_a_settings_and_says_how_to_make_one(wrong: Any, fix: str) -> None:
    with pytest.raises(TypeError, match=r"build_server\(\) takes a Settings, got ") as raised:
        build_server(wrong)
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


async def test_apply_settings_keeps_the_session_store_it_was_built_with_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, sessions = build(settings(max_concurrent_sessions=7))
    redis_store = StoreSettings(backend="redis", url="redis://127.0.0.1:1/0")
    new = settings(max_concurrent_sessions=9).model_copy(update={"store": redis_store})
    async with Client(app) as client:
        with caplog.at_level(logging.WARNING, logger="server.extension"):
            sessions.apply_settings(new)
        metrics = (await client.call_tool("session_metrics", {})).structured_content
    warned = [r.getMessage() for r in caplog.records if r.name == "server.extension"]
    assert any("[store] is ignored" in m and "memory store" in m for m in warned), warned
    assert sessions.config.store.backend == "memory", "the settings in force describe the store in use"
    assert metrics["limits"]["max_concurrent_sessions"] == 9 and metrics["cluster"] is None


def not_a_server(kind: str, app: MCPServer[Any]) -> object:
    if kind == "starlette":
        return Starlette(routes=[Mount("/", app=app.streamable_http_app())])
    if kind == "lowlevel":
        return app._lowlevel_server
    return "app"


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("starlette", "starlette.applications.Starlette"),
        ("lowlevel", "mcp.server.lowlevel.server.Server"),
        ("text", "str: 'app'"),
    ],
)
async def test_the_lifespan_refuses_an_app_that_is_not_the_mcp_server(kind: str, named: str) -> None:
    app, sessions = build()
    wrong = not_a_server(kind, app)
    with pytest.raises(TypeError, match=re.escape(f"takes the MCPServer the extension is installed in, got {named}")):
        async with sessions.lifespan(wrong):
            pass  # pragma: no cover - never entered
    assert not sessions.ready
    async with Client(app) as client:  # nothing was left started: the right app starts it
        assert text_of(await client.call_tool("echo", {"text": "served"})) == "served"


async def test_a_starlette_lifespan_that_passes_its_own_app_is_told_to_pass_the_mcp_server() -> None:
    app, sessions = build()

    @asynccontextmanager
    async def host_lifespan(star: Starlette) -> AsyncIterator[None]:
        async with sessions.lifespan(star), app.session_manager.run():
            yield  # pragma: no cover - never entered

    star = Starlette(routes=[Mount("/", app=app.streamable_http_app())], lifespan=host_lifespan)
    with pytest.raises(TypeError, match=r"got starlette\.applications\.Starlette.*sessions\.lifespan\(mcp_server\)"):
        async with star.router.lifespan_context(star):
            pass  # pragma: no cover - never entered


async def test_the_lifespan_with_no_app_still_runs_the_sessions() -> None:
    sessions = SessionsExtension(settings(tool_timeouts={"hang_async": 0.2}))

    @asynccontextmanager
    async def host_lifespan(app: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        async with sessions.lifespan() as state:
            yield state

    app: MCPServer[Any] = MCPServer("no-app", extensions=[sessions], lifespan=host_lifespan)
    app.add_tool(echo)
    app.add_tool(hang_async)
    async with Client(app) as client:
        assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
        assert code_of(await client.call_tool("hang_async", {})) == "timeout"


async def test_one_extension_entered_for_two_servers_names_both_in_its_refusal() -> None:
    app, sessions = build()
    other: MCPServer[Any] = MCPServer("other")
    async with Client(app):
        with pytest.raises(RuntimeError) as raised:
            async with sessions.lifespan(other):
                pass  # pragma: no cover - never entered
    message = str(raised.value)
    assert "already runs for the MCPServer 'test-server'" in message, message
    assert "entered for the MCPServer 'other'" in message and "give each server its own" in message


async def test_a_second_server_listing_a_running_extension_without_its_lifespan_is_refused_its_calls() -> None:
    # The extension runs for `app`; `second` lists it too but never enters its lifespan. Its
    # calls must not run unbounded on `app`'s registry and deadlines: each is refused, saying why.
    app, sessions = build(settings(default_timeout_seconds=0.2))
    second: MCPServer[Any] = MCPServer("second", extensions=[sessions])
    second.add_tool(echo)
    second.add_tool(hang_async)
    async with Client(app) as first_client, Client(second) as second_client:
        with anyio.fail_after(5):
            refused = [await second_client.call_tool(name, {}) for name in ("hang_async", "session_create")]
        served = await first_client.call_tool("echo", {"text": "still served"})
        metrics = (await first_client.call_tool("session_metrics", {})).structured_content
    for result in refused:
        assert code_of(result) == "not_running", text_of(result)
        assert "runs for the MCPServer 'test-server'" in text_of(result)
        assert "give each server its own SessionsExtension" in text_of(result)
    assert text_of(served) == "still served"
    assert metrics["total_sessions_created"] == 1, "only the first server's call ran as a session"


async def test_a_server_that_runs_the_lifespan_but_lists_no_extension_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sessions = SessionsExtension(settings())
    app: MCPServer[Any] = MCPServer("forgot", lifespan=sessions.lifespan)
    app.add_tool(echo)
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
    [warning] = [r.getMessage() for r in caplog.records if "not in the server's extensions" in r.getMessage()]
    assert "the MCPServer 'forgot'" in warning and "MCPServer(..., extensions=[sessions]" in warning
    assert sessions.manager.metrics().total_sessions_created == 0  # what the warning is about


async def test_a_server_that_lists_another_sessions_extension_than_its_lifespan_runs_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listed = SessionsExtension(settings())
    running = SessionsExtension(settings())
    app: MCPServer[Any] = MCPServer("mixed", extensions=[listed], lifespan=running.lifespan)
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app):
            pass
    [warning] = [r.getMessage() for r in caplog.records if "it lists another one" in r.getMessage()]
    assert "Pass the same object to both" in warning


async def test_a_server_wired_the_readme_way_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    with caplog.at_level(logging.WARNING, logger="server.extension"):
        async with Client(app) as client:
            assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def notify_async(report: ShutdownReport, who: str) -> None:
    raise AssertionError("never called")  # pragma: no cover


class AsyncNotifier:
    async def __call__(self, report: ShutdownReport) -> None:
        raise AssertionError("never called")  # pragma: no cover


@pytest.mark.parametrize(
    ("listener", "says"),
    [
        (None, "takes a function to call with the ShutdownReport, got NoneType"),
        ("print", "takes a function to call with the ShutdownReport, got str"),
        (notify_async, r"\(async\) would never run"),
        (functools.partial(notify_async, who="ops"), r"\(async\) would never run"),
        (AsyncNotifier(), r"\(async\) would never run"),
        (functools.partial(AsyncNotifier()), r"\(async\) would never run"),
    ],
)
async def test_add_exit_listener_refuses_what_it_could_not_call_and_the_shutdown_still_runs(
    listener: Any, says: str
) -> None:
    app, sessions = build()
    called: list[ShutdownReport] = []
    with pytest.raises(TypeError, match=says):
        sessions.add_exit_listener(listener)
    sessions.add_exit_listener(called.append)  # a plain callable is still taken
    async with Client(app) as client:
        with anyio.fail_after(5):
            result = await client.call_tool("server_shutdown", {"timeout_seconds": 0})
    assert not result.is_error, text_of(result)  # the refused listener was never added
    assert len(called) == 1


def test_add_exit_listener_takes_plain_callables() -> None:
    class Notifier:
        def __call__(self, report: ShutdownReport) -> None:
            pass  # pragma: no cover

    def notify(report: ShutdownReport, who: str) -> None:
        pass  # pragma: no cover

    sessions = SessionsExtension(settings())
    listeners: list[Callable[[ShutdownReport], None]] = [
        Notifier(),
        functools.partial(notify, who="ops"),
        lambda report: None,
        Notifier().__call__,
    ]
    for listener in listeners:
        sessions.add_exit_listener(listener)
    assert sessions._exit_listeners == listeners
