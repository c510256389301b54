"""The command line as real processes: `python -m server` and the `mcp-session-manager` script.

Exit status 0 with the effective settings as JSON on stdout for `--check-config`; status 2 with
the problems on stderr, and nothing on stdout and nothing served, for a bad configuration.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server import load_settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "mcp-session-manager"
HEADER = "mcp-session-manager: invalid configuration:"
FIXTURES = "tests.fixtures_config"
#: A tool module that writes to stdout (print and fd 1) at import and in `setup`; not imported
#: here, where its output would go to the test's own stdout.
NOISY_MODULE = f"{FIXTURES}.noisy_at_import"
NOISY_IMPORT_PRINT = "noisy_at_import: print while importing"
NOISY_IMPORT_FD = "noisy_at_import: fd 1 while importing"
NOISY_SETUP_PRINT = "noisy_at_import: print in setup"


def run(
    *args: str, script: bool = False, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the CLI from the project root with a clean MCP_SESSIONS_* environment plus `env`."""
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "server"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=clean_env(env), input=stdin, capture_output=True, text=True, timeout=30
    )


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without MCP_SESSIONS_* overrides (they would change the config), plus `env`."""
    environ = {name: value for name, value in os.environ.items() if not name.upper().startswith("MCP_SESSIONS_")}
    environ.update(env or {})
    return environ


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a refused configuration (after the header, one per line, indented)."""
    lines = result.stderr.splitlines()
    assert HEADER in lines, result.stderr
    rest = lines[lines.index(HEADER) + 1 :]
    assert all(line.startswith("  ") for line in rest), result.stderr
    return [line.strip() for line in rest]


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == "", "nothing may reach stdout (it is the protocol channel on stdio)"
    assert "Serving" not in result.stderr and "Graceful shutdown" not in result.stderr, "nothing may start"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def modules_config(tmp_path: Path, *modules: str) -> Path:
    return write(tmp_path, f"[server]\ntool_modules = {json.dumps(list(modules))}\n")


def test_the_console_script_is_installed_next_to_the_interpreter() -> None:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: reinstall with `pip install -e .`"


@pytest.mark.parametrize("script", [False, True], ids=["python-m-server", "console-script"])
def test_version_prints_the_installed_packages_version_and_starts_nothing(script: bool) -> None:
    result = run("--version", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mcp-session-manager {importlib.metadata.version('mcp-session-manager')}\n"
    assert result.stderr == ""


# -- --check-config on valid configurations ----------------------------------------------


@pytest.mark.parametrize("script", [False, True], ids=["python-m-server", "console-script"])
def test_check_config_prints_the_effective_settings_as_json(script: bool) -> None:
    result = run("--config", "config/demo.toml", "--check-config", script=script)

    assert result.returncode == 0, result.stderr
    effective: dict[str, Any] = json.loads(result.stdout)
    assert effective == load_settings(ROOT / "config" / "demo.toml").model_dump(mode="json")
    assert effective["server"]["tool_modules"] == ["tools.demo"]
    assert effective["tools"]["sleep_async"]["timeout_seconds"] == 3.0
    assert effective["tools"]["count_slowly"]["idle_timeout_seconds"] == 2.0
    assert "configuration is valid" in result.stderr


def test_check_config_without_a_file_prints_the_builtin_defaults() -> None:
    result = run("--check-config")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load_settings(ROOT / "config" / "default.toml").model_dump(mode="json")


def test_check_config_that_cannot_write_its_output_says_so_in_one_line_and_exits_1() -> None:
    with open("/dev/full", "w") as full:  # (Linux) every write fails: no space left on device
        result = subprocess.run(
            [sys.executable, "-m", "server", "--check-config"],
            cwd=ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )

    assert result.returncode == 1
    assert "cannot write the settings to stdout: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("script", [False, True], ids=["python-m-server", "console-script"])
def test_flags_are_reflected_in_the_output_and_beat_the_environment(script: bool) -> None:
    env = {
        "MCP_SESSIONS_SERVER__PORT": "9100",
        "MCP_SESSIONS_SERVER__HOST": "10.1.1.1",
        "MCP_SESSIONS_SERVER__ALLOWED_HOSTS": '["tools.example.com:*"]',  # required off loopback over HTTP
    }

    result = run(
        "--config",
        "config/default.toml",
        "--transport",
        "streamable-http",
        "--host",
        "0.0.0.0",
        "--port",
        "9200",
        "--check-config",
        script=script,
        env=env,
    )

    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["server"]
    assert (server["transport"], server["host"], server["port"]) == ("streamable-http", "0.0.0.0", 9200)


def test_the_environment_beats_the_file_when_no_flag_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n[limits]\nmax_concurrent_sessions = 5\n")

    result = run("--config", str(path), "--check-config", env={"MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS": "6"})

    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["limits"]["max_concurrent_sessions"] == 6
    assert effective["server"]["port"] == 9000


def test_check_config_notes_settings_that_cannot_take_effect_and_still_passes(tmp_path: Path) -> None:
    # Valid, so not refused; but an idle timeout longer than the call's deadline never fires,
    # and a per-tool cap above the server's never binds: the author should hear of it.
    path = write(
        tmp_path,
        '[server]\ntool_modules = ["tools.demo"]\n[limits]\nmax_concurrent_sessions = 5\n'
        "[tools.echo]\ntimeout_seconds = 2\nidle_timeout_seconds = 100\nmax_concurrent = 500\n",
    )

    result = run("--config", str(path), "--check-config")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tools"]["echo"]["idle_timeout_seconds"] == 100
    notes = [line for line in result.stderr.splitlines() if line.startswith("mcp-session-manager: note: ")]
    assert notes == [
        "mcp-session-manager: note: tools.echo.max_concurrent (500) is above limits.max_concurrent_sessions (5): "
        "the server-wide cap is reached first",
        "mcp-session-manager: note: tools.echo.idle_timeout_seconds (100) is not below the call's deadline "
        "(2, tools.echo.timeout_seconds): a call reaches its deadline first, so the idle timeout never fires",
    ], result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_an_unset_admin_token_variable_over_http_is_noted_without_its_value(tmp_path: Path, check: bool) -> None:
    # The first sign used to be a refused server_shutdown. The token variable is empty here; the
    # check names it on stderr, the start warns of it, and both go on.
    with socket.socket() as taken:  # the start warns, then cannot listen on this port: it exits 1, bounded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(
            tmp_path,
            f'[server]\ntransport = "streamable-http"\nport = {port}\n[shutdown]\nadmin_token_env = "MY_ADMIN_TOKEN"\n',
        )
        env = {"MY_ADMIN_TOKEN": ""}
        result = run("--config", str(path), *(["--check-config"] if check else []), env=env)
    sentence = (
        "shutdown.admin_token_env names the environment variable MY_ADMIN_TOKEN, which is empty in the server's"
        " environment: server_shutdown over streamable HTTP is refused (unauthorized) until the server is restarted"
        " with MY_ADMIN_TOKEN set to a non-empty token (SIGINT or SIGTERM still stop it)"
    )

    if check:
        assert result.returncode == 0, result.stderr
        assert f"mcp-session-manager: note: {sentence}" in result.stderr.splitlines(), result.stderr
        with_token = run("--config", str(path), "--check-config", env={"MY_ADMIN_TOKEN": "s3cret"})
        assert "note:" not in with_token.stderr and "s3cret" not in with_token.stderr, with_token.stderr
    else:
        assert result.returncode == 1, result.stderr
        lines = result.stderr.splitlines()
        assert any(line.endswith(f"WARNING server.cli: Config: {sentence}") for line in lines), result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_tool_module_with_empty_tools_and_no_setup_is_noted_not_refused(tmp_path: Path, check: bool) -> None:
    # It hosts nothing: almost certainly a list left empty by mistake. A module whose setup(server)
    # may register tools is not noted. The start (stdio, stdin at once at end) warns, then stops.
    path = modules_config(tmp_path, f"{FIXTURES}.empty_tools", f"{FIXTURES}.setup_only")

    result = run("--config", str(path), *(["--check-config"] if check else []))

    sentence = (
        f"server.tool_modules: '{FIXTURES}.empty_tools': its TOOLS is empty and it has no setup(server), so it"
        " hosts nothing; list its tools in TOOLS (TOOLS = [my_tool, ...]), or remove it from server.tool_modules"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    if check:
        assert json.loads(result.stdout)["server"]["tool_modules"] == [
            f"{FIXTURES}.empty_tools",
            f"{FIXTURES}.setup_only",
        ]
        assert [line for line in lines if "note:" in line] == [f"mcp-session-manager: note: {sentence}"], result.stderr
    else:
        warnings = [line for line in lines if "WARNING server.cli: Config:" in line]
        assert len(warnings) == 1 and warnings[0].endswith(f"WARNING server.cli: Config: {sentence}"), result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_bad_file_values_a_flag_or_a_variable_overrides_are_noted_not_passed_over(tmp_path: Path, check: bool) -> None:
    # Valid as overridden, so the start goes on; but the file alone would fail once the override
    # is gone (a check in CI run with the deployment's variables set would pass it). The start
    # (stdio, stdin at once at end) warns, then stops.
    path = write(tmp_path, '[server]\nport = 0\n[limits]\nmax_queued = -5\nmax_concurrent_sessions = "7"\n')
    env = {"MCP_SESSIONS_LIMITS__MAX_QUEUED": "1", "MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS": "3"}

    result = run("--config", str(path), "--port", "9002", *(["--check-config"] if check else []), env=env)

    assert result.returncode == 0, result.stderr
    expected = [
        f"{path}: server.port: must be between 1 and 65535 (got 0); not in effect while command line option --port"
        " sets it",
        f'{path}: limits.max_concurrent_sessions: must be a whole number (got "7"); not in effect while environment'
        " variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS sets it",
        f"{path}: limits.max_queued: must be between 0 and 1000000 (got -5); not in effect while environment"
        " variable MCP_SESSIONS_LIMITS__MAX_QUEUED sets it",
    ]
    prefix = "mcp-session-manager: note: " if check else "WARNING server.cli: Config: "
    noted = [line.split(prefix, 1)[1] for line in result.stderr.splitlines() if prefix in line]
    assert noted == expected, result.stderr
    if check:
        assert json.loads(result.stdout)["limits"]["max_queued"] == 1
        alone = run("--config", str(path), "--check-config")  # the override gone: the file fails
        assert alone.returncode == 2 and len(problems(alone)) == 3, alone.stderr


def test_check_config_imports_a_good_tool_module() -> None:
    result = run("--check-config", env={"MCP_SESSIONS_SERVER__TOOL_MODULES": f'["{FIXTURES}.good_tools"]'})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["tool_modules"] == [f"{FIXTURES}.good_tools"]


def run_with_closed(fd: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m server ARGS` started with file descriptor `fd` (0 or 1) closed, as a shell's
    `<&-` / `>&-` does; stderr is captured, and stdout too when it is open."""
    environ = {name: value for name, value in os.environ.items() if not name.upper().startswith("MCP_SESSIONS_")}
    redirect = "<&-" if fd == 0 else ">&-"
    command = " ".join([shlex.quote(sys.executable), "-m", "server", *map(shlex.quote, args), redirect])
    return subprocess.run(
        ["/bin/sh", "-c", f"exec {command}"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )


def test_check_config_and_stdio_started_with_stdin_closed_see_end_of_file() -> None:
    checked = run_with_closed(0, "--check-config")
    served = run_with_closed(0, "--transport", "stdio")

    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["server"]["transport"] == "stdio"
    # No client at all: the stdio server stops at once, as on stdin EOF.
    assert served.returncode == 0, served.stderr
    assert "Graceful shutdown: stdin closed" in served.stderr and "Traceback" not in served.stderr


def test_check_config_started_with_stdout_closed_says_so_and_exits_1(tmp_path: Path) -> None:
    # Python starts with sys.stdout None when fd 1 is closed; the settings would go nowhere.
    result = run_with_closed(1, "--check-config")
    bad = run_with_closed(
        1, "--config", str(write(tmp_path, "[limits]\nmax_concurrent_sessions = 0\n")), "--check-config"
    )

    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "mcp-session-manager: cannot write the settings to stdout: stdout is closed"
    ], result.stderr
    # The configuration is still checked first: its problems are the answer, as with stdout open.
    assert bad.returncode == 2, bad.stderr
    assert "limits.max_concurrent_sessions: must be between 1 and" in bad.stderr and "Traceback" not in bad.stderr


def test_check_config_with_a_tool_module_that_reads_stdin_does_not_wait_for_stdin() -> None:
    # stdin stays open and empty, as a terminal or an idle pipe: a module reading it at import
    # would wait forever, unless the check has claimed fd 0 first (the module reads end of file).
    environ = {name: value for name, value in os.environ.items() if not name.upper().startswith("MCP_SESSIONS_")}
    environ["MCP_SESSIONS_SERVER__TOOL_MODULES"] = f'["{FIXTURES}.reads_stdin_at_import"]'
    with subprocess.Popen(
        [sys.executable, "-m", "server", "--check-config"],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            pytest.fail("--check-config waited on stdin while importing a tool module that reads it")
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout.read(), process.stderr.read()

    assert returncode == 0, stderr
    assert json.loads(stdout)["server"]["tool_modules"] == [f"{FIXTURES}.reads_stdin_at_import"]


@pytest.mark.parametrize("script", [False, True], ids=["python-m-server", "console-script"])
def test_check_config_stdout_is_the_settings_json_alone_when_a_tool_module_prints(script: bool) -> None:
    env = {"MCP_SESSIONS_SERVER__TOOL_MODULES": f'["{NOISY_MODULE}"]'}

    result = run("--check-config", script=script, env=env)

    assert result.returncode == 0, result.stderr
    expected = load_settings(overrides={"server": {"tool_modules": [NOISY_MODULE]}}).model_dump(mode="json")
    assert result.stdout == json.dumps(expected, indent=2) + "\n"
    # What the module wrote while imported and set up (a check runs the setup hooks) went to stderr.
    assert NOISY_IMPORT_PRINT in result.stderr and NOISY_IMPORT_FD in result.stderr
    assert NOISY_SETUP_PRINT in result.stderr


def test_stdio_started_with_stderr_closed_keeps_a_tool_modules_prints_off_the_protocol_stream() -> None:
    # With no fd 2 (`2>&-`) there is no stderr to point fd 1 at: it points at the null device,
    # and what the module prints at import and in its setup hook is lost, not sent to the client.
    environ = clean_env({"MCP_SESSIONS_SERVER__TOOL_MODULES": f'["{NOISY_MODULE}"]'})
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "cli", "version": "0"}}
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whisper", "arguments": {"text": "HI"}}},
    ]
    command = shlex.join([sys.executable, "-m", "server", "--transport", "stdio"])
    result = subprocess.run(
        ["/bin/sh", "-c", f"exec {command} 2>&-"],
        cwd=ROOT,
        env=environ,
        input="".join(json.dumps(message) + "\n" for message in messages),
        stdout=subprocess.PIPE,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0
    answers = [json.loads(line) for line in result.stdout.splitlines()]  # every line is a message
    assert [answer["id"] for answer in answers] == [1, 2], result.stdout
    assert answers[1]["result"]["content"][0]["text"] == "hi"


@pytest.mark.parametrize("check", [False, True], ids=["start", "check-config"])
def test_a_config_error_with_stderr_closed_still_exits_2(tmp_path: Path, check: bool) -> None:
    # There is nowhere to say what is wrong (Python's sys.stderr is None), but the status still says it.
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nmax_concurrent_sessions = 0\n", encoding="utf-8")
    command = shlex.join(
        [sys.executable, "-m", "server", "--config", str(config), *(["--check-config"] if check else [])]
    )
    result = subprocess.run(
        ["/bin/sh", "-c", f"exec {command} 2>&-"],
        cwd=ROOT,
        env=clean_env({}),
        stdin=subprocess.DEVNULL,
        capture_output=False,
        stdout=subprocess.PIPE,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""


@pytest.mark.parametrize("check", [False, True], ids=["stdio", "check-config"])
def test_the_logging_table_applies_to_what_tool_modules_log_while_imported_and_set_up(
    tmp_path: Path, check: bool
) -> None:
    path = write(
        tmp_path,
        f'[server]\ntool_modules = ["{FIXTURES}.logs_at_import"]\n[logging]\nlevel = "warning"\nformat = "json"\n',
    )

    # stdio: stdin at end of file, the server stops at once after the start.
    result = run("--config", str(path), "--transport", "stdio", *(["--check-config"] if check else []))

    assert result.returncode == 0, result.stderr
    assert "info while importing" not in result.stderr, result.stderr  # below the level
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(r["level"], r["logger"], r["message"]) for r in logged][:2] == [
        ("warning", "logs_at_import", "logs_at_import: warning while importing\nsecond line"),
        ("warning", "logs_at_import", "logs_at_import: warning in setup"),
    ], result.stderr
    assert "second line" not in {line.strip() for line in result.stderr.splitlines()}, result.stderr
    # The module's own basicConfig does not outlive the start: every record after it is JSON too,
    # at the configured level (the CLI's own lines aside).
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("mcp-session-manager: ")]
    assert {json.loads(line)["level"] for line in lines} <= {"warning", "error"}, result.stderr


@pytest.mark.parametrize("check", [False, True], ids=["stdio", "check-config"])
def test_a_tool_module_setting_logging_up_at_import_does_not_change_how_what_follows_logs(
    tmp_path: Path, check: bool
) -> None:
    # The first module's basicConfig(force=True) at import: the second module's import, the SDK's
    # server being built ("Initializing server", DEBUG) and each setup hook still log as [logging] says.
    modules = [f"{FIXTURES}.configures_logging_at_import", f"{FIXTURES}.logs_at_import"]
    path = write(
        tmp_path, f'[server]\ntool_modules = {json.dumps(modules)}\n[logging]\nlevel = "warning"\nformat = "json"\n'
    )

    result = run("--config", str(path), "--transport", "stdio", *(["--check-config"] if check else []))

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("mcp-session-manager: ")]
    assert all(line.startswith("{") for line in lines), result.stderr  # none plain, as basicConfig writes
    logged = [json.loads(line) for line in lines]
    assert [(r["level"], r["message"]) for r in logged][:3] == [
        ("warning", "logs_at_import: warning while importing\nsecond line"),
        ("warning", "configures_logging_at_import: warning in setup"),
        ("warning", "logs_at_import: warning in setup"),
    ], result.stderr
    assert {r["level"] for r in logged} <= {"warning", "error"}, result.stderr
    assert "Initializing server" not in result.stderr, result.stderr


def test_python_warnings_are_log_records_in_the_logging_format() -> None:
    # A tool module's warnings, at import and in a call, and a coroutine never awaited: each one
    # JSON object on stderr, not Python's two raw lines.
    environ = clean_env(
        {"MCP_SESSIONS_SERVER__TOOL_MODULES": f'["{FIXTURES}.warns_at_import"]', "MCP_SESSIONS_LOGGING__FORMAT": "json"}
    )
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "cli", "version": "0"}}
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "caution", "arguments": {"text": "x"}}},
    ]
    result = subprocess.run(
        [sys.executable, "-m", "server", "--transport", "stdio"],
        cwd=ROOT,
        env=environ,
        input="".join(json.dumps(message) + "\n" for message in messages),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [1, 2], result.stdout
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is a record
    warned = [r["message"] for r in records if r["logger"] == "py.warnings"]
    assert len(warned) == 3, result.stderr
    assert "UserWarning: warns_at_import: warning while importing" in warned[0]
    assert "UserWarning: warns_at_import: warning in a call" in warned[1]
    assert "RuntimeWarning: coroutine 'sleep' was never awaited" in warned[2]
    assert not any(message.endswith("\n") for message in warned), warned  # formatwarning's own end


# -- refused configurations: status 2, the problem on stderr, nothing started -------------

BAD_FILES = [
    pytest.param(
        "[limits]\nmax_concurent_sessions = 5\n",
        "limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?",
        id="unknown-nested-key",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = -1.0\n",
        "limits.default_timeout_seconds: must be greater than 0.0 (got -1.0)",
        id="negative-timeout",
    ),
    pytest.param(
        '[server]\ntransport = "http"\n',
        "server.transport: must be 'stdio' or 'streamable-http' (got \"http\")",
        id="unknown-transport",
    ),
    pytest.param(
        "[tools.echo]\ntimeout_seconds = 301.0\n",
        "tools.echo.timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0"
        " (built-in default); lower it or raise the cap (got 301.0)",
        id="tool-timeout-above-cap",
    ),
    pytest.param(
        "[limits\n",
        "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)",
        id="bad-toml",
    ),
    pytest.param(
        '[store]\nurl = "redis://tools:hunter2@127.0.0.1:6379/0"\nurl = "redis://tools:hunter3@127.0.0.1:6379/0"\n',
        "invalid TOML: Cannot overwrite a value (at line 3, column 47): store.url is set twice; keep one",
        id="key-set-twice",
    ),
    pytest.param(
        '[store]\nbackend = "redis"\nurl = "redis://tools:hunter2@127.0.0.1:99999/0"\n',
        "store.url: the port must be a number from 1 to 65535 (a password holding / ? # or @ must be"
        ' percent-encoded, e.g. / as %2F), e.g. redis://127.0.0.1:6379/0 (got "redis://tools:***@127.0.0.1:99999/0")',
        id="store-url-port-out-of-range",
    ),
    pytest.param(
        '[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:6379/0?socket_timeout=abc"\n',
        "store.url: is not a URL redis-py accepts: Invalid value for 'socket_timeout' in connection URL."
        ' (got "redis://127.0.0.1:6379/0?socket_timeout=abc")',
        id="store-url-query-value",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_bad_file_exits_2_with_the_problem_on_stderr(tmp_path: Path, text: str, expected: str, check: bool) -> None:
    path = write(tmp_path, text)

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    assert problems(result) == [f"{path}: {expected}"]


@pytest.mark.parametrize("script", [False, True], ids=["python-m-server", "console-script"])
def test_a_missing_config_file_exits_2(tmp_path: Path, script: bool) -> None:
    missing = tmp_path / "missing.toml"

    result = run("--config", str(missing), script=script)

    assert_refused(result)
    assert problems(result) == [
        f"{missing}: config file not found (check the path given with --config, or to load_settings)"
    ]


def test_a_directory_given_as_config_exits_2(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path), "--check-config")

    assert_refused(result)
    assert problems(result) == [f"{tmp_path}: is a directory, not a config file (give the path of a .toml file)"]


def _fifo(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return path, "is a named pipe (FIFO), not a regular file"


def _under_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "plain").write_text("", encoding="utf-8")
    return tmp_path / "plain" / "config.toml", "cannot read the config file: Not a directory;"


def _symlink_loop(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "loop.toml"
    path.symlink_to(path)
    return path, "cannot read the config file: Too many levels of symbolic links;"


@pytest.mark.parametrize("make", [_fifo, _under_a_file, _symlink_loop], ids=["fifo", "not-a-directory", "loop"])
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_config_path_that_cannot_be_read_as_a_file_exits_2_at_once(
    tmp_path: Path, make: Callable[[Path], tuple[Path, str]], check: bool
) -> None:
    # A FIFO is refused without being opened for reading (which waits for a writer): `run` is
    # bounded, so the old behaviour fails here rather than hangs. The others were tracebacks, exit 1.
    path, reason = make(tmp_path)

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: {reason}"), problem
    assert "Traceback" not in result.stderr


def test_a_file_with_several_problems_reports_each_on_its_own_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\ntransport = "tcp"\nport = 70000\n'
        "[limits]\nmax_concurrent_sessions = 0\ndefault_timeout_seconds = nan\n"
        "[shutdown]\ntimeot_seconds = 5\n",
    )

    result = run("--config", str(path), "--check-config")

    assert_refused(result)
    assert problems(result) == [
        f"{path}: server.transport: must be 'stdio' or 'streamable-http' (got \"tcp\")",
        f"{path}: server.port: must be between 1 and 65535 (got 70000)",
        f"{path}: limits.default_timeout_seconds: must be a finite number (nan and inf are not allowed) (got nan)",
        f"{path}: limits.max_concurrent_sessions: must be between 1 and 1000000 (got 0)",
        f"{path}: shutdown.timeot_seconds: unknown key; did you mean 'timeout_seconds'?",
    ]


def test_a_bad_flag_value_exits_2_naming_the_option() -> None:
    result = run("--port", "0", "--check-config")

    assert_refused(result)
    assert problems(result) == ["command line option --port: server.port: must be between 1 and 65535 (got 0)"]


def test_a_non_numeric_port_flag_exits_2_from_the_argument_parser() -> None:
    result = run("--port", "eighty", "--check-config")

    assert result.returncode == 2
    assert result.stdout == ""
    assert "argument --port: invalid int value: 'eighty'" in result.stderr


def test_a_bad_environment_variable_exits_2_naming_it() -> None:
    result = run("--check-config", env={"MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS": "many"})

    assert_refused(result)
    assert problems(result) == [
        "environment variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS: limits.max_concurrent_sessions:"
        ' must be a whole number (got "many")'
    ]


# -- bad tool modules: status 2 naming the module ---------------------------------------

EXIT_HINT = (
    "a tool module must not exit the process (argparse's parse_args() does, on arguments it does not know:"
    ' run it under if __name__ == "__main__":)'
)

BAD_MODULES = [
    pytest.param(
        [f"{FIXTURES}.raises_at_import"],
        f"'{FIXTURES}.raises_at_import': cannot import it: RuntimeError: fixture module failing at import on purpose",
        id="raises-at-import",
    ),
    pytest.param(
        [f"{FIXTURES}.raises_base_exception_at_import"],
        f"'{FIXTURES}.raises_base_exception_at_import': cannot import it:"
        " FixtureAbort: fixture module aborting its import on purpose",
        id="base-exception-at-import",
    ),
    pytest.param(
        [f"{FIXTURES}.not_there"],
        f"'{FIXTURES}.not_there': cannot import it: ModuleNotFoundError: No module named '{FIXTURES}.not_there';"
        f" looked for in the working directory ({ROOT}), PYTHONPATH",
        id="not-importable",
    ),
    pytest.param(
        [f"{FIXTURES}.no_tools"],
        f"'{FIXTURES}.no_tools': the module has no TOOLS list (TOOLS = [my_tool, ...])",
        id="no-TOOLS",
    ),
    pytest.param(
        [f"{FIXTURES}.tools_not_callables"],
        f"'{FIXTURES}.tools_not_callables': TOOLS must be a list of functions, got ['echo', 42]",
        id="TOOLS-not-callables",
    ),
    pytest.param(
        [f"{FIXTURES}.setup_not_callable"],
        f"'{FIXTURES}.setup_not_callable': setup must be a function setup(server), got 'register my resources'",
        id="setup-not-callable",
    ),
    pytest.param(
        [f"{FIXTURES}.setup_is_async"],
        f"'{FIXTURES}.setup_is_async': setup must be a plain function (def setup(server)); an async def setup is"
        " never awaited, so nothing in it runs: register what you host in a def setup, and start async work from"
        " a tool",
        id="setup-async-def",
    ),
    pytest.param(
        [f"{FIXTURES}.setup_is_async_callable"],
        f"'{FIXTURES}.setup_is_async_callable': setup must be a plain function (def setup(server)); a setup"
        " returning coroutine is never awaited, so nothing in it runs",
        id="setup-returns-a-coroutine",
    ),
    pytest.param(
        ["tools.demo", f"{FIXTURES}.duplicate_echo"],
        f"'{FIXTURES}.duplicate_echo': tool 'echo' is already provided by module 'tools.demo'",
        id="duplicate-demo-tool",
    ),
    pytest.param(
        [f"{FIXTURES}.duplicate_session_tool"],
        f"'{FIXTURES}.duplicate_session_tool': tool 'session_create' is already provided by the session extension",
        id="duplicate-management-tool",
    ),
    pytest.param(
        [f"{FIXTURES}.setup_raises"],
        f"'{FIXTURES}.setup_raises': setup(server) failed: KeyError: 'API_KEY'",
        id="setup-raises",
    ),
    pytest.param(
        [f"{FIXTURES}.setup_raises_base_exception"],
        f"'{FIXTURES}.setup_raises_base_exception': setup(server) failed: FixtureAbort: no licence server",
        id="base-exception-in-setup",
    ),
    pytest.param(
        [f"{FIXTURES}.exits_at_import"],
        f"'{FIXTURES}.exits_at_import': called sys.exit(3) while being imported; {EXIT_HINT}",
        id="sys-exit-at-import",
    ),
    pytest.param(
        [f"{FIXTURES}.parses_argv_at_import"],
        f"'{FIXTURES}.parses_argv_at_import': called sys.exit(2) while being imported; {EXIT_HINT}",
        id="argparse-at-import",
    ),
    pytest.param(
        [f"{FIXTURES}.exits_in_setup"],
        f"'{FIXTURES}.exits_in_setup': setup(server) called sys.exit('no database'); {EXIT_HINT}",
        id="sys-exit-in-setup",
    ),
]


@pytest.mark.parametrize(("modules", "expected"), BAD_MODULES)
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_bad_tool_module_exits_2_naming_the_module(
    tmp_path: Path, modules: list[str], expected: str, check: bool
) -> None:
    path = modules_config(tmp_path, *modules)

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: server.tool_modules: {expected}"), problem
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_tools_the_sdk_refuses_to_register_exit_2_naming_each(tmp_path: Path, check: bool) -> None:
    # A lambda and a functools.partial: `add_tool` refuses both. The check registers the tools as
    # the start does, so it no longer says "valid" for a config the start dies on.
    path = modules_config(tmp_path, f"{FIXTURES}.good_tools", f"{FIXTURES}.nameless_tools")

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    key = f"{path}: server.tool_modules: '{FIXTURES}.nameless_tools': tool"
    lambda_problem, partial_problem = problems(result)
    assert lambda_problem.startswith(f"{key} '<lambda>' cannot be registered: ValueError:"), lambda_problem
    assert partial_problem.startswith(f"{key} functools.partial("), partial_problem
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_module_name_that_is_a_file_path_is_refused_without_importing_it(tmp_path: Path, check: bool) -> None:
    path = write(tmp_path, f'[server]\nport = 0\ntool_modules = ["{NOISY_MODULE}.py"]\n')

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    # Reported with the other settings problems, before anything is imported.
    assert problems(result) == [
        f"{path}: server.port: must be between 1 and 65535 (got 0)",
        f"{path}: server.tool_modules.0: is a file path, not a module name; write the module's dotted name,"
        f' e.g. "{NOISY_MODULE}"; modules are found from the working directory and PYTHONPATH'
        f' (got "{NOISY_MODULE}.py")',
    ]
    assert NOISY_IMPORT_PRINT not in result.stderr


def test_every_bad_tool_module_is_reported_at_once(tmp_path: Path) -> None:
    path = modules_config(tmp_path, f"{FIXTURES}.no_tools", f"{FIXTURES}.raises_at_import")

    result = run("--config", str(path), "--check-config")

    assert_refused(result)
    reported = problems(result)
    assert len(reported) == 2, reported
    assert f"'{FIXTURES}.no_tools'" in reported[0]
    assert f"'{FIXTURES}.raises_at_import'" in reported[1]


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_problems_of_importing_registering_setting_up_and_tables_are_reported_together(
    tmp_path: Path, check: bool
) -> None:
    # One module that does not import, one with a tool the SDK refuses, one whose hook raises, a
    # table naming no tool and one for a session tool: one run reports them all (it took three).
    modules = [
        f"{FIXTURES}.no_tools",
        f"{FIXTURES}.nameless_tools",
        f"{FIXTURES}.good_tools",
        f"{FIXTURES}.setup_raises",
    ]
    path = write(
        tmp_path,
        f"[server]\ntool_modules = {json.dumps(modules)}\n[tools.shuot]\ntimeout_seconds = 1.0\n"
        "[tools.session_create]\ntimeout_seconds = 1.0\n",
    )

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    reported = problems(result)
    key = f"{path}: server.tool_modules:"
    assert len(reported) == 6, reported
    assert reported[0] == f"{key} '{FIXTURES}.no_tools': the module has no TOOLS list (TOOLS = [my_tool, ...])"
    assert reported[1].startswith(f"{key} '{FIXTURES}.nameless_tools': tool '<lambda>' cannot be registered"), reported
    assert reported[2].startswith(f"{key} '{FIXTURES}.nameless_tools': tool functools.partial("), reported
    assert reported[3] == f"{key} '{FIXTURES}.setup_raises': setup(server) failed: KeyError: 'API_KEY'"
    assert reported[4] == (
        f"{path}: tools.shuot: no hosted tool has this name (hosted: fine, shout); did you mean 'shout'?; the tools"
        f" of '{FIXTURES}.no_tools' (refused) and '{FIXTURES}.setup_raises' (its setup(server) did not finish) are"
        " not known: it may name one of theirs"
    ), reported
    assert reported[5].startswith(f"{path}: tools.session_create: per-tool settings do not apply"), reported


def test_a_tools_table_naming_no_hosted_tool_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[server]\ntool_modules = ["tools.demo"]\n\n[tools.sleep_asycn]\ntimeout_seconds = 2.0\n')
    done = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(config), "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert problems(done) == [
        f"{config}: tools.sleep_asycn: no hosted tool has this name (hosted: count_slowly, echo, fail, sleep_async,"
        " sleep_blocking); did you mean 'sleep_async'?"
    ]
    assert done.stdout == ""


@pytest.mark.parametrize("tool", ["session_create", "session_release", "session_metrics", "server_shutdown"])
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_tools_table_for_a_session_tool_is_refused(tmp_path: Path, tool: str, check: bool) -> None:
    # Per-tool settings have no effect on the session tools: such a table would be silently ignored.
    path = write(tmp_path, f"[tools.{tool}]\ntimeout_seconds = 5.0\n")

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: tools.{tool}: per-tool settings do not apply to the session tools"), problem
    assert problem.endswith("; remove it"), problem


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_setup_hook_registering_a_taken_tool_name_exits_2_naming_the_module_and_the_clash(
    tmp_path: Path, check: bool
) -> None:
    path = modules_config(tmp_path, f"{FIXTURES}.good_tools", f"{FIXTURES}.setup_clashes")

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    key = f"{path}: server.tool_modules: '{FIXTURES}.setup_clashes': setup(server) registers tool"
    assert problems(result) == [
        f"{key} 'session_metrics', a name already taken by the session extension; give one of them another name",
        f"{key} 'shout', a name already taken by module '{FIXTURES}.good_tools' (in its TOOLS); give one of them"
        " another name",
    ]
    assert "Tool already exists" not in result.stderr


def test_a_tools_table_for_a_tool_a_setup_hook_registers_is_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[server]\ntool_modules = ["{FIXTURES}.setup_registers_tool"]\n[tools.lookup_later]\ntimeout_seconds = 7.0\n',
    )

    result = run("--config", str(path), "--check-config")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tools"] == {
        "lookup_later": {"timeout_seconds": 7.0, "max_concurrent": None, "idle_timeout_seconds": None}
    }


#: `good_tools`, then a module whose hook removes its `shout` (and `REMOVE_SESSION_TOOL`, if set).
REMOVING = [f"{FIXTURES}.good_tools", f"{FIXTURES}.setup_removes_tools"]


def test_a_tool_a_setup_hook_removes_is_noted_as_not_hosted(tmp_path: Path) -> None:
    path = modules_config(tmp_path, *REMOVING)

    result = run("--config", str(path), "--check-config")

    assert result.returncode == 0, result.stderr
    assert (
        f"mcp-session-manager: note: server.tool_modules: '{FIXTURES}.setup_removes_tools': setup(server) removes"
        f" tool 'shout', registered by module '{FIXTURES}.good_tools' (in its TOOLS): it is not hosted"
    ) in result.stderr.splitlines(), result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_tools_table_for_a_tool_a_setup_hook_removes_is_refused(tmp_path: Path, check: bool) -> None:
    path = write(tmp_path, f"[server]\ntool_modules = {json.dumps(REMOVING)}\n[tools.shout]\ntimeout_seconds = 1.0\n")

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    assert problems(result) == [
        f"{path}: tools.shout: the setup(server) of module '{FIXTURES}.setup_removes_tools' removes this tool, so it"
        " is not hosted and its settings would apply to nothing; remove the table, or keep the tool"
    ]


def test_a_tool_a_setup_hook_removes_is_not_offered_as_hosted_for_a_misspelt_table(tmp_path: Path) -> None:
    # With a table of its own, the removed tool was listed among the hosted ones in the typo's
    # sentence, the line after the one saying it is not hosted.
    tables = "[tools.shout]\ntimeout_seconds = 1.0\n[tools.typo]\ntimeout_seconds = 1.0\n"
    path = write(tmp_path, f"[server]\ntool_modules = {json.dumps(REMOVING)}\n{tables}")

    result = run("--config", str(path), "--check-config")

    assert_refused(result)
    typo = next(problem for problem in problems(result) if ": tools.typo: " in problem)
    assert "no hosted tool has this name (" in typo and "shout" not in typo, typo


@pytest.mark.parametrize("tool", ["session_create", "session_metrics"])
@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_setup_hook_removing_a_session_tool_exits_2_naming_the_module(tmp_path: Path, tool: str, check: bool) -> None:
    path = modules_config(tmp_path, *REMOVING)

    result = run("--config", str(path), *(["--check-config"] if check else []), env={"REMOVE_SESSION_TOOL": tool})

    assert_refused(result)
    assert problems(result) == [
        f"{path}: server.tool_modules: '{FIXTURES}.setup_removes_tools': setup(server) removes session tool"
        f" {tool!r}; the session tools are the session extension's (its clients create, release and count"
        " sessions with them): leave them registered"
    ]


#: A tool module's source, for tests that write one into a working directory.
LOOKUP_MODULE = "def lookup(key: str) -> str:\n    return key\n\nTOOLS = [lookup]\n"


def check_in(directory: Path, module: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run the console script's `--check-config` in `directory` on a config hosting `module`."""
    config = directory / "local.toml"
    config.write_text(f'[server]\ntool_modules = ["{module}"]\n')
    command = [str(SCRIPT), "--config", str(config), "--check-config"]
    return config, subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=30)


def test_the_console_script_imports_tool_modules_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "my_local_tools.py").write_text(LOOKUP_MODULE)
    _, done = check_in(tmp_path, "my_local_tools")
    assert done.returncode == 0, done.stderr


def test_a_project_package_named_like_the_product_s_own_is_refused_saying_to_rename_it(tmp_path: Path) -> None:
    # The product's `tools` package is imported before any tool module: a `tools/` folder in the
    # working directory is never looked at, and "No module named 'tools.mine'" alone misleads.
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "mine.py").write_text(LOOKUP_MODULE)
    config, done = check_in(tmp_path, "tools.mine")
    assert done.returncode == 2, done.stderr
    [problem] = problems(done)
    assert problem.startswith(
        f"{config}: server.tool_modules: 'tools.mine': cannot import it: ModuleNotFoundError: No module named"
        " 'tools.mine'; 'tools' is mcp-session-manager's own package ("
    ), problem
    assert f"so your package {tmp_path / 'tools'} is never looked at" in problem, problem
    assert problem.endswith("rename yours (e.g. my_tools) and list that name"), problem


@pytest.mark.parametrize("name", ["server", "tools"])
def test_a_project_module_named_like_the_product_s_own_package_is_refused_saying_to_rename_it(
    tmp_path: Path, name: str
) -> None:
    # `server.py` is a common name for an MCP server's file: listed as "server", the product's own
    # package is what imports, and "the module has no TOOLS list" alone would mislead.
    (tmp_path / f"{name}.py").write_text(LOOKUP_MODULE)
    config, done = check_in(tmp_path, name)
    assert done.returncode == 2, done.stderr
    [problem] = problems(done)
    assert problem.startswith(
        f"{config}: server.tool_modules: {name!r}: {name!r} is mcp-session-manager's own package ("
    ), problem
    assert f"so your module {tmp_path / (name + '.py')} is never looked at" in problem, problem
    assert problem.endswith(f"rename yours (e.g. my_{name}) and list that name"), problem


@pytest.mark.parametrize(("name", "kind"), [("calendar", "module"), ("email", "package")])
def test_a_project_module_named_like_one_python_imported_first_is_refused_saying_to_rename_it(
    tmp_path: Path, name: str, kind: str
) -> None:
    # Python's `calendar` and `email` are imported before any tool module (by the server's own
    # imports): listed as "calendar", Python's module is what imports, and "the module has no TOOLS
    # list" alone misled the user whose calendar.py has one.
    theirs = tmp_path / (f"{name}.py" if kind == "module" else name)
    if kind == "module":
        theirs.write_text(LOOKUP_MODULE)
    else:
        theirs.mkdir()
        (theirs / "__init__.py").write_text(LOOKUP_MODULE)
    config, done = check_in(tmp_path, name)
    assert done.returncode == 2, done.stderr
    [problem] = problems(done)
    assert problem.startswith(
        f"{config}: server.tool_modules: {name!r}: a module named {name!r} was imported before any tool module ("
    ), problem
    assert f"so your {kind} {theirs} is never looked at" in problem, problem
    assert problem.endswith(f"rename yours (e.g. my_{name}) and list that name"), problem


def start_on(config: Path, **env: str) -> subprocess.Popen[str]:
    """The server started as `python -m server --config CONFIG` (stdio, its pipes the test's), with
    `env` added to a clean MCP_SESSIONS_* environment (as `run`'s): for tests that signal it while it starts."""
    return subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(config)],
        cwd=ROOT,
        env=clean_env(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("module", ["slow_at_import", "catches_interrupt_at_import"])
def test_a_signal_while_a_tool_module_imports_stops_the_start_in_one_line(
    tmp_path: Path, signum: int, module: str
) -> None:
    # Nothing serves yet, so nothing drains: the process says why it stops, with no traceback
    # (SIGINT) and not silently (SIGTERM), and its status is the shell's for that signal. A
    # module that catches KeyboardInterrupt while it imports does not swallow the stop.
    config = tmp_path / "slow.toml"
    config.write_text(f'[server]\ntool_modules = ["{FIXTURES}.{module}"]\n')
    with start_on(config) as process:
        assert process.stderr is not None
        watchdog = threading.Timer(20, process.kill)  # bounds the reads below if the line never comes
        watchdog.start()
        try:
            seen = []
            for line in process.stderr:  # the module writes this before its 30 s wait
                seen.append(line)
                if line.strip() == f"{module}: importing":
                    break
            process.send_signal(signum)
            _, rest = process.communicate(timeout=20)
        finally:
            watchdog.cancel()
            process.kill()
    stderr = "".join(seen) + rest
    assert process.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert f"mcp-session-manager: {name} while starting; stopped before serving anything" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_a_sighup_while_a_tool_module_imports_is_a_reload_once_the_server_runs(tmp_path: Path) -> None:
    # SIGHUP's default action would end the process silently (status 129) before the server's
    # handler is in place; instead the request is remembered and the file is read again once the
    # server runs, so the edit made while it started takes effect.
    config = tmp_path / "slow.toml"
    module = f'[server]\ntool_modules = ["{FIXTURES}.slow_at_import"]\n'
    config.write_text(module + "[limits]\nmax_concurrent_sessions = 5\n")
    with start_on(config, SLOW_AT_IMPORT_SECONDS="3") as process:  # the signal comes well within it
        assert process.stderr is not None
        watchdog = threading.Timer(20, process.kill)  # bounds the reads below if the reload never comes
        watchdog.start()
        try:
            seen = []
            for line in process.stderr:
                seen.append(line)
                if line.strip() == "slow_at_import: importing":
                    config.write_text(module + "[limits]\nmax_concurrent_sessions = 7\n")
                    process.send_signal(signal.SIGHUP)
                if "Config reload" in line:
                    break
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=20)
        finally:
            watchdog.cancel()
            process.kill()
    stderr = "".join(seen) + rest
    assert process.returncode == 0, stderr
    assert "Received SIGHUP while starting: reloading the config now that the server runs" in stderr, stderr
    assert f"Config reloaded from {config}: limits.max_concurrent_sessions 5 -> 7" in stderr, stderr


#: What the CLI writes when it exits without waiting for the fixture module's thread.
THREAD_LEFT = (
    "mcp-session-manager: exiting without waiting for 1 thread(s) a tool module started and left running"
    " ('fixture-cache-refresher'): Python would wait for them at exit, as they are not daemon threads;"
    " atexit handlers are not run"
)


@pytest.mark.parametrize(
    ("extra", "check", "status"),
    [
        ("", True, 0),
        ("[tools.cache_cuont]\ntimeout_seconds = 1.0\n", True, 2),
        ("[tools.cache_cuont]\ntimeout_seconds = 1.0\n", False, 2),
    ],
    ids=["valid-check-config", "invalid-check-config", "invalid-start"],
)
def test_a_tool_module_s_running_thread_does_not_hold_an_exit_that_serves_nothing(
    tmp_path: Path, extra: str, check: bool, status: int
) -> None:
    # The module's thread is no daemon thread and never ends: Python would wait for it at exit, and
    # a check that passed, or a config error, hung (the subprocess timeout would fire).
    path = write(tmp_path, f'[server]\ntool_modules = ["{FIXTURES}.starts_a_thread_at_import"]\n{extra}')

    result = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(path), *(["--check-config"] if check else [])],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines()[-1] == THREAD_LEFT, result.stderr
    if status == 0:
        assert json.loads(result.stdout)["server"]["tool_modules"] == [f"{FIXTURES}.starts_a_thread_at_import"]
    else:
        assert "tools.cache_cuont: no hosted tool has this name" in result.stderr, result.stderr


def test_a_signal_while_starting_does_not_wait_for_a_thread_a_tool_module_started(tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(
        f'[server]\ntool_modules = ["{FIXTURES}.starts_a_thread_at_import", "{FIXTURES}.slow_at_import"]\n'
    )
    with start_on(config) as process:
        assert process.stderr is not None
        watchdog = threading.Timer(20, process.kill)  # bounds the reads below if the line never comes
        watchdog.start()
        try:
            seen = []
            for line in process.stderr:
                seen.append(line)
                if line.strip() == "slow_at_import: importing":
                    break
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=20)
        finally:
            watchdog.cancel()
            process.kill()
    stderr = "".join(seen) + rest
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines()[-2:] == [
        "mcp-session-manager: SIGTERM while starting; stopped before serving anything",
        THREAD_LEFT,
    ], stderr


def test_check_config_prints_the_store_url_without_its_password() -> None:
    url = "redis://:hunter2@cache.internal:6379/0"
    result = run("--check-config", env={"MCP_SESSIONS_STORE__BACKEND": "redis", "MCP_SESSIONS_STORE__URL": url})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store"] == {
        "backend": "redis",
        "url": "redis://:***@cache.internal:6379/0",
        "key_prefix": "mcp-sessions:",
        "timeout_seconds": 1.0,
    }
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", ["reds://:hunter2@h:6379/0", "http://user:hunter2@x/0"])
def test_a_malformed_store_url_is_refused_without_its_password(tmp_path: Path, url: str) -> None:
    from_env = run("--check-config", env={"MCP_SESSIONS_STORE__URL": url})
    from_file = run("--config", str(write(tmp_path, f'[store]\nurl = "{url}"\n')), "--check-config")

    for result in (from_env, from_file):
        assert_refused(result)
        [problem] = problems(result)
        assert "store.url: must be a Redis URL" in problem and ":***@" in problem, problem
        assert "hunter2" not in result.stderr


def test_problems_from_a_flag_or_a_variable_name_it_and_not_the_config_file() -> None:
    demo = str(ROOT / "config" / "demo.toml")
    flag = run("--config", demo, "--port", "0", "--check-config")
    variable = run("--config", demo, "--check-config", env={"MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS": "abc"})

    assert_refused(flag)
    assert problems(flag) == ["command line option --port: server.port: must be between 1 and 65535 (got 0)"]
    assert_refused(variable)
    assert problems(variable) == [
        "environment variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS: limits.max_concurrent_sessions:"
        ' must be a whole number (got "abc")'
    ]


def test_a_tools_table_from_the_environment_naming_no_hosted_tool_names_the_variable() -> None:
    result = run(
        "--config",
        str(ROOT / "config" / "demo.toml"),
        "--check-config",
        env={"MCP_SESSIONS_TOOLS__SLEEP_ASYCN__TIMEOUT_SECONDS": "2"},
    )

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(
        "environment variable MCP_SESSIONS_TOOLS__SLEEP_ASYCN__TIMEOUT_SECONDS: tools.sleep_asycn: no hosted tool"
    ), problem


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_a_host_with_a_port_exits_2_naming_the_key_before_anything_binds(tmp_path: Path, check: bool) -> None:
    # It used to pass the check, then the start died with uvicorn's error naming no key (exit 1).
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nhost = "127.0.0.1:8080"\n')

    result = run("--config", str(path), *(["--check-config"] if check else []))

    assert_refused(result)
    assert problems(result) == [
        f'{path}: server.host: must not hold a port: write "127.0.0.1" and the port 8080 in server.port'
        ' (got "127.0.0.1:8080")'
    ]


def test_an_ipv6_host_in_brackets_from_the_command_line_exits_2_naming_the_option() -> None:
    result = run("--transport", "streamable-http", "--host", "[::1]")

    assert_refused(result)
    assert problems(result) == [
        'command line option --host: server.host: is an IPv6 address in brackets: write it without them, "::1"'
        ' (brackets are for URLs and Host headers) (got "[::1]")'
    ]


def test_an_off_loopback_host_with_the_transport_from_the_command_line_names_the_file_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n')

    result = run("--config", str(path), "--transport", "streamable-http", "--check-config")

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(
        f'{path}: server.host: is not a loopback address and server.transport is "streamable-http"'
        " (command line option --transport), so server.allowed_hosts must list"
    ), problem
    assert problem.endswith('(got "0.0.0.0")'), problem
