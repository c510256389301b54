"""SessionsExtension: the `tools/call` interceptor that makes every call a tracked session.

Tier: MCP integration. An `mcp.server.extension.Extension` for any `MCPServer`: it contributes
the four session tools and wraps every other `tools/call` in a session with a deadline.

It hooks in through the SDK's `intercept_tool_call`, and while its lifespan runs it serves
`tools/call` itself (`handle_tool_call`, the same code): the SDK's interceptor chain cost a
tenth to a fifth of the instructions the extension added to a call, so the lifespan takes it out
of the path, keeping every other extension's interceptor in its place (`take_over_tool_calls`).

Every call's session is registered with the manager's reaper, which cancels the call's scope
at its deadline (one timer for all calls, not one per call). The scope is a `LateScope`
(`server.deadline`): a real anyio cancel scope is built, and spliced in where the call began,
only when a deadline actually comes, so a call that ends in time pays for none. An async
tool runs in place inside that scope, and so does a sync tool: at its first call the extension
swaps its function in the registry for a stand-in whose wait for the worker thread gives way
to cancellation (`server.threads`). For a call that may be stuck in a thread it cannot reach
(a tool whose parameters resolvers fill, async or sync, or one of unknown kind) the caller's
wait and the work are decoupled (`server.decoupled`): the work runs in a plain asyncio task the
extension owns, and only the caller's wait is cancelled.
Either way, at the deadline the caller gets a `timeout` result on time even when the work is
stuck in a thread (which no cancellation reaches); such a thread is counted in
`abandoned_threads` until it really returns. How a call ends (its session's end, and what its
caller reads) is worded in `server.outcomes`; the SDK internals it leans on are in
`server.sdk_seams`.

Example:
    ```python
    settings = load_settings("config/default.toml")
    sessions = SessionsExtension(settings)
    app = MCPServer("my-tools", extensions=[sessions], lifespan=sessions.lifespan)
    ```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, ToolBinding
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams

from server.config import ConfigError, Settings
from server.config_loader import load_settings
from server.deadline import LateScope, deadline_scope
from server.decoupled import DecoupledCalls
from server.errors import EXTENSION_ID, ErrorCode, SessionError, describe, error_result, list_names
from server.host_checks import (
    describe_server,
    is_async_callable,
    kind,
    require_server,
    require_settings,
    warn_if_not_listed,
)
from server.logs import log_refusal
from server.metrics import ShutdownReport
from server.outcomes import ABANDONED, LATE, THREAD_FATE, ThreadCell, completed, failed, not_running, stopped
from server.sdk_seams import (
    ToolCallHandler,
    progress_session,
    registry_lookup,
    request_client,
    serve_tool_calls,
    tool_names,
)
from server.session import SessionState
from server.sessions import SessionManager, checked_drain_timeout
from server.threads import make_cancellable, runs_in_thread
from server.toml_keys import dotted_key
from tools.sessions import (
    MANAGEMENT_TOOLS,
    SESSION_TOOL_TABLE,
    is_session_tool,
    session_tool_bindings,
    unknown_arguments,
    with_error_code,
)

logger = logging.getLogger(__name__)


#: The tool a call names when the server has no registry to ask (then its kind is unknown).
_NO_REGISTRY = object()
#: A tool's call plan: (its registry entry, the settings, whether it may need a thread, whether
#: it runs in place (else decoupled), its deadline in seconds, its idle timeout or None, whether
#: it is a sync tool (None: unknown)).
_Plan = tuple[object, Settings, bool, bool, float, float | None, bool | None]
#: Plans remembered at most (one per tool name called); past it they are worked out afresh.
MAX_PLANS = 4096


async def _not_taken_over(ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> HandlerResult:
    raise RuntimeError(
        "SessionsExtension.handle_tool_call needs a handler until take_over_tool_calls has run: pass handler=, "
        "the tools/call handler that runs the tool, or enter sessions.lifespan(app) first (it takes the server's "
        "tools/call over, unless a handler of your own serves it)"
    )


class SessionsExtension(DecoupledCalls, Extension):
    """Tracks every tool call as a session; adds `session_create`, `session_release`,
    `session_metrics` and `server_shutdown`.

    Wire `lifespan` into the server (`MCPServer(..., lifespan=sessions.lifespan)`, or enter
    `sessions.lifespan(app)` from your own lifespan): it runs the reaper and owns the tasks
    that do the tools' work, and serves `tools/call` itself (`take_over_tool_calls`). Until it
    runs, and once the runtime has stopped after an error, tool calls are refused with
    `not_running`. A subclass that observes calls overrides `handle_tool_call`; one that
    overrides `intercept_tool_call` keeps the SDK's chain (and its cost).
    """

    identifier = EXTENSION_ID

    #: Whether what runs this extension serves `metrics.prometheus_port` (the standalone server
    #: does); where not, the lifespan warns of a port set in the settings, which nothing serves.
    serves_prometheus_port = False

    def __init__(self, settings: Settings | None = None, *, manager: SessionManager | None = None) -> None:
        """`settings`: by default `load_settings()`, the built-in defaults and the `MCP_SESSIONS_*`
        environment variables.

        `manager`: a `SessionManager` built elsewhere (a subclass, say), instead of the one
        `settings` would make. Its limits are the ones enforced and advertised; `apply_settings`
        sets `settings.limits` on it.

        Raises:
            ConfigError: with no `settings`, an environment variable is wrong (each problem named).
            TypeError: `settings` is not a `Settings` (a path, a dict, a `LimitsSettings`): the
                message says how to make one (`load_settings(path)`, `Settings(limits=...)`);
                `manager` is not a `SessionManager`.
        """
        self.config = require_settings(settings, "SessionsExtension()") if settings is not None else load_settings()
        if manager is None:
            manager = make_manager(self.config)
        elif not isinstance(manager, SessionManager):
            raise TypeError(
                f"SessionsExtension(manager=...) takes a SessionManager, got {type(manager).__name__}; "
                "leave it out to have one made from the settings"
            )
        else:
            # Its limits are the ones in force: the deadlines (`timeout_for`) read them too.
            self.config = self.config.model_copy(update={"limits": manager.limits})
        self.manager = manager
        self._running = False
        #: Whether the runtime stopped after an error (its reaper raised): calls are refused
        #: with a restart, not with the lifespan's set-up advice. Cleared when it starts again.
        self._failed = False
        self._app: Any = None
        self._exit_listeners: list[Callable[[ShutdownReport], None]] = []
        #: The report of the shutdown whose summary was logged and listeners notified.
        self._announced: ShutdownReport | None = None
        #: The `[tools.NAME]` names warned about as matching no tool (each once).
        self._warned_tables: set[str] = set()
        self._warned_exporter = False
        self._works = {}  # decoupled work still running (see `DecoupledCalls`)
        #: The server's tool registry lookup (set by the lifespan; None: no registry to ask).
        self._get_tool: Callable[[str], Any] | None = None
        self._plans: dict[str, _Plan] = {}
        #: What `handle_tool_call` calls by default: the handler it took over (see
        #: `take_over_tool_calls`).
        self._next_handler: ToolCallHandler = _not_taken_over
        #: Lifespans open now (they may overlap: see `lifespan`), and the lock their starts
        #: and stops take turns under.
        self._lifespans = 0
        self._lifecycle = anyio.Lock()
        #: The task running the manager, and what tells it to stop (while a lifespan is open).
        self._runtime: tuple[asyncio.Task[None], anyio.Event] | None = None
        #: The limiter of the threads sync tools run in while the runtime runs: admission bounds
        #: them, not the limiter (see `_start`).
        self._tool_threads: anyio.CapacityLimiter | None = None
        #: The event loop the runtime runs on (while it runs): `apply_settings` from another thread hands over to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._give_back: Callable[[], None] | None = None
        #: What `settings` advertises: one dict for the extension's life, kept current.
        self._advertised: dict[str, Any] = {}
        self._advertise()

    # -- Extension contributions -----------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What the server advertises under `capabilities.extensions[EXTENSION_ID]` (protocol
        2026-07-28): `maxConcurrentSessions` and `defaultTimeoutSeconds`, the limits in force.

        The SDK asks once, when the server is built, and keeps the dict it got (see
        `server.sdk_seams`); `server/discover` reads it at every request. So this is one dict
        of the extension's own, which `apply_settings` updates in place: a client that connects
        after a reload sees the new limits."""
        return self._advertised

    def _advertise(self) -> None:
        limits = self.config.limits
        self._advertised.update(
            maxConcurrentSessions=limits.max_concurrent_sessions,
            defaultTimeoutSeconds=limits.default_timeout_seconds,
        )

    def tools(self) -> Sequence[ToolBinding]:
        return session_tool_bindings(self)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether new calls are admitted: the lifespan runs and no shutdown has begun."""
        return self._running and not self.manager.shutting_down

    def apply_settings(self, settings: Settings) -> None:
        """Use `settings` from now on (a config reload): new calls get its limits and per-tool
        deadlines, caps and idle timeouts; running sessions keep theirs. Raising a cap admits
        queued calls that now fit; lowering one ends nothing (admission waits below it). Clients that
        connect from now on see the new limits in the extension's advertised `settings`.

        `[store]` is not applied (warned about): the session store is chosen when the extension
        is built.

        Called from a thread other than the event loop's while the runtime runs (a host's
        config watcher), it hands the change to the loop and returns once it is applied, or
        after `APPLY_WAIT_SECONDS` if the loop is busy (waiting for that thread, say): it is then
        applied when the loop next runs.

        Raises:
            TypeError: `settings` is not a `Settings` (a `LimitsSettings`, a dict, None): the
                settings in force stay as they were.
        """
        settings = require_settings(settings, "apply_settings()")
        loop = self._loop
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            # From another thread (a host's config watcher): the queue's wake-ups belong to the
            # loop, and set from here they woke no one until something else did (a queued call
            # waited for an unrelated call's end). Applied on the loop; this waits for it, but
            # only so long: the loop may be waiting for this very thread (joining it).
            applied: concurrent.futures.Future[None] = concurrent.futures.Future()
            # Whether the caller stopped waiting: then a failure is logged, as nobody will raise it.
            # Decided under the lock, with the outcome: a failure is raised or logged, never lost.
            waited_out = [False]
            decided = threading.Lock()

            def apply() -> None:
                try:
                    self._apply_settings(settings)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread, or logged
                    with decided:
                        applied.set_exception(exc)
                        unheard = waited_out[0]
                    if unheard:
                        logger.error("apply_settings (from another thread) failed on the event loop", exc_info=exc)
                else:
                    with decided:
                        applied.set_result(None)

            loop.call_soon_threadsafe(apply)
            try:
                applied.result(timeout=APPLY_WAIT_SECONDS)
            except concurrent.futures.TimeoutError:
                with decided:
                    if not applied.done():
                        waited_out[0] = True  # applied when the loop next runs; a failure is logged then
                        return
                applied.result()  # done just now: its outcome, raised here if it failed
            return
        self._apply_settings(settings)

    def _apply_settings(self, settings: Settings) -> None:
        if settings.store != self.config.store:
            # The session store was opened with the manager, when the extension was built.
            logger.warning(
                "apply_settings: [store] is ignored (the session store is chosen once, when the extension is "
                "built: it stays %s); to use another store, build a new SessionsExtension with these settings",
                f"the {self.config.store.backend} store",
            )
            settings = settings.model_copy(update={"store": self.config.store})
        self.manager.set_limits(settings.limits, settings.tool_caps())
        self.config = settings  # only now: a call never sees settings the manager refused
        self._advertise()
        if self._running:
            self._warn_unmatched_tool_tables()

    def _warn_unmatched_tool_tables(self) -> None:
        """Warn of each `[tools.NAME]` table that names no tool of the server (a typo, most
        likely) or a session tool: nothing applies it (a host's own tool registered under a
        removed session tool's name is a hosted tool, and its table applies). Only warned, not refused: a host may
        add the tool later. (The standalone server refuses them, knowing all its tools.) Each
        name is warned about once: lifespan starts (one per in-process client, say) and reloads
        that keep the table do not repeat it."""
        get_tool = self._get_tool
        if get_tool is None:
            return
        # A session tool's name: its table is ignored while the session tool has the name;
        # once the host removed it, the name is free for a tool of the host's (then it applies).
        session_tools: set[str] = set()
        unmatched: list[str] = []
        for name in self.config.tools:
            if name in self._warned_tables:
                continue
            entry = get_tool(name)
            if entry is not None and name in MANAGEMENT_TOOLS and is_session_tool(entry):
                session_tools.add(name)
            if entry is None or name in session_tools:
                unmatched.append(name)
        if not unmatched:
            return
        self._warned_tables.update(unmatched)
        names = [name for name in tool_names(self._app) if name not in MANAGEMENT_TOOLS]  # the configurable ones
        listed = f" (its tools: {list_names(names)})" if names else ""
        for name in unmatched:
            if name in session_tools:
                logger.warning("[%s] is ignored: %s; remove it", dotted_key(("tools", name)), SESSION_TOOL_TABLE)
                continue
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            logger.warning(
                "[%s] names no tool of this server%s: its settings apply only to a tool of that name added later%s",
                dotted_key(("tools", name)),
                listed,
                hint,
            )

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Start the session runtime for `app` (an `MCPServer`); stop it on exit.

        Usable as `MCPServer(lifespan=sessions.lifespan)` or nested in a host's own lifespan.
        The SDK enters a server's lifespan once per connection on some transports (SSE, and each
        in-process `Client`), so lifespans may overlap: the first one in starts the runtime, the
        others join it, and the last one out stops it, whatever order they leave in.

        `app` None (`sessions.lifespan()`) runs it without a server: with no registry to ask, every
        call is then of a tool of unknown kind, run decoupled as one that may be stuck in a thread
        (`server.decoupled`). An `MCPServer` that does not list this extension in its
        `extensions=[...]` is warned about (its calls would get no session).

        Raises:
            RuntimeError: the runtime already runs for another server (one extension serves one),
                or the event loop is not asyncio's (anyio's trio backend, say).
            TypeError: `app` is neither None nor an `MCPServer` (a Starlette app, the lowlevel
                server): nothing is started.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "SessionsExtension needs anyio's asyncio backend (its deadlines and decoupled work use asyncio "
                "tasks), and this server runs on another one: run it with anyio.run(..., backend='asyncio')"
            ) from None
        require_server(app)
        with anyio.CancelScope(shield=True):  # a cancelled enter must not leave the count wrong
            async with self._lifecycle:
                if self._lifespans and app is not self._app:
                    raise RuntimeError(
                        f"this SessionsExtension already runs for {describe_server(self._app)}, and its lifespan "
                        f"was entered for {describe_server(app)}: one extension serves one server; give each "
                        "server its own, and enter its lifespan with that server (what "
                        "MCPServer(..., lifespan=sessions.lifespan) passes)"
                    )
                if not self._lifespans:
                    await self._start(app)
                self._lifespans += 1
        try:
            yield {"sessions": self}
        finally:
            # Shielded: the last one out must stop the runtime even when its task is cancelled.
            with anyio.CancelScope(shield=True):
                async with self._lifecycle:
                    self._lifespans -= 1
                    if not self._lifespans:
                        await self._stop()

    async def _start(self, app: Any) -> None:
        """Run the manager (`SessionManager.running`) in a task of the extension's own, so that it
        outlives the lifespan that started it; take `tools/call` over. Raises what starting the
        manager raised (e.g. the store is unreachable), with nothing started."""
        warn_if_not_listed(self, app, logger)
        self._app = app
        self._get_tool = registry_lookup(app)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stop = anyio.Event()
        runtime = asyncio.create_task(self._run_manager(started, stop))
        try:
            await started
        except BaseException:
            await asyncio.wait([runtime])  # it has ended, or is ending, by the same error
            raise
        self._runtime = (runtime, stop)
        self._loop = asyncio.get_running_loop()
        # Every admitted session gets a thread at once if its tool needs one: anyio's default
        # limiter has 40 tokens, and calls admitted past them waited for a thread with their
        # deadline running (100 calls of 1.5 s under a 2 s deadline: 56 timed out, their threads
        # left stuck). This limiter has no bound of its own: a token goes only to an admitted
        # call's own thread (`_thread_pool`), and an abandoned thread gives its token back, so
        # admission bounds the threads; a bound here, kept in step with the cap, would make calls
        # admitted before a reload lowered the cap wait for a thread with their deadline running.
        self._tool_threads = anyio.CapacityLimiter(math.inf)
        self._running = True
        self._failed = False
        self._make_registered_cancellable(app)
        self._give_back = self.take_over_tool_calls(app)
        self._warn_unmatched_tool_tables()
        port = self.config.metrics.prometheus_port
        if port and not self.serves_prometheus_port and not self._warned_exporter:
            self._warned_exporter = True
            logger.warning(
                "metrics.prometheus_port = %s is not served here: the standalone server serves it, and an embedding "
                "host serves its own metrics (server.prometheus.build_registry(sessions.manager) is a "
                "prometheus_client registry of them)",
                port,
            )

    async def _run_manager(self, started: asyncio.Future[None], stop: anyio.Event) -> None:
        try:
            async with self.manager.running():
                started.set_result(None)
                await stop.wait()
        except asyncio.CancelledError:  # the loop is closing under an open lifespan
            self._running = False
            if not started.done():
                started.cancel()
            raise
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)  # the lifespan that started it raises it
                return
            # After start-up the manager's own tasks (the reaper) do not raise; if one did, say
            # so, and refuse calls rather than serve them with no deadlines.
            self._running = False
            self._failed = True
            logger.exception("The session runtime stopped: tool calls are refused from now on; restart the server")
            if not isinstance(exc, Exception):
                raise

    async def _stop(self) -> None:
        """The last lifespan is leaving: give `tools/call` back, stop the work, stop the manager."""
        self._running = False
        self._tool_threads = None
        self._loop = None
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()
        await self._stop_works()
        stuck = self.manager.metrics().abandoned_threads
        if stuck:
            logger.warning(
                "Leaving %s stuck thread(s) behind: sync tools still running after their calls ended",
                stuck,
            )
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            task, stop = runtime
            stop.set()
            await asyncio.wait([task])

    def take_over_tool_calls(self, app: Any) -> Callable[[], None] | None:
        """Serve `app`'s `tools/call` requests with `handle_tool_call` itself, in place of the
        SDK's interceptor chain; return what puts the chain back (None: nothing was changed).

        The chain (`mcp.server.extension.compose_tool_call_handler`) makes two closures and runs
        four coroutines around the handler on every call: taking it out saved 6,000-9,500 of the
        52,000-54,000 CPU instructions this extension added to a no-op call (cachegrind,
        `make profile`, depending on the memory layout). The chain is rebuilt without this
        extension's link, the same order kept: the interceptors of the extensions listed before
        it still run outside it, and those listed after it inside (see
        `server.sdk_seams.serve_tool_calls`).

        Only the chain the SDK composed is replaced (recognised by its code): a handler someone
        else registered is left alone, and so is the chain of a subclass that overrides
        `intercept_tool_call` (the take-over would skip its override); calls then keep coming
        through `intercept_tool_call`. To observe calls, a subclass overrides `handle_tool_call`,
        which both ways run.
        """
        if type(self).intercept_tool_call is not SessionsExtension.intercept_tool_call:
            return None
        taken = serve_tool_calls(app, self, self.handle_tool_call)
        if taken is None:
            return None
        self._next_handler, give_back = taken
        return give_back

    # -- shutdown --------------------------------------------------------------------------

    def add_exit_listener(self, listener: Callable[[ShutdownReport], None]) -> None:
        """Call `listener(report)` when a graceful shutdown has finished (the host then exits).

        Listeners are called in the order added, synchronously, on the event loop: one that has
        async work to do starts a task for it.

        Raises:
            TypeError: `listener` is not callable, or calling it makes a coroutine (an `async def`
                function, a partial of one, an object whose `__call__` is one): it would be
                called, never awaited.
        """
        if not callable(listener):
            raise TypeError(
                f"add_exit_listener takes a function to call with the ShutdownReport, got {kind(listener)}: "
                f"{listener!r:.80}"
            )
        if is_async_callable(listener):
            raise TypeError(
                f"exit listeners are called synchronously, so {listener!r:.80} (async) would never run: "
                "pass a plain function, which may start a task for the async work"
            )
        self._exit_listeners.append(listener)

    async def shutdown(self, timeout_seconds: float | None = None) -> ShutdownReport:
        """Graceful shutdown: stop admitting, drain, cancel the rest, notify exit listeners.

        A call made while a shutdown runs, or after it, joins it and returns its report; only
        the call that ran it logs the summary and notifies the listeners (once per shutdown).

        Raises:
            TypeError, ValueError: `timeout_seconds` is neither None (`shutdown.timeout_seconds`)
                nor a finite number of seconds >= 0; nothing has changed (calls are still admitted).
            Exception: the first exit listener that raised, for the call that ran the listeners
                (after all of them ran; the shutdown is done).
        """
        if timeout_seconds is None:
            timeout = self.config.shutdown.timeout_seconds
        else:
            timeout = checked_drain_timeout(timeout_seconds, "timeout_seconds")
        report = await self.manager.shutdown(timeout)
        # The manager hands every joining call the same report object: the first call back
        # with it (the one that ran the shutdown, which resumes first) announces it.
        if report is self._announced:
            return report
        self._announced = report
        by_clients = report.sessions_cancelled_during_shutdown
        logger.info(
            "Shutdown finished in %.3fs: %s of %s session(s) finished, %s%s cancelled at the deadline",
            report.shutdown_duration,
            report.sessions_completed_during_shutdown,
            report.initial_active_sessions,
            f"{by_clients} cancelled during the drain (by their clients), " if by_clients else "",
            report.sessions_cancelled_at_deadline,
        )
        # Every listener is called, even after one raised (the last one may be what stops the
        # process); the first failure is then raised, so the caller hears that one failed.
        failed: BaseException | None = None
        for listener in self._exit_listeners:
            try:
                listener(report)
            except Exception as exc:  # noqa: BLE001 - reported below, after the other listeners ran
                logger.exception("Exit listener %r failed", listener)
                failed = failed or exc
        if failed is not None:
            raise failed
        return report

    # -- the interceptor -------------------------------------------------------------------

    def _plan_for(self, name: str, tool: object, config: Settings) -> _Plan:
        """Work out (and remember) how calls of `name` run: in a thread or not, and its
        deadlines. Remembered per tool name, for this registry entry and these settings."""
        sync = None if tool is _NO_REGISTRY else runs_in_thread(tool)
        if sync is None or getattr(tool, "resolved_params", None):
            # Its kind is unknown, or resolvers fill some parameters (the SDK runs sync ones in
            # shielded thread waits of its own, async tool or not): it may be stuck in a thread
            # no cancellation reaches, so it runs decoupled.
            needs_thread, in_place = True, False
        else:
            needs_thread = sync
            in_place = not needs_thread or self._make_cancellable(tool)
        timeout, idle_timeout = config.timeout_for(name), config.idle_timeout_for(name)
        plan = (tool, config, needs_thread, in_place, timeout, idle_timeout, sync)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[name] = plan
        return plan

    def _make_cancellable(self, tool: object) -> bool:
        """Have a sync tool's registry entry run its function through a thread wait that a
        cancellation ends (`server.threads`); False where that cannot be done."""
        return make_cancellable(
            tool,
            self._thread_left_running,
            self.manager.thread_ended,
            self._thread_pool,
            self._thread_result_discarded,
            _thread_pool_back,
        )

    def _make_registered_cancellable(self, app: Any) -> None:
        """At start, give every sync tool registered by then its cancellable thread wait, so that
        an in-process call of one (`MCPServer.call_tool` from another tool) before any client has
        called it gives way to its caller's deadline too. A tool registered later gets it at its
        first call (`_plan_for`)."""
        get_tool = self._get_tool
        if get_tool is None:
            return
        for name in tool_names(app):
            tool = get_tool(name)
            if tool is not None and runs_in_thread(tool):
                self._make_cancellable(tool)

    def _thread_pool(self) -> anyio.CapacityLimiter | None:
        """The limiter a sync tool's thread comes through: the extension's own for a call it runs
        (`handle_tool_call` set the call's `THREAD_FATE` cell), one thread at a time (a retry by
        an inner interceptor gets it again once the first thread's wait ended: `_thread_pool_back`);
        None (anyio's default one) for a host's own call of the tool (`MCPServer.call_tool`), which
        holds no session, so must not take a thread admission does not bound."""
        cell = THREAD_FATE.get()
        if cell is None or not cell.pool or cell.session.state is not SessionState.ACTIVE:
            return None
        cell.pool = False
        return self._tool_threads

    def _thread_left_running(self) -> None:
        """A sync tool's thread runs on past its caller's cancelled wait: count it, and note it
        for the call's answer (see `server.outcomes.THREAD_FATE`)."""
        self.manager.thread_abandoned()
        noted = THREAD_FATE.get()
        if noted is not None:
            noted.fate = ABANDONED

    @staticmethod
    def _thread_result_discarded() -> None:
        """A sync tool's thread had returned when its caller's wait was cancelled, its result not
        yet handed over: the work was done, so the call's answer says its late result was
        discarded (a client must not take it for work that never ran)."""
        noted = THREAD_FATE.get()
        if noted is not None:
            noted.fate = LATE

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        """The SDK's interceptor hook: runs the call as `handle_tool_call` does. Used until the
        lifespan takes the `tools/call` handler over (see `take_over_tool_calls`), and where it
        cannot.

        Once it has taken over its server's handler, a call that still comes through here is
        another server's, one that lists this extension too and never ran its lifespan: refused
        (`not_running`), as it would run on the first server's registry and deadlines."""
        if self._give_back is not None:
            return not_running(params.name, serving=describe_server(self._app))
        return await self.handle_tool_call(ctx, params, lambda inner_ctx, _params: call_next(inner_ctx))

    async def handle_tool_call(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: CallToolRequestParams,
        handler: ToolCallHandler | None = None,
    ) -> HandlerResult:
        """Run one `tools/call` as a tracked session; `handler(ctx, params)` does the call (by
        default the handler this extension wraps, see `take_over_tool_calls`).

        A `tools/call` request handler itself, with the lowlevel server's signature."""
        if handler is None:
            handler = self._next_handler
        name = params.name
        get_tool = self._get_tool
        if name in MANAGEMENT_TOOLS:
            entry = get_tool(name) if get_tool is not None else None
            # Unless the host removed it (None: the SDK answers "unknown tool") or registered a
            # tool of its own under its name (a hosted call, below).
            if get_tool is None or is_session_tool(entry):
                if name == "session_create" and not self._running:
                    return not_running(name, after_error=self._failed)  # nothing would expire the session
                unknown = unknown_arguments(entry, params.arguments)
                if unknown:  # the SDK would drop them: a misspelt `timeout_seconds` must not become the default
                    error = SessionError(ErrorCode.INVALID_ARGUMENT, unknown, tool=name)
                    log_refusal(error)
                    return error_result(error)
                return with_error_code(await handler(ctx, params), name, entry, params.arguments)
        tool = get_tool(name) if get_tool is not None else _NO_REGISTRY
        if tool is None:
            return await handler(ctx, params)  # the SDK answers "unknown tool"; no session for it
        if not self._running:
            return not_running(name, after_error=self._failed)
        config = self.config
        plan = self._plans.get(name)
        if plan is None or plan[0] is not tool or plan[1] is not config:
            plan = self._plan_for(name, tool, config)
        _, _, needs_thread, in_place, timeout, idle_timeout, sync = plan
        manager = self.manager
        request_id = None if ctx.request_id is None else str(ctx.request_id)
        try:
            session = manager.open_call(name, timeout, request_id, needs_thread, idle_timeout)
            if session is None:  # full, limited per client, or otherwise not simple: the whole way
                session = await manager.create(
                    tool=name,
                    timeout_seconds=timeout,
                    request_id=request_id,
                    client=self.client_of(ctx) if manager.limits.max_sessions_per_client else None,
                    needs_thread=needs_thread,
                    idle_timeout_seconds=idle_timeout,
                )
        except SessionError as exc:
            log_refusal(exc)
            return error_result(exc)
        if idle_timeout is not None:
            ctx = replace(ctx, session=progress_session(ctx.session, lambda: manager.progress(session)))
        if not in_place:
            return await self._call_decoupled(session, name, ctx, params, handler, sync)

        # The call runs in place (inline here: a coroutine less on every call): an async tool,
        # or a sync one whose thread wait a cancellation ends (`server.threads`). Its deadline
        # is a cancel scope around it, built only if the deadline comes (`server.deadline`).
        if needs_thread:  # a sync tool's stand-in notes in this cell what became of its thread
            THREAD_FATE.set(ThreadCell(session))
        deadline = deadline_scope()
        # The manager's reaper calls it at the deadline (a LateScope is its own cancel callback).
        session.on_cancel = deadline if type(deadline) is LateScope else deadline.cancel
        result: HandlerResult | None = None
        try:
            with deadline:
                result = await handler(ctx, params)
        except anyio.get_cancelled_exc_class() as exc:
            if not _being_cancelled():
                # The tool raised CancelledError itself; passed on, it would end the server's loop.
                return failed(manager, session, name, exc)
            manager.end(session, SessionState.CANCELLED, "cancelled by the client")
            raise
        except MCPError as exc:
            manager.end(session, SessionState.ERROR, describe(exc))
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever the tool raised ends its session as error
            return failed(manager, session, name, exc)
        if deadline.cancel_called:  # the reaper (at the deadline) or shutdown cancelled the scope
            # A result despite the cancellation: the tool held it off (a shield) and finished late;
            # unless it is an error result, the cancellation turned into an error (a tool raising
            # ToolError on it, say): then the call was cancelled, no result discarded.
            late = result is not None and not getattr(result, "is_error", False)
            return stopped(manager, session, name, LATE if late else None)
        return completed(manager, session, name, result)

    #: Who is calling, for `limits.max_sessions_per_client` (see `server.sdk_seams.request_client`).
    client_of = staticmethod(request_client)


#: `apply_settings` from another thread waits this long, at most, for the loop to apply the change.
APPLY_WAIT_SECONDS = 2.0


def make_manager(settings: Settings) -> SessionManager:
    """The manager `settings` ask for: this process's own, or (`[store] backend = "redis"`) one
    whose limits hold across every replica sharing the store (`server.cluster`)."""
    if settings.store.backend == "redis":
        try:
            from server.cluster import ClusterSessionManager  # needs the `redis` package (the redis extra)
        except ImportError as exc:
            raise ConfigError(
                [f"store.backend: \"redis\" needs the redis package ({exc}): pip install 'mcp-session-manager[redis]'"]
            ) from None
        return ClusterSessionManager(settings)  # its [limits], per-tool caps and [store]
    return SessionManager(settings)


def _thread_pool_back() -> None:
    """A call's wait for the thread `_thread_pool` gave it ended: the call may take another."""
    cell = THREAD_FATE.get()
    if cell is not None:
        cell.pool = True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (else a CancelledError was raised by hand)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
