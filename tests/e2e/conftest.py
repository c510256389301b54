"""The standalone server as a real process: start it, talk to it, stop it, watch its pipes.

`start_server(...)` runs `python -m server --config <tmp TOML>` from the repository root and
pumps its pipes in a task group: every stdout line is parsed as a JSON-RPC message (a line
that is not one is kept in `stray_stdout`), every stderr line is kept in `stderr_lines`. A
test then talks to the process either through the SDK's `Client` (`server.client()`) or with
raw JSON-RPC lines (`initialize`, `request`, `notify`) where it needs control the SDK client
does not give (closing stdin, signals, exit codes). Over streamable HTTP, `start_server`
returns once the server has printed its URL on stderr and `server.url` holds it.

Every wait is bounded, and a process still running when its test ends is killed (by its own
pid) before the test's teardown finishes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from anyio.abc import Process, SocketStream
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.text import TextReceiveStream
from mcp import Client
from mcp.shared.message import SessionMessage
from mcp_types import CallToolResult, JSONRPCError, JSONRPCResponse, jsonrpc_message_adapter
from pydantic import ValidationError

from tests.helpers import error_of

ClientStreams = tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]

ROOT = Path(__file__).resolve().parents[2]
TOOL_MODULE = "tests.fixtures.e2e_tools"
HOST = "127.0.0.1"
#: How long a server may take to start (import the SDK, load the tool module, bind).
START_SECONDS = 20.0
PROTOCOL_VERSION = "2025-11-25"
#: Bound on every MCP request a test makes through the SDK's client.
CALL_SECONDS = 10.0

TomlValue = str | int | float | bool | list[str]
Config = Mapping[str, Mapping[str, TomlValue] | Mapping[str, Mapping[str, TomlValue]]]


def render_toml(config: Config) -> str:
    """A TOML document from `{"section": {"key": value}}` (and `{"tools": {"name": {...}}}`)."""
    out: list[str] = []
    for section, body in config.items():
        tables = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        out.append(f"[{section}]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in body.items() if not isinstance(value, Mapping))
        for name, table in tables.items():
            out.append(f"[{section}.{name}]")
            out.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(out) + "\n"


def server_config(
    *,
    limits: Mapping[str, TomlValue] | None = None,
    shutdown: Mapping[str, TomlValue] | None = None,
    tools: Mapping[str, Mapping[str, TomlValue]] | None = None,
) -> dict[str, Any]:
    """A config hosting the e2e tool module, with `hang_async`/`hang_sync` on 0.5 s deadlines."""
    return {
        "server": {"tool_modules": [TOOL_MODULE]},
        "limits": dict(limits or {}),
        "shutdown": {"timeout_seconds": 5.0, **(shutdown or {})},
        "tools": {
            "hang_async": {"timeout_seconds": 0.5},
            "hang_sync": {"timeout_seconds": 0.5},
            **(tools or {}),
        },
    }


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without MCP_SESSIONS_* overrides (they would change the config)
    and without PYTHONUNBUFFERED: a user's server has a block-buffered `sys.stdout` on a pipe,
    where a tool's stray `print` lingers until something flushes it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MCP_SESSIONS_")}
    env.pop("PYTHONUNBUFFERED", None)
    env.update(extra or {})
    return env


def tool_result(response: Mapping[str, Any]) -> CallToolResult:
    """The `CallToolResult` of a raw `tools/call` response (asserting it is a result)."""
    assert "result" in response, f"expected a result, got {response}"
    return CallToolResult.model_validate(response["result"])


async def metrics(client: Client) -> dict[str, Any]:
    """`session_metrics`, checking the accounting invariant on the way."""
    result = await client.call_tool("session_metrics", {})
    assert not result.is_error, result
    data: dict[str, Any] = result.structured_content or {}
    ended = ("completed", "error", "timeout", "cancelled")
    accounted = data["active_sessions"] + sum(data[f"total_sessions_{state}"] for state in ended)
    assert data["total_sessions_created"] == accounted, f"invariant broken: {data}"
    return data


async def metrics_until(client: Client, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Ask `session_metrics` until `predicate` holds: each ask is a round trip, no sleeping; bounded."""
    with anyio.fail_after(5):
        while not predicate(data := await metrics(client)):
            pass
    return data


class ServerProcess:
    """One running server process and what it has written so far."""

    def __init__(self, process: Process, config_path: Path) -> None:
        self.process = process
        self.config_path = config_path
        #: The thread whose event loop reads the process's pipes (its events wake that loop only),
        #: and, for a server run from a blocking portal (`shared_http_server`), that portal.
        self.loop_thread = threading.get_ident()
        self.portal: BlockingPortal | None = None
        self.url: str | None = None
        self.stdout_lines: list[str] = []
        #: stdout lines that are not JSON-RPC messages (must stay empty on stdio).
        self.stray_stdout: list[str] = []
        self.stderr_lines: list[str] = []
        self.stdout_closed = anyio.Event()
        self.stderr_closed = anyio.Event()
        self._stderr_grew = anyio.Event()
        self._responses: dict[int | str, dict[str, Any]] = {}
        self._response_arrived: dict[int | str, anyio.Event] = {}
        self._to_client: MemoryObjectSendStream[SessionMessage | Exception] | None = None
        self._next_id = 1000
        #: Set while the test reads the process's stdout (see `stop_reading`).
        self._reading = anyio.Event()
        self._reading.set()
        #: Error responses with `"id": null` (answers to lines the server could not read).
        self.unreadable_errors: list[dict[str, Any]] = []
        self._unreadable_arrived = anyio.Event()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop_reading(self) -> None:
        """Read no more of the process's stdout (a busy client): once the pipe's buffer is full,
        the server's writes block, until `resume_reading`."""
        self._reading = anyio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    def messages_for(self, request_id: int | str) -> list[dict[str, Any]]:
        """Every response the process wrote for `request_id`, in order (JSON-RPC allows one)."""
        found = []
        for line in self.stdout_lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "method" not in message and message.get("id") == request_id:
                found.append(message)
        return found

    # -- pipes -----------------------------------------------------------------------------

    async def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = ""
        try:
            async for chunk in TextReceiveStream(self.process.stdout, errors="replace"):
                *lines, buffer = (buffer + chunk).split("\n")
                for line in lines:
                    await self._on_stdout_line(line)
                await self._reading.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            if buffer:
                self.stdout_lines.append(buffer)
                self.stray_stdout.append(buffer)  # no newline at the end: not a complete message
            if self._to_client is not None:
                self._to_client.close()
            self.stdout_closed.set()

    async def _on_stdout_line(self, line: str) -> None:
        self.stdout_lines.append(line)
        try:
            message = jsonrpc_message_adapter.validate_json(line, by_name=False)
        except ValidationError:
            self.stray_stdout.append(line)
            return
        if self._to_client is not None:
            await self._to_client.send(SessionMessage(message))
        elif isinstance(message, JSONRPCError) and message.id is None:
            self.unreadable_errors.append(json.loads(line))
            self._unreadable_arrived.set()
            self._unreadable_arrived = anyio.Event()
        elif isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
            self._responses[message.id] = json.loads(line)
            arrived = self._response_arrived.pop(message.id, None)
            if arrived is not None:
                arrived.set()

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        buffer = ""
        try:
            async for chunk in TextReceiveStream(self.process.stderr, errors="replace"):
                *lines, buffer = (buffer + chunk).split("\n")
                self.stderr_lines.extend(line + "\n" for line in lines)
                self._stderr_grew.set()
                self._stderr_grew = anyio.Event()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            if buffer:
                self.stderr_lines.append(buffer)
            self._stderr_grew.set()
            self.stderr_closed.set()

    async def wait_stderr(self, text: str, within: float = 10.0) -> str:
        """The first stderr line containing `text`, waiting (at most `within` seconds) until it is
        written. From another thread's event loop (a test using `shared_http_server`), the wait
        runs on the portal's: there an event the reader sets would not wake the waiter."""
        if threading.get_ident() != self.loop_thread:
            portal = self.portal
            assert portal is not None, "wait on a ServerProcess from the event loop that reads its pipes"
            return await anyio.to_thread.run_sync(portal.call, self.wait_stderr, text, within)
        with anyio.fail_after(within):
            while True:
                for line in self.stderr_lines:
                    if text in line:
                        return line
                if self.stderr_closed.is_set():
                    raise AssertionError(f"the server closed stderr without writing {text!r}:\n{self.stderr}")
                await self._stderr_grew.wait()

    # -- raw JSON-RPC ----------------------------------------------------------------------

    async def send(self, message: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(message) + "\n").encode())

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = dict(params)
        await self.send(message)

    async def start_request(self, method: str, params: Mapping[str, Any]) -> int:
        """Send a request without waiting for its response; returns its id."""
        self._next_id += 1
        request_id = self._next_id
        self._response_arrived[request_id] = anyio.Event()
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params)})
        return request_id

    async def response(self, request_id: int | str, within: float = 10.0) -> dict[str, Any]:
        """The response to request `request_id`, waiting for it (at most `within` seconds)."""
        with anyio.fail_after(within):
            if request_id not in self._responses:
                await self._response_arrived[request_id].wait()
        return self._responses[request_id]

    async def request(self, method: str, params: Mapping[str, Any], within: float = 10.0) -> dict[str, Any]:
        return await self.response(await self.start_request(method, params), within)

    async def request_with_id(
        self, request_id: int | str, method: str, params: Mapping[str, Any], within: float = 10.0
    ) -> dict[str, Any]:
        """`request` with the JSON-RPC id given (one not used before in this process)."""
        self._response_arrived[request_id] = anyio.Event()
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params)})
        return await self.response(request_id, within)

    async def send_line(self, line: str | bytes) -> None:
        """Write one line as it is (malformed on purpose, say)."""
        assert self.process.stdin is not None
        data = line.encode() if isinstance(line, str) else line
        await self.process.stdin.send(data + b"\n")

    async def next_unreadable_error(self, seen: int, within: float = 10.0) -> dict[str, Any]:
        """The first `"id": null` error after the first `seen` ones, waiting for it (bounded)."""
        with anyio.fail_after(within):
            while len(self.unreadable_errors) <= seen:
                await self._unreadable_arrived.wait()
        return self.unreadable_errors[seen]

    async def request_text(self, build: Callable[[int], str], within: float = 10.0) -> dict[str, Any]:
        """Send a request written by hand (`build(request_id)` returns its JSON text, which may be
        beyond what `json.dumps` can write) and wait for its response."""
        self._next_id += 1
        request_id = self._next_id
        self._response_arrived[request_id] = anyio.Event()
        assert self.process.stdin is not None
        await self.process.stdin.send((build(request_id) + "\n").encode())
        return await self.response(request_id, within)

    async def start_call(self, tool: str, arguments: Mapping[str, Any] | None = None) -> int:
        return await self.start_request("tools/call", {"name": tool, "arguments": dict(arguments or {})})

    async def call(self, tool: str, arguments: Mapping[str, Any] | None = None, within: float = 10.0) -> CallToolResult:
        """Call a tool with a raw `tools/call` and wait (at most `within` seconds) for its result."""
        return tool_result(await self.response(await self.start_call(tool, arguments), within))

    async def call_result(self, request_id: int, within: float = 10.0) -> CallToolResult:
        """The result of a `tools/call` started with `start_call`."""
        return tool_result(await self.response(request_id, within))

    async def initialize(self) -> dict[str, Any]:
        """The legacy handshake: `initialize`, then `notifications/initialized`."""
        response = await self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "e2e", "version": "0"},
            },
        )
        assert "result" in response, response
        await self.notify("notifications/initialized")
        return response

    # -- the SDK client --------------------------------------------------------------------

    def client(self) -> Client:
        """The SDK's client for this server: over its URL (HTTP) or its pipes (stdio)."""
        if self.url is not None:
            return Client(self.url, read_timeout_seconds=CALL_SECONDS)
        return Client(self.transport(), read_timeout_seconds=CALL_SECONDS)

    @asynccontextmanager
    async def transport(self) -> AsyncIterator[ClientStreams]:
        """A `Transport` for `mcp.Client` over this process's stdin/stdout (stdio servers)."""
        to_client, from_server = anyio.create_memory_object_stream[SessionMessage | Exception](32)
        to_server, from_client = anyio.create_memory_object_stream[SessionMessage](32)
        self._to_client = to_client

        async def write() -> None:
            async with from_client:
                async for item in from_client:
                    line = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    try:
                        await self.send(json.loads(line))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        return  # the server has gone; its stdout EOF ends the client's reads

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            try:
                yield from_server, to_server
            finally:
                tg.cancel_scope.cancel()
                self._to_client = None
                to_client.close()

    # -- process ---------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def wait_exit(self, within: float) -> int:
        """The exit status, once the process has exited and closed its pipes (at most `within` seconds)."""
        with anyio.fail_after(within):
            code = await self.process.wait()
            await self.stdout_closed.wait()
            await self.stderr_closed.wait()
        return code


#: Bound on reading one raw connection to its end (`read_to_end`).
READ_SECONDS = 10.0


async def connect(server: ServerProcess) -> SocketStream:
    """A raw TCP connection to an HTTP server's port: for what no HTTP client sends (a head
    without its body, garbage, nothing at all)."""
    assert server.url is not None, "not an HTTP server"
    host, _, port = server.url.removeprefix("http://").removesuffix("/mcp").rpartition(":")
    return await anyio.connect_tcp(host, int(port))


async def read_to_end(stream: SocketStream) -> bytes:
    """What the server sends on `stream` until it closes the connection (bounded); then closed."""
    data = b""
    with anyio.fail_after(READ_SECONDS):
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    await stream.aclose()
    return data


#: `python -c` this SOFT HARD COMMAND...: run COMMAND (the same process, so the same pid) with
#: those limits on open file descriptors.
_WITH_FILES_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


@asynccontextmanager
async def start_server(
    directory: Path,
    config: Config,
    *,
    transport: str = "stdio",
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    wait_ready: bool = True,
    files_limit: tuple[int, int] | None = None,
) -> AsyncIterator[ServerProcess]:
    """Run the server as a process for the `async with` body; kill it if it is still running after.

    Over streamable HTTP it listens on `port` (default: a free one) and, with `wait_ready`,
    the body starts once the server has printed its URL. `files_limit` is the process's
    (soft, hard) limit on open file descriptors (`RLIMIT_NOFILE`), set before it starts.
    """
    config_path = directory / "server.toml"
    config_path.write_text(render_toml(config), encoding="utf-8")
    command = [sys.executable, "-m", "server", "--config", str(config_path)]
    if transport != "stdio":
        port = port if port is not None else free_port()
        command += ["--transport", transport, "--host", HOST, "--port", str(port)]
    if files_limit is not None:
        command = [sys.executable, "-c", _WITH_FILES_LIMIT, *map(str, files_limit), *command]
    process = await anyio.open_process(command, cwd=ROOT, env=server_env(env), start_new_session=True)
    server = ServerProcess(process, config_path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server._pump_stdout)
            tg.start_soon(server._pump_stderr)
            try:
                if port is not None and wait_ready:
                    url = f"http://{HOST}:{port}/mcp"
                    await server.wait_stderr(url, within=START_SECONDS)
                    server.url = url
                yield server
            finally:
                with anyio.CancelScope(shield=True):
                    await _stop(server)
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await process.aclose()


async def listen_through_sigterm(server: ServerProcess, within: float) -> tuple[list[object], int]:
    """Open a `subscriptions/listen` stream (protocol 2026-07-28, the SDK client's default), send
    SIGTERM, and read the stream to its end: (the events it carried, the exit status). The SDK's
    client raises `SubscriptionLost` for a stream cut without its result."""
    events: list[object] = []
    with anyio.fail_after(within):
        async with server.client() as client, client.listen(tools_list_changed=True) as subscription:
            server.send_signal(signal.SIGTERM)
            async for event in subscription:
                events.append(event)
        return events, await server.wait_exit(within=within)


#: How long the work of a call that holds the shutdown off lasts: far past any exit we accept.
HELD_SECONDS = 60.0
#: How soon after its drain deadline the process must exit when work holds the cancellation off:
#: the flush of answers still on their way (2 s), then a loaded machine's margin.
HELD_EXIT_MARGIN = 6.0


def assert_held_call_answered(
    answer: CallToolResult, stderr: str, tool: str, exit_seconds: float, shutdown_seconds: float
) -> None:
    """What a call whose work (`tool`) held the shutdown's cancellation off past the drain leaves,
    on either transport: its `shutting_down` answer, an exit no sooner than the drain deadline,
    the report counting it cancelled, and the exit's lines saying what was answered and left."""
    error = error_of(answer)
    assert error["code"] == "shutting_down", answer
    assert "held" in error["message"] and "abandoned" in error["message"], error["message"]
    assert error.get("tool") == tool and str(error.get("session_id", "")).startswith("s"), error  # as any error's
    assert exit_seconds >= shutdown_seconds
    assert "0 of 1 session(s) finished, 1 cancelled" in stderr
    assert "1 request(s) answered shutting_down" in stderr
    if tool == "thread_wait":
        assert "thread(s) still running" in stderr


async def _stop(server: ServerProcess) -> None:
    """Kill the process if the test left it running, and wait (bounded) for it to go."""
    if server.process.returncode is None:
        server.process.kill()
    with anyio.move_on_after(5):
        await server.process.wait()


@pytest.fixture(scope="module")
def shared_http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One streamable-HTTP server for a whole module, run from a thread with its own event loop.

    Tests only read `url` (and the lists of lines) from it; each opens its own MCP session.
    """
    directory = tmp_path_factory.mktemp("shared-http")
    config = server_config(limits={"max_concurrent_sessions": 3})
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, config, transport="streamable-http")) as server,
    ):
        server.portal = portal
        yield server
