"""The processes a tool starts with `multiprocessing` (a `ProcessPoolExecutor`'s workers, say),
at the standalone server's exit.

Tier: application wiring (used by `server.app`). A forked child is a copy of the server: it holds
the listening socket and the stdio pipes, and it has the server's signal handlers, which only
write the signal's number to the event loop's wake-up socket, shared with the server (so a SIGTERM
sent to such a child used to stop the server, and left the child running). `reset_forked_children`
gives every forked child signal handling of its own (SIGINT does nothing, SIGTERM and SIGHUP have
their default action); the forced exit, which skips the `atexit` hook of `concurrent.futures` that stops a pool's
workers, stops the children itself (`stop_child_processes`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

_registered = False
#: Whether a forked child's signals are set up (`reset_forked_children`; the hook, once
#: registered, cannot be taken back: `stop_resetting_forked_children` turns it off).
_resetting = False


def reset_forked_children() -> None:
    """From now on, a child forked from this process (not exec'd: `multiprocessing`'s "fork"
    start method) starts with no wake-up fd, a SIGINT that does nothing (a terminal's Ctrl-C, sent
    to the whole process group, is the server's to handle: its graceful shutdown lets the child's
    work in hand finish), and the default action for SIGTERM and SIGHUP. Once per process."""
    global _registered, _resetting
    _resetting = True
    if not _registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_in_forked_child)
        _registered = True


def stop_resetting_forked_children() -> None:
    """The server has stopped and the process goes on (`server.cli.main` called in-process): its
    children fork as any other process's."""
    global _resetting
    _resetting = False


def _ignore(signum: int, frame: object) -> None:
    """SIGINT in a forked child: nothing. A handler, not SIG_IGN, which a program the child then
    runs (`exec`, as `subprocess` with a `preexec_fn` forks through this hook) would keep."""


def _in_forked_child() -> None:
    if not _resetting:
        return
    # The forking thread is the child's main thread: it may set handlers.
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, _ignore)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
    except (ValueError, OSError):  # pragma: no cover - not the main thread after all
        pass


def live_children() -> list[Any]:
    """The live `multiprocessing` children of this process (`multiprocessing.Process` objects);
    none if `multiprocessing` was never imported. For the exit, which must not fail on this."""
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None:
        return []
    try:
        return list(multiprocessing.active_children())
    except Exception:  # noqa: BLE001 - an exit must not fail on this
        return []


def stop_child_processes(within: float) -> int:
    """Stop the live `multiprocessing` children of this process: SIGTERM, then SIGKILL for those
    still alive `within` seconds later. Returns how many there were. Only for an exit that will
    not wait for them (`os._exit`)."""
    children = live_children()
    for child in children:
        try:
            child.terminate()
        except Exception:  # noqa: BLE001, S110 - gone meanwhile, or not ours to signal
            pass
    deadline = time.monotonic() + within
    for child in children:
        try:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
        except Exception:  # noqa: BLE001, S110 - as above
            pass
    return len(children)
