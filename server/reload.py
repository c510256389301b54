"""Config reload without restart: SIGHUP re-reads the config file given at startup.

Tier: operations. `ConfigReloader.reload()` loads the file the way startup did
(`load_settings(path, overrides)`: the command-line flags still win) and checks it the same way.
A valid file is applied at once: new calls get its limits, per-tool deadlines and shutdown
settings; running sessions keep their deadlines, and lowering the cap ends none of them (until
enough have ended, new calls wait in the queue where `limits.max_queued` allows, else are
refused). `[logging]` is applied only where this process's logging is ours, set up by
`configure_logging` (the standalone server), and there on every applied reload, changed or not:
what a tool changed in it while the server ran (the root logger's handler replaced or doubled,
its level) is put back, and the log says so; in an embedding host it is the host's (handlers,
levels, the `logging` module's flags), and a reload leaves it as it is, saying so. An invalid
file (and a path that cannot be read as one: missing, not a regular file, any OS error) is
rejected with the same message as at startup, and the config in force stays. Keys bound at
startup (the `[server]` table, `metrics.prometheus_port` and the `[store]` table: the session
store is opened once, at startup) are reported as ignored until a restart, never as applied.
`watch_sighup` reads and checks the file in a thread of its own, so that a slow disk or mount
stalls no call. Both outcomes are counted by the manager (`config_reloads`,
`config_reload_failures`).

Example:
    ```python
    reloader = ConfigReloader(sessions, "server.toml", overrides={"server": {"port": 9000}})
    async with anyio.create_task_group() as tg:
        await tg.start(reloader.watch_sighup)
    ```
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskStatus

from server.config import ConfigError, Settings, mask_secrets
from server.config_loader import config_problems, load_settings_noting, overridden_in_file
from server.extension import SessionsExtension
from server.logs import configure_logging, configured_here, logging_drift
from server.toml_keys import dotted_key, parse_dotted_key

logger = logging.getLogger(__name__)

#: Settings bound at startup (a listening socket, imported modules, the session store and its
#: connection): a reload cannot change them.
RESTART_ONLY = ("server", "metrics", "store")
#: The table a reload leaves alone where the host, not this package, configures logging.
LOGGING = "logging"

T = TypeVar("T")


def _flatten(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dotted key (as TOML writes it: `tools."my.tool".timeout_seconds`) -> value."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))  # an empty table adds no key
        else:
            flat[dotted_key(path)] = value
    return flat


def changes(old: Settings, new: Settings) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every setting that differs."""
    before = _flatten(old.model_dump(mode="json"))
    after = _flatten(new.model_dump(mode="json"))
    keys = sorted(before.keys() | after.keys())
    return {key: (before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)}


class _EarlyHangup:
    """A SIGHUP that came before `watch_sighup` took the signal over: remembered, not fatal."""

    seen = False

    @classmethod
    def remember(cls, _signum: int, _frame: object) -> None:
        cls.seen = True

    @classmethod
    def take(cls) -> bool:
        seen, cls.seen = cls.seen, False
        return seen


def hold_early_hangups() -> Callable[[bool], None]:
    """From now until `watch_sighup` runs, a SIGHUP (a reload asked for while the server starts:
    while a tool module imports, say) is remembered, and `watch_sighup` then reloads once, so the
    file read is no older than the request. Without this, SIGHUP's default action ends the process
    silently (status 129). Call it on the main thread, before the start's slow parts; call what it
    returns when done (serving or not), to put back the handler there was and forget the request;
    or, with `exiting` True (the process ends next), to ignore SIGHUP until it does: a signal in
    the last moments of a finished exit must not turn its status into 129. (Python's own exit
    gives a handler written in Python back to the default action; it leaves an ignored signal be.)"""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None:  # pragma: no cover - Windows has no SIGHUP
        return _nothing_to_give_back
    _EarlyHangup.seen = False
    previous = signal.signal(hangup, _EarlyHangup.remember)

    def give_back(exiting: bool = False) -> None:
        signal.signal(hangup, signal.SIG_IGN if exiting else previous)
        _EarlyHangup.seen = False

    return give_back


def _nothing_to_give_back(exiting: bool = False) -> None:  # pragma: no cover - Windows has no SIGHUP
    pass


class ConfigReloader:
    """Re-reads `path` on request and applies it to `sessions` if valid.

    `manage_logging` says whether a reload applies `[logging]` to the process's logging (the
    root logger's handler and level, process-wide `logging` flags). By default (None) it does
    only if `configure_logging` set that logging up, as the standalone server does: an
    embedding host's logging is never taken over.
    """

    def __init__(
        self,
        sessions: SessionsExtension,
        path: str | os.PathLike[str] | None,
        overrides: Mapping[str, Any] | None = None,
        check: Callable[[Settings], None] | None = None,
        *,
        manage_logging: bool | None = None,
    ) -> None:
        self.sessions = sessions
        self.path = path
        self.overrides = dict(overrides or {})
        #: Further validation startup ran (the standalone server checks `[tools.NAME]` names).
        self.check = check
        self.manage_logging = manage_logging
        #: The file's keys something overrides, as the last `_load` found them (see `overridden_in_file`).
        self._overridden: dict[str, tuple[Any, str]] = {}
        #: Problems of the file's values that something overrides (see `load_settings_noting`).
        self._hidden: list[str] = []

    def reload(self) -> bool:
        """Load and apply the file; False (logged, counted) if it is invalid and nothing changed."""
        return self._apply(self._load())

    def _load(self) -> Settings | list[str]:
        """The settings the file (with the environment and the flags) gives now, or its problems.

        Only reads and validates: it may run in a thread of its own (see `_reload_in_thread`)."""
        try:
            new, hidden = load_settings_noting(self.path, self.overrides)
            if self.check is not None:
                self.check(new)
        except ConfigError as exc:
            return config_problems(exc, self.path)
        # What overrides the file, for the note when nothing changed (`_overridden_note`): read
        # here, off the event loop, as the settings were.
        try:
            self._overridden = overridden_in_file(self.path, self.overrides) if self.path is not None else {}
        except ConfigError:
            self._overridden = {}
        self._hidden = hidden
        return new

    def _where(self) -> str:
        """What a reload reads, as its log lines name it."""
        return str(self.path) if self.path is not None else "the environment (no --config file)"

    def _apply(self, new: Settings | list[str]) -> bool:
        """Apply loaded settings, or reject the problems of an invalid file (on the event loop's thread)."""
        where = self._where()
        old = self.sessions.config
        if isinstance(new, list):
            self.sessions.manager.config_reloaded(ok=False)
            logger.error(
                # One line, as every record (a log line per problem would read as separate events).
                "Config reload from %s rejected; the config in force is unchanged. invalid configuration: %s",
                where,
                "; ".join(new),
            )
            return False
        ours = self.manage_logging if self.manage_logging is not None else configured_here()
        kept = RESTART_ONLY if ours else (*RESTART_ONLY, LOGGING)
        effective = new.model_copy(update={section: getattr(old, section) for section in kept})
        ignored = changes(effective, new)
        host_owned = {key: change for key, change in ignored.items() if key.startswith(LOGGING + ".")}
        restart_only = {key: change for key, change in ignored.items() if key not in host_owned}
        applied = changes(old, effective)
        self.sessions.apply_settings(effective)
        # Every time where the logging is ours, changed or not: a tool (or a library it uses) may
        # have replaced the root logger's handler, added one of its own or changed the root's
        # level while the server ran; `configure_logging` puts back what drifted, nothing else.
        drift = logging_drift(effective.logging) if ours and old.logging == effective.logging else []
        if ours:
            configure_logging(effective.logging)
        if drift:
            logger.info("Config reload: [logging] applied again (%s)", "; ".join(drift))
        self.sessions.manager.config_reloaded(ok=True)
        for note in [*effective.ineffective(), *self._hidden]:
            logger.warning("Config reload: %s", note)
        if restart_only:
            # New tool modules are imported only by the restart: a module that cannot be imported
            # would then stop the server from starting. Say how to find out first.
            check = ""
            if "server.tool_modules" in restart_only and self.path is not None:
                check = "; before restarting, check the new config with: mcp-session-manager --config "
                check += shlex.quote(str(self.path))
                check += " --check-config"
            logger.warning("Config reload: ignored until restart: %s%s", _describe(restart_only), check)
        if host_owned:
            logger.info(
                "Config reload: [logging] left to the host, which configures this process's logging (not applied: %s)",
                ", ".join(f"{key} = {_show(now, key)}" for key, (_, now) in host_owned.items()),
            )
        if applied:
            # A shutdown under way read its drain deadline when it began: say so, or an operator
            # shortening a stuck drain would wait for an effect that never comes.
            draining = "shutdown.timeout_seconds" in applied and self.sessions.manager.shutting_down
            logger.info(
                "Config reloaded from %s: %s%s",
                where,
                ", ".join(f"{key} {_show(was, key)} -> {_show(now, key)}" for key, (was, now) in applied.items()),
                " (the shutdown under way keeps the drain deadline it began with)" if draining else "",
            )
        else:
            # The environment as the reason only where it may be one: a file was read, and no edit
            # was reported above as ignored until a restart (the environment cannot change under a
            # running process). A `[logging]` left to the host is no such edit: it differs at every
            # reload of a file that has one, and would hide the note for good.
            note = self._overridden_note(effective) if self.path is not None and not restart_only else ""
            logger.info("Config reloaded from %s: nothing changed%s", where, note)
        return True

    async def watch_sighup(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload on every SIGHUP until cancelled (reports started once the handler is in place)."""
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is None:  # pragma: no cover - Windows has no SIGHUP
            task_status.started()
            return
        # Leaving the receiver sets SIGHUP's default action (the process ends), not what was there:
        # put that back, so that a SIGHUP while the server winds down is no more fatal than one
        # while it ran (the standalone server's is `hold_early_hangups`' until the process exits).
        previous = signal.getsignal(hangup)
        try:
            with anyio.open_signal_receiver(hangup) as signals:
                task_status.started()
                if _EarlyHangup.take():  # see `hold_early_hangups`
                    logger.info("Received SIGHUP while starting: reloading the config now that the server runs")
                    await self._reload_in_thread()
                async for _ in signals:
                    logger.info("Received SIGHUP: reloading the config")
                    await self._reload_in_thread()
        finally:
            if previous is not None:  # (None: a handler set outside Python, which cannot be put back)
                with contextlib.suppress(ValueError, OSError):  # (not the main thread: nothing to put back)
                    signal.signal(hangup, previous)

    async def _reload_in_thread(self) -> None:
        """Reload, reading and checking the file in a thread of its own, so that a slow disk or
        mount stalls no call, nor waits behind sync tools holding the worker threads; applying the
        result is back on the event loop. A daemon thread: one still reading when the server stops
        is left behind, not taken at the exit for stuck tool work. Nothing raised while reading can
        end the server: an unexpected failure is a rejected reload, logged with its traceback."""
        try:
            loaded = await _in_daemon_thread(self._load)
        except Exception:  # noqa: BLE001 - logged; a reload must never stop a serving server
            logger.exception("Config reload from %s failed; the config in force is unchanged", self._where())
            self.sessions.manager.config_reloaded(ok=False)
            return
        self._apply(loaded)

    def _overridden_note(self, in_force: Settings) -> str:
        """The file's keys whose value is not in force because the environment or the command
        line override them, each with what does (an edit to one changes nothing); "" if none.
        Key names only: a value might be a secret."""
        effective = _flatten(in_force.model_dump(mode="json"))
        overridden = [
            f"{key} by {by}" for key, (value, by) in self._overridden.items() if effective.get(key, value) != value
        ]
        if not overridden:
            return ""
        return f" (overridden, so the file's value is not in force: {', '.join(overridden)})"


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` run in a new daemon thread (named "mcp-config-reload"), its result or exception
    given back here. Cancelling the wait leaves the thread to finish on its own."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # noqa: BLE001 - raised again by the waiting task
            outcome.append((False, exc))
        with contextlib.suppress(anyio.RunFinishedError, RuntimeError):  # the loop has finished, or closed
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=run, name="mcp-config-reload", daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def _describe(ignored: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(
        f"{key} (in force {_show(was, key)}, file {_show(now, key)})" for key, (was, now) in ignored.items()
    )


def _show(value: Any, key: str = "") -> str:
    """`value` as logged for the dotted `key`: a password in a store URL is shown as ***."""
    value = mask_secrets(parse_dotted_key(key) or tuple(key.split(".")), value)
    return "unset" if value is None else repr(value)
