"""Signals in the last moments of the standalone server's exit, handled in the signal handler
itself (`server.app.late_signal`): what runs there must not wait for a lock its own thread holds.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: A process that has shut its server down, then takes two late signals while its main thread
#: holds the manager's lock (as `_report_exit` or a session's end does, between two bytecodes).
HELD_LOCK_SCRIPT = textwrap.dedent(
    """
    import signal, anyio
    from server.app import _Exit, build_app, late_signal
    from server.config import Settings

    async def main():
        app = build_app(Settings())
        _Exit(app)
        await app.sessions.manager.shutdown(0)
        with app.sessions.manager._lock:
            late_signal(signal.SIGTERM, None)
            late_signal(signal.SIGINT, None)
        print("not forced")

    anyio.run(main)
    """
)


def test_a_second_late_signal_forces_the_exit_while_the_main_thread_holds_the_manager_s_lock() -> None:
    # The second signal counted the calls it cut off through `manager.metrics()`, which takes the
    # manager's lock: held by the thread the handler interrupted, the exit waited for ever.
    result = subprocess.run(
        [sys.executable, "-c", HELD_LOCK_SCRIPT], capture_output=True, text=True, timeout=30, check=False
    )

    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "SIGINT after SIGTERM: forcing exit; the server had stopped serving" in result.stderr, result.stderr
    assert "not forced" not in result.stdout


#: `main` called in-process, serving stdio until EOF (stdin is the null device), then reporting
#: the SIGINT handler the process has once it returned (on stderr: on stdio, fd 1 points there
#: for the process's life).
IN_PROCESS_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from server.cli import main

    status = main(["--config", sys.argv[1]])
    print("handlers:", status, signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
    """
)


def test_main_called_in_process_gives_the_signal_handlers_back_when_it_returns(tmp_path: Path) -> None:
    # It left `late_signal` in place: a Ctrl-C to the host raised no KeyboardInterrupt, and a
    # second one forced the host's exit (status 1).
    config = tmp_path / "server.toml"
    config.write_text("", encoding="utf-8")

    result = subprocess.run(
        [sys.executable, "-c", IN_PROCESS_SCRIPT, str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "handlers: 0 True" in result.stderr.splitlines(), result.stderr


#: As `HELD_LOCK_SCRIPT`, with stderr failing as a write to it fails inside another (the signal
#: came in the middle of one): "RuntimeError: reentrant call inside <_io.BufferedWriter>".
FAILING_STDERR_SCRIPT = textwrap.dedent(
    """
    import logging, signal, sys, anyio
    from server.app import _Exit, build_app, late_signal
    from server.config import Settings

    class Reentered:
        def write(self, text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")
        def flush(self):
            pass

    async def main():
        app = build_app(Settings())
        _Exit(app)
        await app.sessions.manager.shutdown(0)
        logging.getLogger().handlers = [logging.StreamHandler(Reentered())]
        real, sys.stderr = sys.stderr, Reentered()
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                late_signal(signum, None)
            except BaseException as exc:
                print("raised", type(exc).__name__, flush=True)
        print("not forced", flush=True)

    anyio.run(main)
    """
)


def test_a_late_signal_whose_log_line_fails_raises_nothing_and_a_second_still_forces_the_exit() -> None:
    # The handler's log line, failing, raised into the code it interrupted (an atexit handler's
    # write), and the second signal's failed before it could force the exit (status 0).
    result = subprocess.run(
        [sys.executable, "-c", FAILING_STDERR_SCRIPT], capture_output=True, text=True, timeout=30, check=False
    )

    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "raised" not in result.stdout and "not forced" not in result.stdout, result.stdout
