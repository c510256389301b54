"""Config files with the mistakes people make: each is refused before anything starts, exit 2,
with one line naming the file, the key and the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e_cli.test_cli import assert_refused, problems, run, write

#: (file text, the key path the problem must name, a fragment of the reason).
MISTAKES = [
    pytest.param("[server]\nport = 80000\n", "server.port", "between", id="port-out-of-range"),
    pytest.param('[server]\nport = "8765"\n', "server.port", "whole number", id="port-as-string"),
    pytest.param('[server]\ntransport = "http"\n', "server.transport", "stdio", id="unknown-transport"),
    pytest.param("[server]\nprot = 8765\n", "server.prot", "did you mean 'port'", id="typo-in-key"),
    pytest.param("[sever]\nport = 8765\n", "sever", "did you mean 'server'", id="typo-in-section"),
    pytest.param('[server]\ntool_modules = "tools.demo"\n', "server.tool_modules", "list", id="modules-not-a-list"),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = 0\n", "limits.max_concurrent_sessions", "must be", id="zero-capacity"
    ),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = 1.5\n",
        "limits.max_concurrent_sessions",
        "whole number",
        id="fractional-capacity",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = -1\n", "limits.default_timeout_seconds", "must be", id="negative-timeout"
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = nan\n", "limits.default_timeout_seconds", "finite", id="nan-timeout"
    ),
    pytest.param("[limits]\nmax_timeout_seconds = inf\n", "limits.max_timeout_seconds", "finite", id="inf-timeout"),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = 600.0\nmax_timeout_seconds = 300.0\n",
        "limits.default_timeout_seconds",
        "must not exceed limits.max_timeout_seconds",
        id="default-above-cap",
    ),
    pytest.param(
        "[limits]\nmax_metadata_bytes = true\n", "limits.max_metadata_bytes", "whole number", id="bool-for-int"
    ),
    pytest.param("[shutdown]\ntimeout_seconds = -5\n", "shutdown.timeout_seconds", "must be", id="negative-shutdown"),
    pytest.param(
        "[shutdown]\nadmin_token_env = 42\n", "shutdown.admin_token_env", "string", id="token-env-not-a-string"
    ),
    pytest.param(
        "[tools.sleep_async]\ntimeout_seconds = 5\n", "tools.sleep_async", "no hosted tool", id="tool-not-hosted"
    ),
    pytest.param(
        '[server]\ntool_modules = ["tools.demo"]\n[tools.echo]\ntimeout_secs = 5\n',
        "tools.echo.timeout_secs",
        "did you mean",
        id="typo-in-tool-key",
    ),
    pytest.param(
        '[server]\ntool_modules = ["tools.demo"]\n[tools]\necho = 5\n', "tools.echo", "table", id="tool-not-a-table"
    ),
    pytest.param("[server\nport = 1\n", "", "TOML", id="not-toml"),
    pytest.param("server = 1\n", "server", "table", id="section-not-a-table"),
]


@pytest.mark.parametrize(("text", "key", "reason"), MISTAKES)
def test_a_config_mistake_is_refused_with_file_key_and_reason_and_exit_2(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)

    result = run("--config", str(path))

    assert_refused(result)
    reported = problems(result)
    assert len(reported) == 1, reported
    [problem] = reported
    assert problem.startswith(f"{path}: {key}"), problem
    assert reason in problem, problem
