"""The standalone server: build an `MCPServer` with the extension and the configured tool
modules, and serve it over stdio or streamable HTTP with graceful shutdown.

Tier: application wiring. `build_server(settings)` is the public entry for embedding the
standalone setup; `serve(app)` runs it until `server_shutdown`, SIGINT/SIGTERM or (on stdio)
stdin EOF, each of which runs the same graceful shutdown before the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures.thread
import difflib
import importlib.metadata
import logging
import math
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import uvicorn
from mcp.server.context import HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import SessionMessage
from mcp_types import CallToolRequestParams
from mcp_types.jsonrpc import JSONRPCError, JSONRPCMessage, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.child_processes import (
    live_children,
    reset_forked_children,
    stop_child_processes,
    stop_resetting_forked_children,
)
from server.config import ENV_PREFIX, LOOPBACK_HOST_NAMES, ConfigError, ServerSettings, Settings, is_loopback
from server.endpoints import add_operational_routes
from server.errors import list_names
from server.extension import SessionsExtension
from server.host_checks import require_settings
from server.http_connections import (
    ConnectionGuard,
    ConnectionsCollector,
    accept_burst,
    default_max_connections,
    files_limit_too_low,
    lengthen_listen_queue,
    over_files_limit,
    raise_open_files_limit,
)
from server.http_shutdown import HttpShutdown
from server.logs import quiet_client_disconnects, serving_logger, write_pending_at_exit
from server.metrics import MetricsSnapshot, ShutdownReport
from server.prometheus import Exporter, build_registry
from server.reload import ConfigReloader
from server.sdk_seams import ToolCallHandler, end_listen_streams, tool_names
from server.stdio_wire import (
    Outstanding,
    StdinLines,
    StdoutLines,
    WireSafe,
    read_despite_unpaired_surrogates,
    unreadable_line_error,
)
from server.toml_keys import dotted_key
from server.tool_modules import (
    hosting_nothing,
    import_tool_modules_noting,
    install_tool_modules_noting,
    tools_not_known,
)
from server.unanswered import ANSWERED, LEFT_BEHIND_GRACE, WRITE_SECONDS, abandoned_answer
from tools.sessions import MANAGEMENT_TOOLS, SESSION_TOOL_TABLE

logger = logging.getLogger(__name__)

#: After shutdown, how long to wait for responses still on their way out before exiting.
FLUSH_SECONDS = 2.0
#: On stdio, how many messages from the server may wait for a client slow to read before the
#: server waits too (at the exit, every answer is taken at once: see `_serve_stdio`).
OUT_BACKLOG = 32
#: After the responses, how long the stdio server loop gets to end (its lifespan's exit waits up to
#: 2 s for decoupled work) before it is left running and the process exits without it.
UNWIND_SECONDS = 5.0


@dataclass
class App:
    """The standalone server and its session extension."""

    settings: Settings
    server: MCPServer[Any]
    sessions: SessionsExtension
    #: What the tool modules give to note (a module hosting nothing, see `hosting_nothing`).
    module_notes: list[str] = field(default_factory=list)

    def ineffective(self) -> list[str]:
        """What is valid but cannot work as written, one sentence each: the settings' own
        (`Settings.ineffective`), then the tool modules'. `--check-config` notes them, a start
        warns of them; a reload, which imports no module, warns of the settings' alone."""
        return [*self.settings.ineffective(), *self.module_notes]

    def reloader(self, path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> ConfigReloader:
        """A `ConfigReloader` for this app: `path` and `overrides` as given at startup; a reloaded
        file's `[tools.NAME]` tables are checked against the hosted tools as at startup."""
        # The standalone server owns the process's logging: a reload applies `[logging]` even after
        # a tool's library replaced the handler (`basicConfig(force=True)` on its first use).
        return ConfigReloader(self.sessions, path, overrides, check=self._check_reloaded, manage_logging=True)

    def _check_reloaded(self, settings: Settings) -> None:
        """`check_tool_overrides`, saying why a table for a newly listed module's tool is unknown."""
        moved = settings.server.tool_modules != self.settings.server.tool_modules
        # The tools registered now: those of TOOLS and those the setup(server) hooks added.
        check_tool_overrides(settings, tool_names(self.server), _MODULES_TAKE_A_RESTART if moved else "")


#: Why a reloaded `[tools.NAME]` names no hosted tool when the file lists other tool modules.
_MODULES_TAKE_A_RESTART = (
    "; server.tool_modules changed in the file, which takes a restart: the tools of its new modules are not "
    "hosted until then"
)


class _StandaloneSessions(SessionsExtension):
    """The extension, telling the stdio loop when a `tools/call` has reached the session layer.

    On stdin EOF the loop lets every call it has already read get this far (be admitted or
    refused on its merits) before it starts the shutdown that refuses new work.
    """

    serves_prometheus_port = True  # `serve` starts the exporter

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.on_tool_call: Callable[[Any], None] | None = None

    async def handle_tool_call(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: CallToolRequestParams,
        handler: ToolCallHandler | None = None,
    ) -> HandlerResult:
        if self.on_tool_call is not None:
            self.on_tool_call(ctx.request_id)
        return await super().handle_tool_call(ctx, params, handler)


def check_tool_overrides(settings: Settings, tools: Sequence[Callable[..., Any] | str], unknown_hint: str = "") -> None:
    """Refuse `[tools.NAME]` tables that name no hosted tool (a typo must not be ignored), and
    tables for the session tools, whose per-tool settings would silently do nothing. `tools` are
    the hosted tools, as functions (named by their `__name__`) or as names (a tool a `setup(server)`
    hook registered, say). `unknown_hint` ends the sentence of each unknown name.

    Raises:
        ConfigError: one problem per such table (an unknown name lists the hosted tools).
    """
    problems = tool_override_problems(settings, tools, unknown_hint)
    if problems:
        raise ConfigError(problems)


def tool_override_problems(
    settings: Settings,
    tools: Sequence[Callable[..., Any] | str],
    unknown_hint: str = "",
    also_known: Sequence[str] = (),
) -> list[str]:
    """The problems `check_tool_overrides` raises, one per `[tools.NAME]` that names no hosted
    tool (ending with `unknown_hint`) or names a session tool. A table naming one of
    `also_known` (a tool reported as a problem of its own: one the SDK refused, one a hook
    removed) is no problem here, and those are not offered as hosted."""
    names = (tool if isinstance(tool, str) else getattr(tool, "__name__", "") for tool in tools)
    # The tools a table can configure: a table for a session tool is refused below, so they are not offered.
    hosted = {name for name in names if name} - set(MANAGEMENT_TOOLS)
    own = sorted(hosted)
    listed = f"hosted: {list_names(own)}" if own else "no tool is hosted besides the session tools"
    problems = []
    for name in settings.tools:
        if name in MANAGEMENT_TOOLS:
            problems.append(
                f"{dotted_key(('tools', name))}: {SESSION_TOOL_TABLE}{_SESSION_TOOL_DEADLINES.get(name, '')}; remove it"
            )
        elif name not in hosted and name not in also_known:
            hint = _case_hint(name, own) or _near_hint(name, own)
            problems.append(
                f"{dotted_key(('tools', name))}: no hosted tool has this name ({listed}){hint}{unknown_hint}"
            )
    return problems


def _near_hint(name: str, hosted: list[str]) -> str:
    """For a name close to one hosted tool's (a typo, most likely): which one."""
    near = difflib.get_close_matches(name, hosted, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


#: Where the deadline a user may have meant to set is set instead.
_SESSION_TOOL_DEADLINES = {
    "session_create": (
        "; a session's deadline is session_create's timeout_seconds argument, else limits.default_timeout_seconds"
    ),
    "server_shutdown": (
        "; the drain's deadline is server_shutdown's timeout_seconds argument, else shutdown.timeout_seconds"
    ),
}


def _case_hint(name: str, hosted: list[str]) -> str:
    """For a name that differs from one hosted tool's only in case: why, and what to do."""
    alike = [tool for tool in hosted if tool.lower() == name.lower()]
    if len(alike) != 1:
        return ""
    return (
        f"; tool names are case-sensitive (names in environment variables arrive in lower case): "
        f"write [{dotted_key(('tools', alike[0]))}] in the config file, "
        f'or {{"{alike[0]}": ...}} in {ENV_PREFIX}TOOLS (JSON)'
    )


def build_app(settings: Settings, *, after_module_code: Callable[[], None] | None = None) -> App:
    """Build the server with the extension installed and the configured tool modules hosted:
    their tools registered, then their `setup(server)` hooks run. Nothing is served yet, so
    `--check-config` builds it too, and finds what would make the start fail.

    `after_module_code`, if given, is called each time a tool module's own code has run: after
    each import (so before the server is constructed) and after each `setup(server)` hook. A
    caller that owns process-wide state a module may change puts it back with it before anything
    else runs: the CLI applies `[logging]` again (a module's `basicConfig(force=True)`).

    Raises:
        ConfigError: a tool module's problems (see `server.tool_modules`) and `[tools.NAME]`
            tables naming no hosted tool (of `TOOLS` or registered by a hook), together: the
            modules that imported are installed (their tools registered, every hook run) even
            when another did not; a table naming none of the tools known then says whose tools
            are not (a module that did not import, a hook that did not finish).
    """
    modules, problems = import_tool_modules_noting(settings.server.tool_modules, after_module_code)
    sessions = _StandaloneSessions(settings)
    server: MCPServer[Any] = MCPServer(
        settings.server.name, version=package_version(), extensions=[sessions], lifespan=sessions.lifespan
    )
    installed = install_tool_modules_noting(server, modules, after_module_code)
    problems += installed.problems
    # Every tool of TOOLS, and every one a setup hook registered: per-tool settings apply by name.
    unknown = tools_not_known(settings.server.tool_modules, modules, installed.unfinished)
    removed = [name for name in settings.tools if name in installed.removed]
    problems += tool_override_problems(settings, tool_names(server), unknown, also_known=[*installed.refused, *removed])
    problems += [
        f"{dotted_key(('tools', name))}: the setup(server) of module {installed.removed[name]!r} removes this tool, "
        "so it is not hosted and its settings would apply to nothing; remove the table, or keep the tool"
        for name in removed
    ]
    if problems:
        raise ConfigError(problems)
    notes = [*hosting_nothing(modules), *installed.notes]
    return App(settings=settings, server=server, sessions=sessions, module_notes=notes)


#: The distribution whose version the standalone server gives as its `serverInfo.version`.
DISTRIBUTION = "mcp-session-manager"
#: The version given when the package is not installed (run from a source tree on `sys.path`).
UNKNOWN_VERSION = "0+unknown"


def package_version() -> str:
    """This package's installed version (`serverInfo.version` of the standalone server), or
    `UNKNOWN_VERSION` if it is run without being installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def build_server(settings: Settings) -> MCPServer[Any]:
    """The standalone server: `SessionsExtension` installed, tool modules from config loaded.

    Raises:
        TypeError: `settings` is not a `Settings` (a path, a dict, None): the message says how
            to make one (`load_settings(path)`).
        ConfigError: as `build_app`.
    """
    return build_app(require_settings(settings, "build_server()")).server


# -- serving -----------------------------------------------------------------------------


class _Exit:
    """Coordinates the one graceful shutdown, whoever asks for it first."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.sessions = app.sessions
        self.done = anyio.Event()
        self.report: ShutdownReport | None = None
        #: The name of the first SIGINT or SIGTERM that came, if one did.
        self.first_signal: str | None = None
        #: Tasks left running at the exit because their work holds its cancellation off.
        self.left_behind = 0
        #: Set once serving has ended (with a shutdown or without one), for `late_signal`.
        self.served = False
        app.sessions.add_exit_listener(self._finished)
        global _serving  # noqa: PLW0603 - signals are the process's: so is the exit they reach
        _serving = self

    def _finished(self, report: ShutdownReport) -> None:
        self.report = report
        # The drain is over: `subscriptions/listen` streams end with their result, as the protocol
        # wants, instead of being cut when the transport stops (and, meanwhile, awaited as unanswered).
        end_listen_streams(self.app.server)
        self.done.set()

    async def begin(self, reason: str, joining: str = "") -> None:
        """Run the graceful shutdown, for `reason` (as the log gives it: "stdin closed"); if one
        already runs, join it, saying so (and what else the trigger does then: `joining`)."""
        if self.sessions.manager.shutting_down:
            logger.info("%s during the shutdown: joining it%s", reason, joining)
        else:
            logger.info("Graceful shutdown: %s", reason)
        await self.sessions.shutdown()

    async def watch_signals(self, task_group: Any) -> None:
        before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    self.on_signal(signum, task_group)
        finally:
            # asyncio gives the signals their default action back, not the handler there was.
            for signum, handler in before.items():
                if handler is late_signal:
                    signal.signal(signum, handler)

    def on_signal(self, signum: int, task_group: Any) -> None:
        """A signal while serving (on the event loop)."""
        name = self._force_if_second(signum, lambda: _cut_off(self.sessions.manager.metrics()))
        task_group.start_soon(self.begin, f"received {name}", _JOINING)

    def on_late_signal(self, signum: int) -> None:
        """SIGINT or SIGTERM once serving's own handlers are gone: the shutdown has run (or serving
        stopped without one: a client that closed stdout), and the process is on its way out
        (writing its last answers, running `atexit` handlers). The first joins the exit, as during
        the shutdown; the next forces it (status 1).

        Runs in the signal handler, on the main thread between two bytecodes, maybe inside a
        `with manager._lock:` or a write to stderr of the same thread: it takes no lock of the
        manager's (a second signal waited for ever on it), and what it logs may fail (a write to
        stderr inside one raises RuntimeError): that is swallowed, and the exit forced all the same."""
        name = self._force_if_second(signum, lambda: "the server had stopped serving")
        _quietly(logger.info, "Received %s as the server exits: joining the exit%s", name, _JOINING)

    def _force_if_second(self, signum: int, cut_off: Callable[[], str]) -> str:
        """The signal's name, noted as the first; a second one forces the exit (status 1),
        whatever started the shutdown, saying what it cuts off (`cut_off()`): even if saying so
        fails (see `on_late_signal`)."""
        name = signal.Signals(signum).name
        if self.first_signal is not None:
            came = f"Second {name}" if name == self.first_signal else f"{name} after {self.first_signal}"
            try:
                _quietly(logger.warning, "%s: forcing exit; %s", came, cut_off())
            finally:
                force_exit(1)
        self.first_signal = name
        return name


def _quietly(log: Callable[..., None], *args: Any) -> None:
    """Log from a signal handler: a failure (a write to stderr inside one) must not be raised into
    the code the handler interrupted."""
    try:
        log(*args)
    except BaseException:  # noqa: BLE001, S110 - nothing can be said about it: stderr is what failed
        pass


#: What a signal that joins the shutdown adds to its log line.
_JOINING = " (a second SIGINT or SIGTERM forces the exit at once, with status 1)"
#: The exit of the server this process serves (once it serves), for `late_signal`.
_serving: _Exit | None = None


def forget_serving() -> None:
    """The server has stopped and the process goes on (`server.cli.main` called in-process): a
    later `late_signal` is no longer about its exit."""
    global _serving  # noqa: PLW0603 - see `_Exit.__init__`
    _serving = None
    stop_resetting_forked_children()


def late_signal(signum: int, _frame: object) -> None:
    """The standalone server's SIGINT and SIGTERM handler while serving's own are not in place
    (`server.cli` sets it before serving; the transports' receivers put it back when they end).
    Before serving began, it stops the process at once, as the default action would (status 128 +
    the signal); once the graceful shutdown began, or serving ended, see `_Exit.on_late_signal`.
    Without it, a signal in the last moments of a finished exit ended the process with the
    signal's default action."""
    serving = _serving
    if serving is None or not (serving.served or serving.sessions.manager.shutting_down):  # (no lock taken)
        # Before serving's own handlers were in place: it stops the start, as the default action would.
        try:
            _quietly(logger.warning, "Received %s before the server served: exiting", signal.Signals(signum).name)
        finally:
            force_exit(128 + signum)
    serving.on_late_signal(signum)


def _cut_off(metrics: MetricsSnapshot) -> str:
    """What a forced exit leaves unanswered: the tool calls running or queued (as `metrics` has them)."""
    calls = sum(tool.active for tool in metrics.tools.values()) + metrics.queued_sessions
    return f"{calls} tool call(s) running or queued are cut off unanswered"


def force_exit(code: int) -> NoReturn:
    """Exit now with status `code`: no thread is waited for and no `atexit` handler runs, but the
    counts of repeated records still pending (`server.logs.RepeatLimit`) are written first, as
    at an ordinary exit, if that takes at most a second (`write_pending_at_exit`)."""
    write_pending_at_exit()
    # A process pool's workers would outlive the process (forked, holding its socket and pipes).
    stopped = stop_child_processes(within=CHILDREN_STOP_SECONDS)
    if stopped:
        _quietly(
            logger.info,
            "Stopped %s process(es) a tool started (SIGTERM; SIGKILL for those still running %gs later)",
            stopped,
            CHILDREN_STOP_SECONDS,
        )
    os._exit(code)


#: How long the forced exit waits for a tool's `multiprocessing` children to end on SIGTERM before
#: it kills them (SIGKILL).
CHILDREN_STOP_SECONDS = 0.5


async def serve_stdio(
    app: App, reloader: ConfigReloader | None = None, wire: BinaryIO | None = None, stdin: BinaryIO | None = None
) -> None:
    """Serve over stdio until shutdown; stdin EOF starts the graceful shutdown.

    The SDK's stdio streams are relayed so that EOF is held back until the drain has finished
    and every response has been written (to a client that is not reading, for up to
    WRITE_SECONDS after the shutdown), and so that the process exits only then. stdin is read
    by `StdinLines` and stdout written by `StdoutLines` (`server.stdio_wire`), so that a shutdown
    never waits for the client's next line, nor forever for a client that does not read.
    Responses go to `wire` if given (from `divert_stdout`); otherwise fd 1 is diverted while
    serving and given back after. Requests are read from `stdin` if given (from
    `claim_stdin`); otherwise fd 0 is claimed while serving and given back after.
    """
    exit_ = _Exit(app)
    try:
        await _serve_stdio(app, exit_, reloader, wire, stdin)
    except* (BrokenPipeError, ConnectionResetError):
        # The client died: its stdin closing ran the shutdown; the answers to its last calls
        # (cancelled at the deadline, say) have nowhere to go. Not a crash of the server.
        logger.warning("The client closed its end of the pipe: response(s) still on their way were not delivered")
    await _report_exit(app, exit_, exit_.left_behind)


async def _serve_stdio(
    app: App, exit_: _Exit, reloader: ConfigReloader | None, wire: BinaryIO | None, stdin_wire: BinaryIO | None
) -> None:
    outstanding = Outstanding()  # requests read that the server has not answered yet
    unadmitted = Outstanding()  # tools/call requests read that have not reached the session layer yet
    if isinstance(app.sessions, _StandaloneSessions):
        app.sessions.on_tool_call = unadmitted.discard
    lowlevel = app.server._lowlevel_server  # the SDK offers no public hook around its stdio loop
    in_send, in_recv = anyio.create_memory_object_stream[SessionMessage | Exception](32)
    out_send, out_recv = anyio.create_memory_object_stream[SessionMessage](32)
    lines = StdinLines(stdin_wire)
    lines.start()
    wire_out = StdoutLines(wire)
    wire_out.start()
    # The server's messages on their way to the client, in order: taken from `out_recv` at once (an
    # answer is then no longer outstanding, however slow the client is to read it), then written
    # one at a time. While serving, at most OUT_BACKLOG wait (then the server waits to send more);
    # from the exit on, all do, each with no token of `room` (None).
    backlog_send, backlog_recv = anyio.create_memory_object_stream[tuple[SessionMessage, object]](math.inf)
    room = anyio.CapacityLimiter(OUT_BACKLOG)
    given = 0  # messages put in the backlog: each is written once by `wire_out`, in that order
    exiting = False  # from the exit on: everything is taken at once, and notifications may be dropped
    dropped = 0  # notifications dropped at the exit, as the client had not read what came before
    answers_given = collections.deque[int]()  # the numbers (as `given` counts) of answers not known written
    answered: set[Any] = set()  # requests answered here at the exit: their handler's late answer is dropped
    server_scope = anyio.CancelScope()

    async def run_server() -> None:
        with server_scope:
            await lowlevel.run(in_recv, out_send, lowlevel.create_initialization_options())

    async def watch_server() -> None:
        await asyncio.shield(server_task)  # re-raises what ended the loop; cancelling this wait leaves it be

    # `StdoutLines` writes what the SDK's writer gives it; fd 1 points at stderr, so stray prints miss the wire.
    out = cast("anyio.AsyncFile[str]", wire_out)
    async with stdio_server(stdin=cast("anyio.AsyncFile[str]", lines), stdout=out) as (stdin, stdout):
        # Cancelled once the exit's flush window is over: no request is read after that.
        reading = anyio.CancelScope()

        async def relay_in() -> None:
            with reading:
                await _relay_requests()
            if lines.eof:
                # The client is done. Calls it sent before closing stdin are still served: let them
                # reach admission, then drain like a signal would. EOF reaches the SDK's loop only
                # when everything stops, so running calls can still finish and answer.
                with anyio.move_on_after(FLUSH_SECONDS):
                    await unadmitted.empty.wait()
                # Its `session_create` sessions only it could release: the drain would wait for them
                # in vain (and a client that kills a server slow to exit would cut the shutdown short).
                ended = app.sessions.manager.end_reservations("the client closed stdin: no one is left to release it")
                if ended:
                    logger.info(
                        "stdin closed: ended %s session(s) made by session_create, which no one can release", ended
                    )
                await exit_.begin("stdin closed")

        async def _relay_requests() -> None:
            async for item in stdin:
                if isinstance(item, Exception):
                    # A lone surrogate's escape is JSON the SDK's reader refuses: read it here.
                    item = read_despite_unpaired_surrogates(item)
                if isinstance(item, Exception):
                    # The SDK drops a line it cannot read with a debug log, and a client would wait for
                    # an answer forever: JSON-RPC answers it with a protocol error (with its id if it
                    # can be read).
                    await out_send.send(SessionMessage(unreadable_line_error(item)))
                    continue
                message = item.message if isinstance(item, SessionMessage) else None
                if isinstance(message, JSONRPCRequest):
                    outstanding.add(message.id, message.method, message.params)
                    if message.method == "tools/call" and isinstance(app.sessions, _StandaloneSessions):
                        unadmitted.add(message.id)
                elif isinstance(message, JSONRPCNotification) and message.method == "notifications/cancelled":
                    # A cancelled request gets no response: stop waiting for one.
                    cancelled = (message.params or {}).get("requestId")
                    outstanding.discard_cancelled(cancelled)
                    unadmitted.discard_cancelled(cancelled)
                elif isinstance(message, JSONRPCNotification) and not message.method.startswith("notifications/"):
                    # A request's method with no usable id (none, null, an object, a bool, a
                    # fraction): the SDK's reader takes it for a notification, which gets no
                    # answer, so a client with a bug in its ids would wait in silence. The log says why.
                    logger.warning(
                        "No answer to %r: it came with no id, or an id that is not a string or an integer (a request "
                        "needs one; the SDK reads it as a notification, which is not answered)",
                        message.method[:100],
                    )
                await in_send.send(item)

        async def deliver(item: SessionMessage) -> None:
            # Through `WireSafe`: text that is not valid Unicode in one answer must not end the server.
            safe = SessionMessage(cast("JSONRPCMessage", WireSafe(item.message)), item.metadata)
            try:
                await stdout.send(safe)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                # The SDK's writer has ended: the client closed its end of the pipe. The writer's own
                # BrokenPipeError stops the transport and is reported once (`serve_stdio`); answers
                # still coming have nowhere to go and are dropped, so that no handler waits to send one.
                pass

        def count_given(item: SessionMessage) -> None:
            nonlocal given
            given += 1
            if isinstance(item.message, JSONRPCResponse | JSONRPCError):
                while answers_given and answers_given[0] <= wire_out.written:
                    answers_given.popleft()
                answers_given.append(given)

        async def relay_out() -> None:
            nonlocal dropped
            async with out_recv:
                async for item in out_recv:
                    if isinstance(item.message, JSONRPCResponse | JSONRPCError):
                        if item.message.id in answered:
                            continue  # answered at the exit already (see below)
                        outstanding.discard(item.message.id)
                        unadmitted.discard(item.message.id)  # answered without reaching the session layer
                    elif exiting and isinstance(item.message, JSONRPCNotification):
                        # At the exit nothing waits for the client to read: held work reporting progress
                        # as fast as it can would bury the answers behind its notifications, without end.
                        # Those of a request answered here are over for the client; others are dropped
                        # once OUT_BACKLOG messages wait to be written.
                        if getattr(item.metadata, "related_request_id", None) in answered:
                            continue
                        if backlog_send.statistics().current_buffer_used >= OUT_BACKLOG:
                            dropped += 1
                            continue
                    count_given(item)  # now, not after the wait below: the exit waits for what is counted
                    if exiting:  # taken at once, with no checkpoint: an answer given meanwhile must come after
                        backlog_send.send_nowait((item, None))
                        continue
                    borrower = object()
                    await room.acquire_on_behalf_of(borrower)
                    backlog_send.send_nowait((item, borrower))

        async def write_out() -> None:
            async with backlog_recv:
                async for item, borrower in backlog_recv:
                    await deliver(item)
                    if borrower is not None:
                        room.release_on_behalf_of(borrower)

        # Not a task of the group below: a handler whose work holds its cancellation off would hold
        # the group's exit, and so the process, until that work ends. It is awaited with a bound instead.
        server_task = asyncio.get_running_loop().create_task(run_server())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(exit_.watch_signals, tg)
                if reloader is not None:
                    await tg.start(reloader.watch_sighup)
                tg.start_soon(relay_in)
                tg.start_soon(relay_out)
                tg.start_soon(write_out)
                tg.start_soon(watch_server)
                await exit_.done.wait()
                # The requests read by the end of the drain: one still unanswered after the flush
                # window is held by its work. (One read after it gets its own answer, a refusal.)
                at_exit = set(outstanding.requests)
                written_by = anyio.current_time() + WRITE_SECONDS
                room.total_tokens = math.inf  # every answer the server gives is taken at once from now on
                exiting = True
                with anyio.move_on_after(FLUSH_SECONDS):
                    await outstanding.empty.wait()
                reading.cancel()  # the server is leaving: no more requests are read
                held = {key: value for key, value in outstanding.requests.items() if key in at_exit}
                if held:
                    # Their sessions ended at the drain deadline, but their work holds the cancellation
                    # off and their handlers write nothing: answer them, rather than leave silence.
                    server_info = lowlevel.server_info_stamp
                    for request_id, (method, params) in held.items():
                        answered.add(request_id)
                        answer = SessionMessage(
                            abandoned_answer(
                                request_id, method, params, server_info, app.sessions.manager.cancelled_at_shutdown
                            )
                        )
                        count_given(answer)
                        backlog_send.send_nowait((answer, None))
                        outstanding.discard(request_id)
                        unadmitted.discard(request_id)
                    logger.warning(
                        "%s request(s) %s; no answer had come %ss after the shutdown",
                        len(held),
                        ANSWERED,
                        FLUSH_SECONDS,
                    )
                # Every request has its answer on the way: written as soon as the client reads, but
                # one that does not read (a pipe full) cannot hold the exit past WRITE_SECONDS.
                with anyio.CancelScope(deadline=written_by):
                    while wire_out.written < given:  # (answers to requests read in the flush window come on)
                        await wire_out.wait_written(given)
                if wire_out.written < given:
                    wire_out.abandon()
                    unwritten = sum(1 for number in answers_given if number > wire_out.written)
                    if unwritten:
                        logger.warning(
                            "%s answer(s) were still being written %ss after the shutdown to a client that had not "
                            "read them (it reads its stdout too slowly, or not at all): the server exits without "
                            "writing them",
                            unwritten,
                            WRITE_SECONDS,
                        )
                if dropped:
                    logger.warning(
                        "%s notification(s) (progress, log messages) were dropped at the exit: the client read its "
                        "stdout more slowly than the server's tools sent them",
                        dropped,
                    )
                tg.cancel_scope.cancel()
        finally:
            # The server loop ends too, unless a handler whose work holds its cancellation off holds
            # it: it is then left running, and the process exits without it (`_report_exit`).
            server_scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(LEFT_BEHIND_GRACE if answered else UNWIND_SECONDS):
                await asyncio.wait({server_task})
            if not server_task.done():
                exit_.left_behind += 1
            # The server loop and its lifespan have ended. Stray output buffered in sys.stdout goes
            # to stderr now, while fd 1 is still diverted, not to the wire when the SDK restores it.
            if sys.stdout is not None:
                sys.stdout.flush()
            # End the SDK's reader (without waiting for the client's next line) and its writer
            # (after it has written what it holds, unless the client has stopped reading), or leaving
            # `stdio_server` would wait forever.
            lines.close()
            # The SDK's reader may hold a request it read and cannot hand on (nobody reads its
            # stream since `relay_in` stopped): `stdio_server` would wait for it forever. Take what
            # it holds (dropped: the server is leaving) until it sees the end of `lines`.
            with anyio.CancelScope(shield=True), anyio.move_on_after(UNWIND_SECONDS):
                async for _dropped in stdin:
                    pass
            # Everything was written or given up at the exit; after a failure, what the writer holds
            # must not hold the exit either, if the client does not read.
            wire_out.abandon()
            with anyio.CancelScope(shield=True):
                await stdout.aclose()
            wire_out.close()


class _UvicornServer(uvicorn.Server):
    """uvicorn, with signals turned into our graceful shutdown instead of an immediate stop."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None], guard: ConnectionGuard) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._guard = guard

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # uvicorn closes the connections it knows; those past the cap still being read are the guard's.
        self._guard.close_lane()
        await super().shutdown(sockets)

    async def startup(self, sockets: list[Any] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn has logged why (the port is in use, say) and exits the hard way; stop
            # cleanly instead, and let `serve_http` report the failure with its exit status.
            self.should_exit = True
            return
        if self.started:
            lengthen_listen_queue(sock for server in self.servers for sock in server.sockets)
            host, port = self.config.host, self.config.port
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
            if ":" in host:
                host = f"[{host}]"  # an IPv6 literal in a URL
            serving_logger.info("Serving MCP over streamable HTTP at http://%s:%s/mcp", host, port)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_signal(sig)


async def serve_http(
    app: App, registry: CollectorRegistry | None = None, reloader: ConfigReloader | None = None
) -> None:
    """Serve over streamable HTTP at http://HOST:PORT/mcp (and /healthz, /readyz, /metrics) until shutdown."""
    settings = app.settings.server
    exit_ = _Exit(app)
    security = transport_security(settings)  # one check for /mcp and the operational endpoints
    metrics_registry = registry or build_registry(app.sessions.manager)
    add_operational_routes(app.server, app.sessions, metrics_registry, security)
    # Ends open GET event streams and waits for responses in flight before uvicorn stops (see its module).
    http = HttpShutdown(
        app.server.streamable_http_app(
            host=settings.host,
            transport_security=security,
            # A client that goes away without ending its session (no DELETE: a crash, a lost
            # network) holds its SDK session (about 46 KB and two tasks here) until this.
            session_idle_timeout=settings.http_session_idle_timeout_seconds,
            max_sessions=settings.http_max_sessions,
        ),
        server_info=app.server._lowlevel_server.server_info_stamp,
        session_of=app.sessions.manager.cancelled_at_shutdown,
    )
    files_limit = raise_open_files_limit()
    guard = connection_guard(settings, files_limit)
    metrics_registry.register(ConnectionsCollector(guard))
    config = uvicorn.Config(
        http,
        host=settings.host,
        port=settings.port,
        # Counted and timed connections (see server.http_connections); no WebSocket upgrade, so
        # that each connection stays with its protocol (an upgrade would swap it for another).
        http=guard.protocol_class(AutoHTTPProtocol),
        ws="none",
        backlog=accept_burst(files_limit),
        log_level="warning",
        log_config=None,  # uvicorn's records go through our handler, in our format
        timeout_graceful_shutdown=1,
        lifespan="on",
    )
    loop = asyncio.get_running_loop()

    async with anyio.create_task_group() as tg:

        def on_signal(signum: int) -> None:  # runs in the signal handler, on the loop's thread
            loop.call_soon_threadsafe(exit_.on_signal, signum, tg)

        server = _UvicornServer(config, on_signal, guard)

        async def stop_when_done() -> None:
            await exit_.done.wait()
            await http.close(within=FLUSH_SECONDS, flush=guard.flush)
            server.should_exit = True

        tg.start_soon(stop_when_done)
        if reloader is not None:
            await tg.start(reloader.watch_sighup)
        loud_again = quiet_client_disconnects()
        try:
            await server.serve()
        finally:
            guard.close()
            loud_again()
        tg.cancel_scope.cancel()
    if not server.started:
        logger.error("Could not serve MCP over streamable HTTP on %s port %s", settings.host, settings.port)
        raise SystemExit(1)
    await _report_exit(app, exit_, http.left_behind())


def connection_guard(settings: ServerSettings, files_limit: int) -> ConnectionGuard:
    """The bounds on HTTP connections `settings` ask for, under an open-files limit of
    `files_limit`; a warning if that limit, or `server.http_max_connections`, leaves too little
    room to serve them."""
    max_connections = settings.http_max_connections or default_max_connections(files_limit)
    problem = files_limit_too_low(files_limit)
    if settings.http_max_connections:
        problem = over_files_limit(max_connections, files_limit) or problem
    if problem is not None:
        logger.warning("%s", problem)
    return ConnectionGuard(max_connections, settings.http_request_timeout_seconds)


def transport_security(settings: ServerSettings) -> TransportSecuritySettings | None:
    """DNS-rebinding protection: the SDK's loopback defaults, plus `server.allowed_hosts`.

    On loopback with no list, as the SDK's own defaults, Host must be 127.0.0.1, localhost or
    [::1]; off loopback the config requires a list, and only those hosts (and loopback) pass,
    and the address bound (`server.host:server.port`, the URL the server logs) unless a wildcard.
    A `name:*` pattern also admits the bare `name`: behind a proxy on port 80 or 443 clients send
    no port, and the SDK matches `name:*` only against `name:PORT`. The settings are spelled out
    even where the SDK has the same defaults, because the operational endpoints (outside the
    SDK's transport) must get the same check. `None` (no check, as in the SDK) only off loopback
    with no list, which the config refuses over HTTP.
    """
    if not settings.allowed_hosts and not is_loopback(settings.host):
        return None
    loopback = [f"{name}:*" for name in LOOPBACK_HOST_NAMES]
    hosts = _with_bare_names([*loopback, *settings.allowed_hosts])
    bound = _bound_host(settings)
    if bound is not None and bound not in hosts:
        hosts.append(bound)
    origins = [f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def _bound_host(settings: ServerSettings) -> str | None:
    """The Host header of the URL the server logs (`server.host:server.port`), which it therefore
    accepts too; None for a wildcard address (0.0.0.0, ::), which no client sends."""
    host = settings.host.lower()
    if host in ("", "0.0.0.0", "::"):
        return None
    return f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"


def _with_bare_names(patterns: list[str]) -> list[str]:
    """The patterns, each `name:*` followed by the bare `name` (the SDK compares that one exactly)."""
    out: list[str] = []
    for pattern in patterns:
        out.append(pattern)
        if pattern.endswith(":*") and pattern[:-2] not in patterns:
            out.append(pattern[:-2])
    return out


async def _report_exit(app: App, exit_: _Exit, left_behind: int = 0) -> None:
    """Exit at once if anything would hold the process past the shutdown; else return.

    Python joins every non-daemon thread at exit, and `anyio.run` waits for every task: a thread
    stuck in a tool's work, or a task whose work holds its cancellation off (`left_behind`), would
    keep the process alive long after its shutdown, until an orchestrator kills it unexplained.
    So those are named in one warning and the process exits with status 0, as the shutdown ran.
    Such a task also holds the lifespan open, so what its end does for the session manager (a
    cluster replica's last session ends, its leaving) is done first.
    """
    exit_.served = True
    if left_behind:
        with anyio.CancelScope(shield=True):
            await app.sessions.manager.close_at_exit()
    stuck = app.sessions.manager.metrics().abandoned_threads
    running = busy_threads()
    busy = len(running)
    children = _running_children()
    if stuck:
        # Threads cannot be killed; the interpreter would wait for them forever at exit.
        logger.warning("Exiting with %s stuck tool thread(s) abandoned", stuck)
    if busy > stuck:
        logger.warning(
            "Exiting with %s thread(s) still running tool work past the shutdown (threads cannot be stopped); "
            "the threads still running: %s",
            busy - stuck,
            _names(running),
        )
    elif left_behind and not busy:
        logger.warning(
            "Exiting with %s task(s) still running tool work that holds its cancellation off past the shutdown",
            left_behind,
        )
    if children:
        # Python's exit would join each (multiprocessing's atexit hook) for as long as it runs.
        logger.warning(
            "Exiting with %s process(es) a tool started still running past the shutdown: stopping them (%s)",
            len(children),
            ", ".join(f"{child.name!r} pid {child.pid}" for child in children[:5]),
        )
    if stuck or busy or left_behind or children:
        if sys.stdout is not None:
            sys.stdout.flush()
        force_exit(0)


def busy_threads() -> list[threading.Thread]:
    """The threads the interpreter would wait for at exit: alive, not daemon, not the main thread,
    and not a pool worker waiting for work: an anyio worker idle in its queue (anyio stops those
    itself when its loop ends), or a `concurrent.futures` one (the loop's default executor, which
    asyncio's `getaddrinfo` uses, or a tool module's own pool: the interpreter's exit ends those)."""
    main = threading.main_thread()
    frames = sys._current_frames()  # each thread's innermost Python frame (read at the exit only)
    return [
        thread
        for thread in threading.enumerate()
        if thread is not main
        and not thread.daemon
        and thread.is_alive()
        and not _idle_anyio_worker(thread)
        and not _idle_pool_worker(frames.get(thread.ident) if thread.ident is not None else None)
        and not _idle_process_pool(thread)
    ]


def _names(threads: list[threading.Thread], most: int = 5) -> str:
    """The threads' names, for the exit's warning (a module's own thread is told by its name)."""
    names = ", ".join(
        repr(thread.name) + (" (a process pool's manager)" if _is_process_pool_manager(thread) else "")
        for thread in threads[:most]
    )
    return names + (f" and {len(threads) - most} more" if len(threads) > most else "")


def _running_children() -> list[Any]:
    """The `multiprocessing` children still running that are no daemons (Python's exit would wait
    for each to end), less a process pool's workers (stopped with their pool)."""
    pooled = {
        pid
        for thread in threading.enumerate()
        if _is_process_pool_manager(thread)
        for pid in getattr(thread, "processes", None) or {}
    }
    return [child for child in live_children() if not child.daemon and child.pid not in pooled]


def _is_process_pool_manager(thread: threading.Thread) -> bool:
    manager = getattr(sys.modules.get("concurrent.futures.process"), "_ExecutorManagerThread", None)
    return manager is not None and isinstance(thread, manager)


def _idle_process_pool(thread: threading.Thread) -> bool:
    """Whether `thread` is the manager thread of a `concurrent.futures.ProcessPoolExecutor` with no
    work in hand: the interpreter's exit stops it and its worker processes (if the exit is the
    ordinary one; a forced one stops the workers itself, see `force_exit`)."""
    if not _is_process_pool_manager(thread):
        return False
    pending = getattr(thread, "pending_work_items", None)
    return isinstance(pending, dict) and not pending


def _idle_anyio_worker(thread: threading.Thread) -> bool:
    """Whether `thread` is one of anyio's worker threads waiting for work: each such worker holds
    the deque of idle workers it joins when done (read on the loop's thread, which alone changes it)."""
    idle = getattr(thread, "idle_workers", None)
    return isinstance(idle, collections.deque) and thread in idle


#: The loop of a `concurrent.futures.ThreadPoolExecutor` worker thread (None if this Python names it
#: otherwise: then no such worker is taken for idle), and what it calls, between two work items,
#: to count itself idle.
_POOL_WORKER: types.CodeType | None = getattr(getattr(concurrent.futures.thread, "_worker", None), "__code__", None)
_POOL_IDLE_COUNT = threading.Semaphore.release.__code__


def _idle_pool_worker(frame: types.FrameType | None) -> bool:
    """Whether the thread whose innermost Python frame is `frame` is a `concurrent.futures` worker
    running no work: in its loop itself (waiting in its queue's `get`, which is C), or counting
    itself idle after a work item. One running a work item (or its initializer) is a call deeper."""
    callee = None  # what the worker's loop has called, in `threading` (its idle count's code)
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        callee, frame = frame, frame.f_back
    if frame is None or _POOL_WORKER is None or frame.f_code is not _POOL_WORKER:
        return False
    return callee is None or callee.f_code is _POOL_IDLE_COUNT


def serve(
    app: App, reloader: ConfigReloader | None = None, wire: BinaryIO | None = None, stdin: BinaryIO | None = None
) -> None:
    """Run the app on its configured transport until it shuts down; `reloader` (if given)
    re-reads the config on SIGHUP; on stdio, `wire` (if given) is where responses go (see
    `divert_stdout`) and `stdin` (if given) where requests come from (see `claim_stdin`).
    With `metrics.prometheus_port`, a loopback-only exporter serves /metrics on that port too."""
    reset_forked_children()  # a tool's forked worker must not take the server's signal handlers
    registry = build_registry(app.sessions.manager)
    exporter = (
        Exporter(registry, app.settings.metrics.prometheus_port) if app.settings.metrics.prometheus_port else None
    )
    if exporter is not None:
        exporter.start()
    try:
        if app.settings.server.transport == "stdio":
            anyio.run(serve_stdio, app, reloader, wire, stdin)
        else:
            anyio.run(serve_http, app, registry, reloader)
    finally:
        if exporter is not None:
            exporter.stop()
