"""The extension's lifespan when the SDK enters it more than once: it does so per connection on
some transports (SSE, and each in-process `Client`), so lifespans overlap and may end in any
order. The runtime starts with the first, is shared, and stops with the last."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import SessionManager, SessionsExtension
from server.config import LimitsSettings
from tests.helpers import build, code_of, echo, error_of, settings, text_of, until


def tools_call_handler(app: MCPServer[Any]) -> Any:
    entry = app._lowlevel_server.get_request_handler("tools/call")
    assert entry is not None
    return entry.handler


class Connection:
    """An in-process client connection held open in a task of its own until `leave()`: anyio
    scopes must be left in the task that entered them, so connections that end in another order
    than they began need a task each."""

    def __init__(self, app: MCPServer[Any], tg: anyio.abc.TaskGroup) -> None:
        self.app = app
        self._opened = anyio.Event()
        self._leave = anyio.Event()
        self._left = anyio.Event()
        self.client: Client | None = None
        tg.start_soon(self._hold)

    async def _hold(self) -> None:
        try:
            async with Client(self.app) as client:
                self.client = client
                self._opened.set()
                await self._leave.wait()
        finally:
            self._left.set()

    async def open(self) -> Client:
        await self._opened.wait()
        assert self.client is not None
        return self.client

    async def leave(self) -> None:
        self._leave.set()
        await self._left.wait()


async def test_a_connection_leaving_does_not_stop_the_runtime_for_the_others() -> None:
    app, sessions = build(settings(tool_timeouts={"hang_async": 0.2}))
    sdk_handler = tools_call_handler(app)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            first = Connection(app, tg)
            a = await first.open()  # starts the runtime
            second = Connection(app, tg)
            b = await second.open()
            assert text_of(await a.call_tool("echo", {"text": "a"})) == "a"
            assert text_of(await b.call_tool("echo", {"text": "b"})) == "b"
            assert tools_call_handler(app) is not sdk_handler  # taken over once

            await second.leave()  # the last one in leaves first
            assert sessions.ready
            assert text_of(await a.call_tool("echo", {"text": "still served"})) == "still served"
            assert code_of(await a.call_tool("hang_async", {})) == "timeout"  # the reaper still runs

            third = Connection(app, tg)
            c = await third.open()
            await first.leave()  # the one that started the runtime leaves before the last
            assert sessions.ready
            assert code_of(await c.call_tool("hang_async", {})) == "timeout"
            assert text_of(await c.call_tool("echo", {"text": "c"})) == "c"
            await third.leave()
    assert not sessions.ready
    assert tools_call_handler(app) is sdk_handler  # the last one out gave tools/call back
    m = sessions.manager.metrics()
    assert (m.total_sessions_completed, m.total_sessions_timeout, m.active_sessions) == (4, 2, 0)


async def test_connections_opening_at_once_share_one_runtime() -> None:
    app, sessions = build()
    sdk_handler = tools_call_handler(app)
    answers: list[str] = []

    async def one(n: int) -> None:
        async with Client(app) as client:
            answers.append(text_of(await client.call_tool("echo", {"text": str(n)})))
            assert sessions.ready

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(one, n)
    assert sorted(answers) == [str(n) for n in range(8)]
    assert not sessions.ready and tools_call_handler(app) is sdk_handler
    assert sessions.manager.metrics().total_sessions_completed == 8


async def test_the_runtime_restarts_after_the_last_lifespan_left() -> None:
    app, sessions = build()
    for text in ("one", "two"):
        async with Client(app) as client:
            assert text_of(await client.call_tool("echo", {"text": text})) == text
        assert not sessions.ready
    assert sessions.manager.metrics().total_sessions_completed == 2


async def test_one_extension_refuses_to_run_for_a_second_server() -> None:
    sessions = SessionsExtension(settings())
    other: MCPServer[Any] = MCPServer("other")
    app_with_ours: MCPServer[Any] = MCPServer("mine", extensions=[sessions], lifespan=sessions.lifespan)
    app_with_ours.add_tool(echo)
    async with sessions.lifespan(app_with_ours):
        with pytest.raises(RuntimeError, match="give each server its own"):
            async with sessions.lifespan(other):
                pass  # pragma: no cover - never entered
        assert sessions.ready
    assert not sessions.ready


class FailsToStart(SessionManager):
    """A manager whose first start fails (as a store that cannot be reached makes it)."""

    failures = 1

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        if self.failures:
            self.failures -= 1
            raise OSError("store unreachable")
        async with super().running():
            yield self


async def test_a_failed_start_raises_from_the_lifespan_and_leaves_nothing_behind() -> None:
    sessions = SessionsExtension(settings(), manager=FailsToStart(LimitsSettings()))
    app: MCPServer[Any] = MCPServer("flaky", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(echo)
    sdk_handler = tools_call_handler(app)
    with pytest.raises(OSError, match="store unreachable"):
        async with sessions.lifespan(app):
            pass  # pragma: no cover - never entered
    assert not sessions.ready and tools_call_handler(app) is sdk_handler
    async with Client(app) as client:  # the next start works
        assert text_of(await client.call_tool("echo", {"text": "up"})) == "up"


class ReaperFails(SessionManager):
    """A manager whose reaper raises once `fail` is set: the session runtime stops after start-up."""

    def __init__(self, limits: LimitsSettings) -> None:
        super().__init__(limits)
        self.fail = anyio.Event()

    async def _reap(self) -> None:
        await self.fail.wait()
        raise RuntimeError("reaper bug")


async def test_after_the_runtime_stopped_on_an_error_calls_are_told_to_restart_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReaperFails(LimitsSettings())
    sessions = SessionsExtension(settings(), manager=manager)
    app: MCPServer[Any] = MCPServer("crashing", extensions=[sessions], lifespan=sessions.lifespan)
    app.add_tool(echo)
    async with Client(app) as client:
        assert text_of(await client.call_tool("echo", {"text": "up"})) == "up"
        manager.fail.set()
        await until(lambda: not sessions.ready)
        error = error_of(await client.call_tool("echo", {"text": "x"}))
        create = error_of(await client.call_tool("session_create", {}))
    restart = "the session runtime stopped after an internal error (see the server log); restart the server"
    assert (error["code"], error["tool"], error["message"]) == ("not_running", "echo", restart)
    assert (create["code"], create["message"]) == ("not_running", restart)
    stopped = [r for r in caplog.records if r.getMessage().startswith("The session runtime stopped")]
    assert [r.getMessage() for r in stopped] == [
        "The session runtime stopped: tool calls are refused from now on; restart the server"
    ]
    assert stopped[0].exc_info is not None
