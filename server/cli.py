"""Command line: `mcp-session-manager [--config PATH] [--transport T] [--host H] [--port P] [--check-config]`.

Tier: application entry. Exit status (the README's table says more): 0 after a clean (graceful)
stop; 1 for a forced exit (a second SIGINT/SIGTERM), an HTTP listener that could not start, or a
valid `--check-config` whose settings cannot reach stdout (closed, or a full disk); 2 for a bad
configuration or command line, or in cluster mode a session store that cannot be reached or
refuses the login at start (nothing is started); 130 or 143 for a SIGINT or SIGTERM that came
while starting, before anything was served. Logs go to stderr; on stdio, stdout carries only
protocol messages, and with `--check-config` only the settings JSON: fd 1 is diverted to stderr
before the tool modules are imported. stdin is claimed before then too (on stdio for the
protocol, and for `--check-config`): a module that reads it finds it at end of file, so the
client's messages all reach the server and a check never waits for input. `--check-config`
builds the server as a start does (tool modules imported, their tools registered, their
`setup(server)` hooks run), so that what would make the start fail fails the check, and serves
nothing. `[logging]` is applied before the tool modules are imported: what they log then is at
its level and in its format, and so are Python's warnings (`logging.captureWarnings`). An exit
that serves nothing does not wait for a thread a tool module left running that is not a daemon
thread (see `_served_nothing`).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

from server.app import (
    App,
    build_app,
    busy_threads,
    force_exit,
    forget_serving,
    late_signal,
    package_version,
    serve,
)
from server.config import ConfigError, Settings
from server.config_loader import config_problems, load_settings_noting
from server.logs import capture_warnings, configure_logging
from server.reload import ConfigReloader, hold_early_hangups
from server.stdio_wire import claim_stdin, divert_stdout
from server.store_url import safe_url
from server.tool_modules import StartInterrupted

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-session-manager",
        description="MCP server whose every tool call is a tracked session with admission limits and a deadline.",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: built-in defaults)")
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], help="overrides server.transport")
    parser.add_argument("--host", help="overrides server.host")
    parser.add_argument("--port", type=int, help="overrides server.port")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config (import its tool modules, register their tools, run their setup hooks), "
        "print the effective settings, exit",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


class _StopWhileStarting(StartInterrupted):
    """SIGINT or SIGTERM came before the server served (a tool module importing, say).

    A `StartInterrupted`, not a KeyboardInterrupt: a tool module that catches KeyboardInterrupt
    while it imports would swallow it, and the stop with it. The tool modules' import, which
    reports any other exception a module raises as a config problem, lets it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _stoppable_start() -> Iterator[None]:
    """Until the server serves, SIGINT and SIGTERM end the start: no graceful shutdown is
    possible yet (nothing runs), but the process says so in one line instead of a traceback
    (SIGINT) or a silent death (SIGTERM). Python's own handlers are back on exit; once
    serving, the server's replace them."""

    def stop(signum: int, _frame: object) -> None:
        raise _StopWhileStarting(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """The command: an exit status. With `exiting` (the process ends when this returns), a SIGHUP
    is ignored from then on, instead of regaining its default action (ending the process, status
    129) for the last moments of an exit that has otherwise run its course."""
    give_back = hold_early_hangups()  # a SIGHUP before the server serves is a reload once it does, not a silent death
    if exiting:
        # Run after the tool modules' `atexit` handlers (registered before any of theirs; those of
        # `logging` and `multiprocessing`, imported earlier, run after it: the exit waits for no
        # process of a tool's, see `server.app._report_exit`): from then on, Python's exit gives
        # handlers written in Python the default action back, and a SIGINT or SIGTERM there would
        # turn a finished exit's status into the signal's.
        atexit.register(_ignore_stop_signals)
    if sys.stderr is None:
        # Started with fd 2 closed (`2>&-`): what would be said goes nowhere, but the exit status
        # must still say it (writing to None failed with status 1, where a config error is 2).
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    try:
        try:
            with _stoppable_start():
                started = _start(argv)
        except _StopWhileStarting as exc:
            name = signal.Signals(exc.signum).name
            sys.stderr.write(f"mcp-session-manager: {name} while starting; stopped before serving anything\n")
            return _served_nothing(128 + exc.signum, exiting)  # as a shell reports a process a signal ended
        if isinstance(started, int):
            return _served_nothing(started, exiting)
        # SIGINT and SIGTERM, wherever serving's own handlers are not in place: its transports'
        # receivers put this back when they end, so it covers the exit's last moments too.
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        for signum in previous:
            signal.signal(signum, late_signal)
        try:
            serve(*started)
        finally:
            if not exiting:  # called in-process, which goes on: give its handlers back
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                forget_serving()
        return 0
    finally:
        give_back(exiting)


def _ignore_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _served_nothing(status: int, exiting: bool) -> int:
    """`status`, for an exit that served nothing (a check, a config problem, a stop while starting).
    With `exiting`, if a tool module started a thread that is still running and not a daemon (a
    cache refresher, say), the process exits now with `status`, naming the threads in one line:
    Python would wait for them at exit, so a check that had passed, or a config error, hung instead
    of exiting. That exit runs no `atexit` handler (Python runs them only after those threads end).
    Without such threads, `status` is returned and the process exits the ordinary way."""
    held = busy_threads() if exiting else []
    if held:
        names = ", ".join(repr(thread.name) for thread in held)
        sys.stderr.write(
            f"mcp-session-manager: exiting without waiting for {len(held)} thread(s) a tool module started and left"
            f" running ({names}): Python would wait for them at exit, as they are not daemon threads; atexit"
            " handlers are not run\n"
        )
        if sys.stdout is not None:
            sys.stdout.flush()  # a module's print still buffered: fd 1 is stderr by now
        force_exit(status)
    return status


def _start(argv: Sequence[str] | None) -> int | tuple[App, ConfigReloader, BinaryIO | None, BinaryIO | None]:
    """Everything before serving: read the config, import the tool modules, build the server.
    An exit status if there is nothing to serve (a check, or a problem); else what `serve` takes."""
    args = _parser().parse_args(argv)
    # Python's mark of a process started with fd 1 closed (`>&-`), read before any tool module
    # could replace sys.stdout: the wire is then the null device, and a check's settings would be lost.
    stdout_closed = sys.stdout is None
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # tool modules in the working directory, as `python -m` finds them
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    for flag in ("transport", "host", "port"):
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault("server", {})[flag] = value
    wire: BinaryIO | None = None
    stdin: BinaryIO | None = None
    try:
        # `hidden`: valid as overridden, but not the file alone (what it fails of once the override is gone).
        settings, hidden = load_settings_noting(args.config, overrides)
        # Before any tool module is imported too: what a module logs while imported or set up
        # comes out at the configured level and in the configured format, as everything after.
        configure_logging(settings.logging)
        capture_warnings()  # Python's warnings (a tool module's) in that format too, not raw
        if args.check_config or settings.server.transport == "stdio":
            # Before any tool module is imported: what it prints must not reach the protocol
            # stream (stdio) or the settings JSON (--check-config), and what it reads must not be
            # the client's messages (nor wait, in a check, for a terminal or a pipe that never ends).
            wire = divert_stdout()
            stdin = claim_stdin()
        # A check builds the server as a start does (tools registered, setup hooks run), short of serving.
        # `[logging]` again after each module's import and each setup hook: a module may set logging up
        # for itself (`basicConfig(force=True)`: a plain StreamHandler on the root logger, the root's
        # level), and what comes next (the next module, the SDK's server, its hook) logs as the server's.
        # A handler of another class it adds to the root (a file's, say) is its own, and stays.
        app = build_app(settings, after_module_code=lambda: configure_logging(settings.logging))
    except ConfigError as exc:
        problems = "\n  ".join(config_problems(exc, args.config))
        sys.stderr.write(f"mcp-session-manager: invalid configuration:\n  {problems}\n")
        return EXIT_CONFIG
    notes = [*app.ineffective(), *hidden]
    if args.check_config:
        assert wire is not None
        failure = "stdout is closed" if stdout_closed else _write_settings(wire, settings)
        if failure is not None:
            sys.stderr.write(f"mcp-session-manager: cannot write the settings to stdout: {failure}\n")
            return 1
        for note in notes:
            sys.stderr.write(f"mcp-session-manager: note: {note}\n")
        sys.stderr.write("mcp-session-manager: configuration is valid\n")
        return 0
    if settings.store.backend == "redis":
        from server.store import check_reachable  # the redis extra

        unreachable = check_reachable(settings.store)
        if unreachable is not None:
            sys.stderr.write(f"mcp-session-manager: {unreachable}\n")
            return EXIT_CONFIG
    for note in notes:
        logger.warning("Config: %s", note)
    reloader = app.reloader(args.config, overrides)
    # What the start built (the modules, the SDK's models of each tool: half a million objects with
    # 5,000 tools) lives as long as the process. Moved out of the garbage collector's sight, it is
    # not walked by every full collection, which held the event loop about 0.4 s at a time there.
    gc.collect()
    gc.freeze()
    return app, reloader, wire, stdin


def _write_settings(wire: BinaryIO, settings: Settings) -> str | None:
    """Write the effective settings to `wire` as JSON; None, or why they could not be written
    (a closed pipe, a full disk as `> /dev/full` is): a check that prints nothing has not passed."""
    effective = settings.model_dump(mode="json")
    effective["store"]["url"] = safe_url(settings.store.url)  # never print a password
    try:
        wire.write((json.dumps(effective, indent=2) + "\n").encode())
        wire.flush()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run() -> None:
    sys.exit(main(exiting=True))
