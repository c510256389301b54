"""The README's Quick start against a real first run of `make run`'s command: the lines it logs."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading

from tests.e2e_cli.test_cli import ROOT, SCRIPT, clean_env

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
README_PORT = "8765"


def readme_first_run() -> tuple[str, list[str]]:
    """The command the README says `make run` runs, and the log lines it says a first run prints."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [command] = re.findall(r"^- `make run` runs `([^`]+)`", readme, re.MULTILINE)
    assert "A first run logs" in readme, "the README's Quick start does not show what a first run logs"
    block = readme.split("A first run logs", 1)[1].split("```\n", 2)[1]
    return command, [line.strip() for line in block.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_readme_shows_what_a_first_make_run_logs_before_it_serves() -> None:
    command, expected = readme_first_run()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert f"$(BIN)/{command}\n" in makefile, "the README's `make run` command is not the Makefile's"

    port = str(free_port())  # the README's 8765 may be taken where the tests run
    arguments = command.split()[1:]
    # A first run: none of the developer's MCP_SESSIONS_* (the admin token's variable included).
    with subprocess.Popen(
        [str(SCRIPT), *arguments, "--port", port],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        watchdog = threading.Timer(20, process.kill)  # bounds the reads below if it never serves
        watchdog.start()
        try:
            seen = []
            for line in process.stderr:
                seen.append(TIMESTAMP.sub("", line.rstrip("\n")))
                if "Serving MCP" in line:
                    break
            process.send_signal(signal.SIGINT)  # Ctrl-C
            _, rest = process.communicate(timeout=20)
        finally:
            watchdog.cancel()
            process.kill()

    assert seen == [line.replace(f":{README_PORT}/", f":{port}/") for line in expected], "\n".join(seen)
    assert process.returncode == 0, rest
