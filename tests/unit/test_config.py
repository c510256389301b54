"""Configuration: TOML files written into tmp_path, the environment and overrides, and the errors.

Every error line has the form `SOURCE: key.path: reason (got VALUE)`; the tables below hold whole
expected lines, so a change of wording is a deliberate change of these tests.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from server import ConfigError, SessionsExtension, Settings, load_settings
from server.app import build_app, check_tool_overrides
from server.config import (
    LimitsSettings,
    MetricsSettings,
    ServerSettings,
    ShutdownSettings,
    StoreSettings,
    ToolSettings,
)
from server.config_loader import config_problems
from server.store_url import safe_url
from server.tool_modules import load_tool_modules

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MCP_SESSIONS_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("MCP_SESSIONS_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: str | Path | None, overrides: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, overrides)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# -- valid configurations --------------------------------------------------------------


def test_a_complete_file_parses_into_every_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        name = "my-tools"
        transport = "streamable-http"
        host = "0.0.0.0"
        port = 9000
        tool_modules = ["tools.demo"]
        allowed_hosts = ["Tools.Example.COM:*"]

        [limits]
        default_timeout_seconds = 12.5
        max_timeout_seconds = 60
        max_concurrent_sessions = 7
        max_metadata_bytes = 0

        [shutdown]
        timeout_seconds = 0
        admin_token_env = "MY_ADMIN_TOKEN"

        [tools.echo]
        timeout_seconds = 1.5
        """,
    )

    settings = load_settings(path)

    assert settings.server.name == "my-tools"
    assert settings.server.transport == "streamable-http"
    assert settings.server.host == "0.0.0.0"
    assert settings.server.allowed_hosts == ("tools.example.com:*",)  # lower-cased: the SDK compares exactly
    assert settings.server.port == 9000
    assert settings.server.tool_modules == ("tools.demo",)
    assert settings.limits.default_timeout_seconds == 12.5
    assert settings.limits.max_timeout_seconds == 60.0
    assert isinstance(settings.limits.max_timeout_seconds, float)
    assert settings.limits.max_concurrent_sessions == 7
    assert settings.limits.max_metadata_bytes == 0
    assert settings.shutdown.timeout_seconds == 0.0
    assert settings.shutdown.admin_token_env == "MY_ADMIN_TOKEN"
    assert settings.tools == {"echo": ToolSettings(timeout_seconds=1.5)}


def test_a_partial_file_keeps_the_defaults_of_the_keys_it_leaves_out(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[limits]\nmax_concurrent_sessions = 3\n"))

    assert settings.limits.max_concurrent_sessions == 3
    assert settings.limits.default_timeout_seconds == 30.0
    assert settings.server == load_settings(None).server


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == load_settings(None)


def test_builtin_defaults_equal_config_default_toml() -> None:
    assert load_settings(None) == load_settings(ROOT / "config" / "default.toml")


def test_config_default_toml_spells_out_every_key_with_its_default() -> None:
    with (ROOT / "config" / "default.toml").open("rb") as handle:
        spelled = tomllib.load(handle)
    defaults = load_settings(None).model_dump(mode="json")

    assert spelled == {
        section: defaults[section] for section in ("server", "limits", "shutdown", "logging", "metrics", "store")
    }
    assert defaults["tools"] == {}


def test_config_demo_toml_is_valid_and_hosts_the_demo_tools() -> None:
    settings = load_settings(ROOT / "config" / "demo.toml")

    assert settings.server.tool_modules == ("tools.demo",)
    names = {fn.__name__ for fn in load_tool_modules(settings.server.tool_modules)}
    assert names == {"echo", "sleep_async", "sleep_blocking", "count_slowly", "fail"}
    assert set(settings.tools) <= names, "every [tools.NAME] in demo.toml must name a demo tool"
    assert settings.timeout_for("sleep_blocking") == 3.0
    assert settings.shutdown.admin_token_env == "MCP_SESSIONS_ADMIN_TOKEN"


def test_a_relative_path_and_a_str_path_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[server]\nport = 9001\n")
    monkeypatch.chdir(tmp_path)

    assert load_settings("config.toml").server.port == 9001


# -- per-tool timeouts -----------------------------------------------------------------


def test_per_tool_timeouts_override_the_default_for_that_tool_only(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [limits]
        default_timeout_seconds = 20.0

        [tools.slow_tool]
        timeout_seconds = 120.0

        [tools.quiet_tool]
        """,
    )

    settings = load_settings(path)

    assert settings.timeout_for("slow_tool") == 120.0
    assert settings.timeout_for("quiet_tool") == 20.0  # a table with no timeout keeps the default
    assert settings.timeout_for("any_other_tool") == 20.0


def test_admission_keys_parse_and_per_tool_caps_and_idle_timeouts_are_looked_up(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [limits]
        max_queued = 50
        queue_timeout_seconds = 2.5
        max_sessions_per_client = 8
        max_abandoned_threads = 4

        [tools.render]
        max_concurrent = 2
        idle_timeout_seconds = 15.0

        [tools.search]
        timeout_seconds = 60.0
        """,
    )

    settings = load_settings(path)

    limits = settings.limits
    assert (limits.max_queued, limits.queue_timeout_seconds) == (50, 2.5)
    assert (limits.max_sessions_per_client, limits.max_abandoned_threads) == (8, 4)
    assert settings.tool_caps() == {"render": 2}
    assert settings.idle_timeout_for("render") == 15.0
    assert settings.idle_timeout_for("search") is None and settings.idle_timeout_for("other") is None


def test_a_per_tool_timeout_may_equal_the_cap(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[tools.echo]\ntimeout_seconds = 300.0\n"))

    assert settings.timeout_for("echo") == settings.limits.max_timeout_seconds


def test_the_default_timeout_may_equal_the_cap(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[limits]\ndefault_timeout_seconds = 60.0\nmax_timeout_seconds = 60.0\n"))

    assert settings.limits.default_timeout_seconds == settings.limits.max_timeout_seconds == 60.0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_host_on_streamable_http_needs_no_allowed_hosts(tmp_path: Path, host: str) -> None:
    settings = load_settings(write(tmp_path, f'[server]\ntransport = "streamable-http"\nhost = "{host}"\n'))

    assert (settings.server.host, settings.server.allowed_hosts) == (host, ())


def test_the_http_session_idle_timeout_may_be_a_week(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[server]\nhttp_session_idle_timeout_seconds = 604800\n"))

    assert settings.server.http_session_idle_timeout_seconds == 604800.0


# -- precedence: flags > environment > file > defaults -----------------------------------


def test_environment_beats_the_file_and_the_rest_of_the_file_still_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[limits]\nmax_concurrent_sessions = 5\ndefault_timeout_seconds = 10.0\n")
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS", "7")

    settings = load_settings(path)

    assert settings.limits.max_concurrent_sessions == 7
    assert settings.limits.default_timeout_seconds == 10.0


def test_environment_sets_keys_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_SERVER__TRANSPORT", "streamable-http")
    monkeypatch.setenv("MCP_SESSIONS_SERVER__TOOL_MODULES", '["tools.demo"]')
    monkeypatch.setenv("MCP_SESSIONS_TOOLS__ECHO__TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("mcp_sessions_shutdown__timeout_seconds", "4")  # names are case-insensitive

    settings = load_settings(None)

    assert settings.server.transport == "streamable-http"
    assert settings.server.tool_modules == ("tools.demo",)
    assert settings.timeout_for("echo") == 2.5
    assert settings.shutdown.timeout_seconds == 4.0


def test_unrelated_variables_with_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_ADMIN_TOKEN", "s3cret")  # the demo's token variable

    assert load_settings(None) == Settings()


def test_overrides_beat_the_environment_and_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "10.0.0.1"\ntransport = "stdio"\n')
    monkeypatch.setenv("MCP_SESSIONS_SERVER__ALLOWED_HOSTS", '["tools.example.com:*"]')  # off loopback over HTTP
    monkeypatch.setenv("MCP_SESSIONS_SERVER__PORT", "9100")
    monkeypatch.setenv("MCP_SESSIONS_SERVER__HOST", "10.0.0.2")

    settings = load_settings(path, {"server": {"port": 9200, "transport": "streamable-http"}})

    assert settings.server.port == 9200
    assert settings.server.transport == "streamable-http"
    assert settings.server.host == "10.0.0.2"


def test_file_values_are_typed_but_environment_text_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[server]\nport = "80"\n')
    assert problems_of(path) == [f'{path}: server.port: must be a whole number (got "80")']

    monkeypatch.setenv("MCP_SESSIONS_SERVER__PORT", "80")
    assert load_settings(path).server.port == 80  # the bad file value is overridden, not used


def test_building_settings_directly_still_checks_the_timeout_cap() -> None:
    with pytest.raises(ValidationError, match="must not exceed limits.max_timeout_seconds"):
        LimitsSettings(default_timeout_seconds=400.0)
    with pytest.raises(ValidationError, match=r"tools\.echo\.timeout_seconds \(400\.0\) must not exceed"):
        Settings(tools={"echo": ToolSettings(timeout_seconds=400.0)})
    with pytest.raises(ValidationError, match=r'tools\."my\.tool"\.timeout_seconds \(400\.0\) must not exceed'):
        Settings(tools={"my.tool": ToolSettings(timeout_seconds=400.0)})  # its name written as TOML writes it


# -- bad files: one problem each, the whole line -----------------------------------------

BAD_FILES = [
    pytest.param(
        "[limits.max_queued]\nx = 1\n",
        'limits.max_queued: must be a whole number, not a table (got a table with the key "x")',
        id="a-table-one-level-too-deep",
    ),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = {a = 1, b = 2}\n",
        'limits.max_concurrent_sessions: must be a whole number, not a table (got a table with the keys "a", "b")',
        id="an-inline-table-for-int",
    ),
    pytest.param(
        '[limits]\nmax_concurrent_sessions = "ten"\n',
        'limits.max_concurrent_sessions: must be a whole number (got "ten")',
        id="wrong-type-string-for-int",
    ),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = true\n",
        "limits.max_concurrent_sessions: must be a whole number (got true)",
        id="wrong-type-bool-for-int",
    ),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = 2.5\n",
        "limits.max_concurrent_sessions: must be a whole number (got 2.5)",
        id="wrong-type-fraction-for-int",
    ),
    pytest.param(
        '[limits]\ndefault_timeout_seconds = "5"\n',
        'limits.default_timeout_seconds: must be a number (got "5")',
        id="wrong-type-string-for-float",
    ),
    pytest.param(
        "[server]\nname = 5\n",
        "server.name: must be a string (in quotes) (got 5)",
        id="wrong-type-int-for-string",
    ),
    pytest.param(
        '[server]\nname = " \\t "\n',
        'server.name: must not be blank (only whitespace): write the name clients are shown (got " \\t ")',
        id="blank-server-name",
    ),
    pytest.param(
        '[server]\ntool_modules = "tools.demo"\n',
        'server.tool_modules: must be a list, e.g. ["tools.demo"] (got "tools.demo")',
        id="wrong-type-string-for-list",
    ),
    pytest.param(
        '[server]\nallowed_hosts = "mcp.example.com"\n',
        'server.allowed_hosts: must be a list, e.g. ["mcp.example.com:*"] (got "mcp.example.com")',
        id="wrong-type-string-for-host-list",
    ),
    pytest.param(
        "x = " + "{a=" * 1000 + "1" + "}" * 1000 + "\n",
        "invalid TOML: arrays or inline tables nest too deeply to be read (a config nests a few levels)",
        id="nesting-beyond-the-toml-reader",
    ),
    pytest.param(
        "[server]\ntool_modules = " + "[" * 450 + "]" * 450 + "\n",
        "server.tool_modules.0: must be a string (in quotes) (got [[[[[[...]]]]]])",
        id="nested-lists-shown-shortened",
    ),
    pytest.param(
        "[server]\nname = [" + ", ".join(str(i) for i in range(30)) + "]\n",
        "server.name: must be a string (in quotes) (got [" + ", ".join(str(i) for i in range(20)) + ", ...])",
        id="long-list-shown-shortened",
    ),
    pytest.param(
        f'[store]\nkey_prefix = "{"a" * 201}"\n',
        f'store.key_prefix: must be at most 200 characters (got "{"a" * 96}...)',
        id="string-too-long",
    ),
    pytest.param(
        "limits = 5\n",
        "limits: must be a table ([limits] with its own keys), not a single value (got 5)",
        id="wrong-type-value-for-table",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = -1.0\n",
        "limits.default_timeout_seconds: must be greater than 0.0 (got -1.0)",
        id="negative-timeout",
    ),
    pytest.param(
        "[shutdown]\ntimeout_seconds = -5\n",
        "shutdown.timeout_seconds: must be at least 0.0 (got -5)",
        id="negative-shutdown-timeout",
    ),
    pytest.param(
        "[limits]\nmax_metadata_bytes = -1\n",
        "limits.max_metadata_bytes: must be between 0 and 16777216 (got -1)",
        id="negative-metadata-bytes",
    ),
    pytest.param(
        "[limits]\nmax_concurrent_sessions = 0\n",
        "limits.max_concurrent_sessions: must be between 1 and 1000000 (got 0)",
        id="zero-capacity",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = nan\n",
        "limits.default_timeout_seconds: must be a finite number (nan and inf are not allowed) (got nan)",
        id="nan-timeout",
    ),
    pytest.param(
        "[limits]\nmax_timeout_seconds = inf\n",
        "limits.max_timeout_seconds: must be a finite number (nan and inf are not allowed) (got inf)",
        id="inf-timeout",
    ),
    pytest.param(
        "[shutdown]\ntimeout_seconds = inf\n",
        "shutdown.timeout_seconds: must be a finite number (nan and inf are not allowed) (got inf)",
        id="inf-shutdown-timeout",
    ),
    pytest.param(
        "[tools.echo]\ntimeout_seconds = -inf\n",
        "tools.echo.timeout_seconds: must be a finite number (nan and inf are not allowed) (got -inf)",
        id="inf-tool-timeout",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = 400.0\n",
        "limits.default_timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0"
        " (built-in default); lower it or raise the cap (got 400.0)",
        id="default-timeout-above-default-cap",
    ),
    pytest.param(
        "[limits]\ndefault_timeout_seconds = 40.0\nmax_timeout_seconds = 20.0\n",
        "limits.default_timeout_seconds: must not exceed limits.max_timeout_seconds, which is 20.0"
        " in this file; lower it or raise the cap (got 40.0)",
        id="default-timeout-above-cap",
    ),
    pytest.param(
        "[limits]\nmax_timeout_seconds = 10.0\n",
        "limits.max_timeout_seconds: must be at least limits.default_timeout_seconds, which is 30.0"
        " (built-in default); raise it or set a lower limits.default_timeout_seconds (got 10.0)",
        id="cap-below-default-timeout",
    ),
    pytest.param(
        "[limits]\nmax_timeout_seconds = 60.0\n[tools.sleep_async]\ntimeout_seconds = 61.0\n",
        "tools.sleep_async.timeout_seconds: must not exceed limits.max_timeout_seconds, which is 60.0"
        " in this file; lower it or raise the cap (got 61.0)",
        id="tool-timeout-above-cap",
    ),
    pytest.param(
        "[tools.echo]\ntimeout_seconds = 0\n",
        "tools.echo.timeout_seconds: must be greater than 0.0 (got 0)",
        id="zero-tool-timeout",
    ),
    pytest.param(
        "max_sessions = 5\n",
        "max_sessions: unknown key; the keys here are server, limits, shutdown, logging, metrics, store, tools",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "[limit]\nmax_concurrent_sessions = 5\n",
        "limit: unknown key; did you mean 'limits'?",
        id="unknown-section",
    ),
    pytest.param(
        "[limits]\nmax_concurent_sessions = 5\n",
        "limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?",
        id="unknown-nested-key-typo",
    ),
    pytest.param(
        # A key of other sections too, but a close typo of one of this section's: the typo is likelier.
        "[limits]\ntimeout_seconds = 60\n",
        "limits.timeout_seconds: unknown key; did you mean 'max_timeout_seconds'?",
        id="unknown-key-closer-to-a-key-here-than-to-one-elsewhere",
    ),
    pytest.param(
        "[tools.echo]\ntimeout = 5.0\n",
        "tools.echo.timeout: unknown key; did you mean 'timeout_seconds'?",
        id="unknown-tool-key",
    ),
    pytest.param(
        '_env_prefix = "OTHER_"\n',
        "_env_prefix: unknown key; the keys here are server, limits, shutdown, logging, metrics, store, tools",
        id="settings-init-option-is-not-a-key",
    ),
    pytest.param(
        'tool_modules = ["tools.demo"]\n',
        "tool_modules: unknown key here; it belongs in [server] (server.tool_modules)",
        id="server-key-at-top-level",
    ),
    pytest.param(
        "[server]\nmax_concurrent_sessions = 5\n",
        "server.max_concurrent_sessions: unknown key here; it belongs in [limits] (limits.max_concurrent_sessions)",
        id="limits-key-in-server",
    ),
    pytest.param(
        "[server]\nprometheus_port = 9100\n",
        "server.prometheus_port: unknown key here; it belongs in [metrics] (metrics.prometheus_port)",
        id="metrics-key-in-server",
    ),
    pytest.param(
        "[server]\ntimeout_seconds = 5.0\n",
        "server.timeout_seconds: unknown key here; it belongs in [shutdown], [store] or [tools.<name>]"
        " (shutdown.timeout_seconds, store.timeout_seconds, tools.<name>.timeout_seconds)",
        id="key-of-several-tables",
    ),
    pytest.param(
        "[echo]\ntimeout_seconds = 5.0\n",
        "echo: unknown key; per-tool settings belong in [tools.echo]",
        id="tool-table-at-top-level",
    ),
    pytest.param(
        '[tools]\ntool_modules = ["tools.demo"]\n',
        "tools.tool_modules: is not a tool's table but a key of another table: it belongs in [server]"
        ' (server.tool_modules) (got ["tools.demo"])',
        id="server-key-in-tools",
    ),
    pytest.param(
        '[server]\ntransport = "http"\n',
        "server.transport: must be 'stdio' or 'streamable-http' (got \"http\")",
        id="unknown-transport",
    ),
    pytest.param(
        "[server]\nport = 70000\n",
        "server.port: must be between 1 and 65535 (got 70000)",
        id="port-above-range",
    ),
    pytest.param(
        "[server]\nport = 0\n",
        "server.port: must be between 1 and 65535 (got 0)",
        id="port-zero",
    ),
    pytest.param(
        '[server]\nhost = ""\n',
        'server.host: must not be empty (got "")',
        id="empty-host",
    ),
    pytest.param(
        '[server]\nhost = "127.0.0.1:8080"\n',
        'server.host: must not hold a port: write "127.0.0.1" and the port 8080 in server.port (got "127.0.0.1:8080")',
        id="host-with-port",
    ),
    pytest.param(
        '[server]\nhost = "[::1]:8080"\n',
        'server.host: must not hold a port: write "::1" (without brackets) and the port 8080 in server.port'
        ' (got "[::1]:8080")',
        id="bracketed-host-with-port",
    ),
    pytest.param(
        '[server]\nhost = "http://localhost"\n',
        'server.host: must be an address or a host name, not a URL: write "localhost" (no scheme, no path);'
        ' a port goes in server.port (got "http://localhost")',
        id="host-a-url",
    ),
    pytest.param(
        '[server]\nhost = "localhost/mcp"\n',
        'server.host: must be an address or a host name with no path: write "localhost" (got "localhost/mcp")',
        id="host-with-path",
    ),
    pytest.param(
        '[server]\nhost = "[::1]"\n',
        'server.host: is an IPv6 address in brackets: write it without them, "::1" (brackets are for URLs and'
        ' Host headers) (got "[::1]")',
        id="host-ipv6-in-brackets",
    ),
    pytest.param(
        '[server]\nhost = "localhost "\n',
        'server.host: must not contain spaces; write "localhost" (got "localhost ")',
        id="host-with-trailing-space",
    ),
    pytest.param(
        '[server]\nhost = "not a host!"\n',
        'server.host: must not contain spaces; write an IPv4 address ("0.0.0.0"), an IPv6 address without brackets'
        ' ("::1") or a host name ("localhost") (got "not a host!")',
        id="host-not-a-host",
    ),
    pytest.param(
        '[server]\nhost = "my-host!"\n',
        'server.host: must be an IPv4 address ("0.0.0.0"), an IPv6 address without brackets ("::1") or a host name'
        ' ("localhost"); a name is labels of letters, digits, - and _ (up to 63 each, not starting or ending'
        ' with -) separated by dots (got "my-host!")',
        id="host-bad-character",
    ),
    pytest.param(
        '[server]\nhost = "256.0.0.1"\n',
        "server.host: is not a valid IPv4 address: write four numbers from 0 to 255 separated by dots,"
        ' e.g. "127.0.0.1" (got "256.0.0.1")',
        id="host-bad-ipv4",
    ),
    pytest.param(
        '[server]\ntool_modules = ["tools.demo", "tools.demo"]\n',
        "server.tool_modules: lists 'tools.demo' more than once; list each module once"
        ' (got ["tools.demo", "tools.demo"])',
        id="module-listed-twice",
    ),
    pytest.param(
        "[server]\ntool_modules = [1]\n",
        "server.tool_modules.0: must be a string (in quotes) (got 1)",
        id="module-name-not-a-string",
    ),
    pytest.param(
        '[server]\ntool_modules = ["tools.demo", "m_print.py"]\n',
        "server.tool_modules.1: is a file path, not a module name; write the module's dotted name, e.g."
        ' "m_print"; modules are found from the working directory and PYTHONPATH (got "m_print.py")',
        id="module-name-a-file-name",
    ),
    pytest.param(
        '[server]\ntool_modules = ["tools/demo"]\n',
        "server.tool_modules.0: is a file path, not a module name; write the module's dotted name, e.g."
        ' "tools.demo"; modules are found from the working directory and PYTHONPATH (got "tools/demo")',
        id="module-name-a-relative-path",
    ),
    pytest.param(
        '[server]\ntool_modules = ["/srv/mcp/my_tools.py"]\n',
        "server.tool_modules.0: is a file path, not a module name; write the module's dotted name, e.g."
        ' "my_tools", with its directory on PYTHONPATH; modules are found from the working directory and'
        ' PYTHONPATH (got "/srv/mcp/my_tools.py")',
        id="module-name-an-absolute-path",
    ),
    pytest.param(
        '[server]\ntool_modules = [".rel"]\n',
        'server.tool_modules.0: is a relative module name; write the full dotted name, e.g. "my_package.rel";'
        ' modules are found from the working directory and PYTHONPATH (got ".rel")',
        id="module-name-relative",
    ),
    pytest.param(
        '[server]\ntool_modules = [" tools.demo"]\n',
        'server.tool_modules.0: must not have spaces around it; write "tools.demo" (got " tools.demo")',
        id="module-name-with-spaces-around",
    ),
    pytest.param(
        "[limits]\nmax_queued = -1\n",
        "limits.max_queued: must be between 0 and 1000000 (got -1)",
        id="negative-queue",
    ),
    pytest.param(
        "[limits]\nqueue_timeout_seconds = 0.0\n",
        "limits.queue_timeout_seconds: must be greater than 0.0 (got 0.0)",
        id="zero-queue-timeout",
    ),
    pytest.param(
        "[limits]\nmax_sessions_per_client = 1.5\n",
        "limits.max_sessions_per_client: must be a whole number (got 1.5)",
        id="fractional-client-cap",
    ),
    pytest.param(
        "[limits]\nmax_abandoned_threads = 20000\n",
        "limits.max_abandoned_threads: must be between 0 and 10000 (got 20000)",
        id="thread-bound-too-high",
    ),
    pytest.param(
        "[tools.slow]\nmax_concurrent = 0\n",
        "tools.slow.max_concurrent: must be at least 1; for no cap on the tool, leave max_concurrent out (got 0)",
        id="tool-cap-zero",
    ),
    pytest.param(
        "[tools.slow]\nidle_timeout_seconds = nan\n",
        "tools.slow.idle_timeout_seconds: must be a finite number (nan and inf are not allowed) (got nan)",
        id="idle-timeout-nan",
    ),
    pytest.param(
        "[tools.slow]\nidle_timeout_seconds = 301.0\n",
        "tools.slow.idle_timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0 "
        "(built-in default); lower it or raise the cap (got 301.0)",
        id="idle-timeout-above-cap",
    ),
    pytest.param(
        "[tools.slow]\nmax_concurent = 2\n",
        "tools.slow.max_concurent: unknown key; did you mean 'max_concurrent'?",
        id="tool-key-typo",
    ),
    pytest.param(
        "[limits]\nmax_timeout_seconds = 1979-05-27\n",
        "limits.max_timeout_seconds: must be a number (got 1979-05-27)",
        id="date-for-number",
    ),
    pytest.param(
        '[logging]\nlevel = "verbose"\n',
        "logging.level: must be 'debug', 'info', 'warning' or 'error' (got \"verbose\")",
        id="unknown-log-level",
    ),
    pytest.param(
        '[logging]\nlevel = "WARN"\n',
        "logging.level: must be 'debug', 'info', 'warning' or 'error' (got \"WARN\")",
        id="unknown-log-level-quoted-as-written-not-lowered",
    ),
    pytest.param(
        '[logging]\nformat = "LogFmt"\n',
        "logging.format: must be 'text' or 'json' (got \"LogFmt\")",
        id="unknown-log-format-quoted-as-written-not-lowered",
    ),
    pytest.param(
        '[logging]\nformat = "logfmt"\n',
        "logging.format: must be 'text' or 'json' (got \"logfmt\")",
        id="unknown-log-format",
    ),
    pytest.param(
        '[logging]\nlevle = "info"\n',
        "logging.levle: unknown key; did you mean 'level'?",
        id="log-key-typo",
    ),
    pytest.param(
        "[metrics]\nprometheus_port = 65536\n",
        "metrics.prometheus_port: must be between 0 and 65535 (got 65536)",
        id="exporter-port-out-of-range",
    ),
    pytest.param(
        '[metrics]\nprometheus_port = "9100"\n',
        'metrics.prometheus_port: must be a whole number (got "9100")',
        id="exporter-port-as-text",
    ),
    pytest.param(
        '[store]\nbackend = "etcd"\n',
        "store.backend: must be 'memory' or 'redis' (got \"etcd\")",
        id="unknown-store-backend",
    ),
    pytest.param(
        '[store]\nurl = "http://127.0.0.1:6379"\n',
        "store.url: must be a Redis URL starting with redis://, rediss:// or unix://, "
        'e.g. redis://127.0.0.1:6379/0 (got "http://127.0.0.1:6379")',
        id="store-url-not-redis",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["bad host"]\n',
        'server.allowed_hosts.0: must not contain spaces; give one host[:port] per entry (got "bad host")',
        id="allowed-host-with-space",
    ),
    pytest.param(
        '[server]\nallowed_hosts = [""]\n',
        'server.allowed_hosts.0: must not be empty; give a host[:port], e.g. "mcp.example.com:*" (got "")',
        id="allowed-host-empty",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["mcp.example.com", "https://x.com"]\n',
        'server.allowed_hosts.1: must be a Host header value without a scheme, e.g. "x.com:*" (got "https://x.com")',
        id="allowed-host-with-scheme",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["x.com/mcp"]\n',
        'server.allowed_hosts.0: must be host[:port] with no path, e.g. "x.com:*" (got "x.com/mcp")',
        id="allowed-host-with-path",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["x.com:0"]\n',
        'server.allowed_hosts.0: the port must be a number from 1 to 65535, or * for any port (got "x.com:0")',
        id="allowed-host-port-zero",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["x.com:http"]\n',
        'server.allowed_hosts.0: the port must be a number from 1 to 65535, or * for any port (got "x.com:http")',
        id="allowed-host-port-name",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["*.example.com:*"]\n',
        "server.allowed_hosts.0: must be host[:port] where host is a name, an IPv4 address or an IPv6 address"
        ' in brackets ([::1]); only the port may be * (got "*.example.com:*")',
        id="allowed-host-wildcard-name",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["::1"]\n',
        "server.allowed_hosts.0: must be host[:port] where host is a name, an IPv4 address or an IPv6 address"
        ' in brackets ([::1]); only the port may be * (got "::1")',
        id="allowed-host-bare-ipv6",
    ),
    pytest.param(
        '[server]\nallowed_hosts = ["[::1"]\n',
        "server.allowed_hosts.0: must be host[:port] where host is a name, an IPv4 address or an IPv6 address"
        ' in brackets ([::1]); only the port may be * (got "[::1")',
        id="allowed-host-unclosed-bracket",
    ),
    pytest.param(
        "[server]\nallowed_hosts = [5]\n",
        "server.allowed_hosts.0: must be a string (in quotes) (got 5)",
        id="allowed-host-not-a-string",
    ),
    pytest.param(
        "[server]\nhttp_session_idle_timeout_seconds = 604801\n",
        "server.http_session_idle_timeout_seconds: must be at most 604800.0 (got 604801)",
        id="http-session-idle-timeout-past-a-week",
    ),
    pytest.param(
        '[server]\ntransport = "streamable-http"\nhost = "0.0.0.0"\n',
        "server.host: is not a loopback address, so server.allowed_hosts must list the Host header values"
        ' clients will use, e.g. ["mcp.example.com:*", "10.0.0.5:8765"], so that requests for any other host'
        ' (DNS rebinding) are refused (got "0.0.0.0")',
        id="off-loopback-without-allowed-hosts",
    ),
    pytest.param(
        '[store]\nkey_prefix = ""\n',
        'store.key_prefix: must not be empty (got "")',
        id="empty-key-prefix",
    ),
    pytest.param(
        '[store]\nkey_prefix = "my prefix:"\n',
        'store.key_prefix: must be printable with no spaces, e.g. "mcp-sessions:" (got "my prefix:")',
        id="key-prefix-with-space",
    ),
    pytest.param(
        # Past it a session's expires_at is no date (session_create failed after admitting it).
        "[limits]\nmax_timeout_seconds = 1e12\n",
        "limits.max_timeout_seconds: must be at most 1e9 (got 1000000000000.0)",
        id="timeout-cap-past-any-date",
    ),
    pytest.param(
        "[store]\ntimeout_seconds = 0\n",
        "store.timeout_seconds: must be greater than 0.0 (got 0)",
        id="store-timeout-zero",
    ),
    pytest.param(
        '[store]\nbackend = "redis"\nurl_ = "redis://x"\n',
        "store.url_: unknown key; did you mean 'url'?",
        id="store-key-typo",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_a_bad_file_is_refused_with_file_key_reason_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    assert problems_of(path) == [f"{path}: {expected}"]


def test_an_admin_token_written_where_its_variable_name_belongs_is_refused_and_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, '[shutdown]\nadmin_token_env = "hunter2-Very-Secret"\n')

    [problem] = problems_of(path)

    assert problem.startswith(f"{path}: shutdown.admin_token_env: must be the NAME of an environment variable")
    assert "not the token itself" in problem
    assert "hunter2" not in problem


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.toml"


def _directory(tmp_path: Path) -> Path:
    return tmp_path


def _bad_syntax(tmp_path: Path) -> Path:
    return write(tmp_path, "[limits\nmax_concurrent_sessions = 5\n")


def _duplicate_key(tmp_path: Path) -> Path:
    return write(tmp_path, "[server]\nport = 1\nport = 2\n")


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\nname = "caf\xe9"\n'.encode("latin-1"))
    return path


def _not_utf8_after_a_bom(tmp_path: Path) -> Path:
    path = tmp_path / "bom-latin1.toml"
    path.write_bytes(b"\xef\xbb\xbf" + '[server]\nname = "caf\xe9"\n'.encode("latin-1"))
    return path


def _utf16(tmp_path: Path) -> Path:
    path = tmp_path / "utf16.toml"  # what Windows Notepad saves as "Unicode"
    path.write_bytes('[server]\nname = "x"\n'.encode("utf-16"))
    return path


def _under_a_file(tmp_path: Path) -> Path:
    return write(tmp_path, "", name="plain") / "config.toml"


def _symlink_loop(tmp_path: Path) -> Path:
    path = tmp_path / "loop.toml"
    path.symlink_to(path)
    return path


def _name_too_long(tmp_path: Path) -> Path:
    return tmp_path / ("x" * 300 + ".toml")


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return path


def _link_to_a_fifo(tmp_path: Path) -> Path:
    path = tmp_path / "link.toml"
    path.symlink_to(_fifo(tmp_path))
    return path


def _character_device(tmp_path: Path) -> Path:
    return Path(os.devnull)


NOT_REGULAR = (
    "not a regular file: the config must be a regular file (or a symlink to one), which is read whole;"
    " write the settings to a .toml file and give its path"
)


@pytest.mark.timeout(10)  # opening a FIFO for reading waits for a writer: fail, do not hang
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            _missing,
            "config file not found (check the path given with --config, or to load_settings)",
            id="missing-file",
        ),
        pytest.param(
            _under_a_file,
            "cannot read the config file: Not a directory; part of the path is a file, not a directory"
            " (check the path given with --config, or to load_settings)",
            id="not-a-directory",
        ),
        pytest.param(
            _symlink_loop,
            "cannot read the config file: Too many levels of symbolic links; the path is a symlink loop"
            " (check the path given with --config, or to load_settings)",
            id="symlink-loop",
        ),
        pytest.param(
            _name_too_long,
            "cannot read the config file: File name too long; the path or one of its names is too long"
            " (check the path given with --config, or to load_settings)",
            id="name-too-long",
        ),
        pytest.param(_fifo, f"is a named pipe (FIFO), {NOT_REGULAR}", id="fifo"),
        pytest.param(_link_to_a_fifo, f"is a named pipe (FIFO), {NOT_REGULAR}", id="symlink-to-fifo"),
        pytest.param(_character_device, f"is a character device, {NOT_REGULAR}", id="character-device"),
        pytest.param(_directory, "is a directory, not a config file (give the path of a .toml file)", id="directory"),
        pytest.param(
            _bad_syntax,
            "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)",
            id="bad-toml-syntax",
        ),
        pytest.param(
            _duplicate_key,
            "invalid TOML: Cannot overwrite a value (at line 3, column 9): server.port is set twice; keep one",
            id="duplicate",
        ),
        pytest.param(
            _not_utf8,
            "invalid TOML: the file is not UTF-8 (invalid continuation byte: byte 0xe9 at line 2, column 12);"
            " save it as UTF-8",
            id="not-utf8",
        ),
        pytest.param(
            _not_utf8_after_a_bom,
            "invalid TOML: the file is not UTF-8 (invalid continuation byte: byte 0xe9 at line 2, column 12);"
            " save it as UTF-8",
            id="not-utf8-after-a-utf8-bom",
        ),
        pytest.param(
            _utf16,
            "invalid TOML: the file is UTF-16 (a byte-order mark says so), not UTF-8: save it as UTF-8",
            id="utf16",
        ),
    ],
)
def test_an_unreadable_file_is_refused_naming_the_file(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    path = make(tmp_path)

    assert problems_of(path) == [f"{path}: {expected}"]


@pytest.mark.timeout(10)  # the descriptor is opened non-blocking; a blocking open would wait for a writer
def test_a_fifo_put_in_the_files_place_after_the_path_was_checked_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.stat reports what the path named an instant before a FIFO took its place: the check
    # made on the opened descriptor refuses it, rather than reading a pipe as an empty config.
    path = _fifo(tmp_path)
    real_stat = os.stat

    class RegularFile:
        st_mode = stat.S_IFREG | 0o644

    def stat_before_the_swap(name: Any, *args: Any, **kwargs: Any) -> Any:
        return RegularFile() if os.fspath(name) == str(path) else real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_the_swap)

    assert problems_of(path) == [f"{path}: is a named pipe (FIFO), {NOT_REGULAR}"]


DUPLICATE = "invalid TOML: Cannot overwrite a value"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            'a = 1\n[store]\nurl = "redis://:hunter2@db:6379"\nurl = "redis://:hunter3@db:6379"\n',
            f"{DUPLICATE} (at line 4, column 33): store.url is set twice; keep one",
            id="a-secret-value",
        ),
        pytest.param(
            '[server]\ntool_modules = ["a"]\ntool_modules = [\n  "b",\n  "hunter2",\n]\n',
            f"{DUPLICATE} (at line 6, column 2): server.tool_modules is set twice (the second time on line 3);"
            " keep one",
            id="a-value-over-several-lines",
        ),
        pytest.param(
            "[shutdown]\ntimeout_seconds = 1\ntimeout_seconds = 2",
            f"{DUPLICATE} (at end of document): shutdown.timeout_seconds is set twice (the second time on line 3);"
            " keep one",
            id="at-the-end-without-a-newline",
        ),
        pytest.param(
            "[limits]\nmax_queued = 1\nmax_queued.depth = 2\n",
            f"{DUPLICATE} (at line 3, column 21): limits.max_queued.depth cannot be set: limits.max_queued is"
            " already a value, not a table",
            id="a-key-under-a-value",
        ),
        pytest.param(
            '[tools."my tool"]\ntimeout_seconds = 1\n"timeout_seconds" = 2 # = "hunter2"\n',
            f'{DUPLICATE} (at line 3, column 22): tools."my tool".timeout_seconds is set twice; keep one',
            id="quoted-keys-and-a-comment",
        ),
        pytest.param(
            'x = """\nport = 1\n"""\n[[store]]\nurl = "hunter2"\nurl = "hunter3"\n',
            f"{DUPLICATE} (at line 6, column 16): store.url is set twice; keep one",
            id="in-an-array-of-tables-after-a-string-that-looks-like-keys",
        ),
    ],
)
def test_a_key_set_twice_is_named_with_its_table_and_no_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    [problem] = problems_of(path)

    assert problem == f"{path}: {expected}"
    assert "hunter" not in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[limits]\nmax_queued = 1\n[limits]\nmax_queued = 2\n",
            "invalid TOML: Cannot declare [limits] twice (at line 3, column 8)",
            id="a-table-declared-twice",
        ),
        pytest.param(
            '[tools."a.b"]\n[tools."a.b"]\n',
            'invalid TOML: Cannot declare [tools."a.b"] twice (at line 2, column 13)',
            id="a-table-with-a-dot-declared-twice",
        ),
        pytest.param(
            '[tools."my.tool"]\ntimeout_seconds = "x"\n',
            'tools."my.tool".timeout_seconds: must be a number (got "x")',
            id="a-bad-value-under-a-name-with-a-dot",
        ),
        pytest.param(
            '[tools."my tool"]\ntimeout_second = 1\n',
            "tools.\"my tool\".timeout_second: unknown key; did you mean 'timeout_seconds'?",
            id="an-unknown-key-under-a-name-with-a-space",
        ),
    ],
)
def test_key_paths_are_written_as_toml_writes_them(tmp_path: Path, text: str, expected: str) -> None:
    # Printed as `tools.my.tool...` (another key path) and, by tomllib, as a Python tuple `('limits',)`.
    path = write(tmp_path, text)

    assert problems_of(path) == [f"{path}: {expected}"]


def test_a_hosts_overrides_are_named_as_such_not_as_the_command_line() -> None:
    # The CLI passes only --transport, --host and --port; any other key is a host's own.
    assert problems_of(None, {"limits": {"max_concurent_sessions": 3}}) == [
        "overrides passed to load_settings: limits.max_concurent_sessions: unknown key; "
        "did you mean 'max_concurrent_sessions'?"
    ]


def test_an_empty_config_path_is_refused_as_empty_not_read_as_the_working_directory() -> None:
    assert problems_of("") == [
        "the config path is empty: give the path of a .toml file (or no --config, for the built-in defaults)"
    ]


def test_a_file_starting_with_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Some Windows editors (Notepad, older Visual Studio) write one at the start of a UTF-8 file.
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + '[server]\nname = "caf\u00e9"\n'.encode())

    assert load_settings(path).server.name == "caf\u00e9"


def test_a_byte_order_mark_elsewhere_is_still_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbf[server]\n")

    assert problems_of(path) == [f"{path}: invalid TOML: Invalid statement (at line 1, column 1)"]


def test_a_file_with_several_problems_reports_all_of_them_one_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        transport = "tcp"
        port = 0

        [limits]
        max_concurent_sessions = 5
        max_concurrent_sessions = 0
        default_timeout_seconds = 400.0

        [tools.echo]
        timeout_seconds = 500.0
        """,
    )

    assert problems_of(path) == [
        f"{path}: server.transport: must be 'stdio' or 'streamable-http' (got \"tcp\")",
        f"{path}: server.port: must be between 1 and 65535 (got 0)",
        f"{path}: limits.max_concurrent_sessions: must be between 1 and 1000000 (got 0)",
        f"{path}: limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?",
        f"{path}: limits.default_timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0"
        " (built-in default); lower it or raise the cap (got 400.0)",
        f"{path}: tools.echo.timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0"
        " (built-in default); lower it or raise the cap (got 500.0)",
    ]


# -- bad environment and overrides: the variable or the flag is named --------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param(
            "MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS",
            "zero",
            'limits.max_concurrent_sessions: must be a whole number (got "zero")',
            id="not-a-number",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS",
            "0",
            'limits.max_concurrent_sessions: must be between 1 and 1000000 (got "0")',
            id="zero-capacity",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS__DEFAULT_TIMEOUT_SECONDS",
            "nan",
            'limits.default_timeout_seconds: must be a finite number (nan and inf are not allowed) (got "nan")',
            id="nan",
        ),
        pytest.param(
            "MCP_SESSIONS_LOGGING__LEVEL",
            "WARN",
            "logging.level: must be 'debug', 'info', 'warning' or 'error' (got \"WARN\")",
            id="log-level-quoted-as-written-not-lowered",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS__MAX_CONCURENT_SESSIONS",
            "5",
            "limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?",
            id="typo-in-nested-key",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMIT__MAX_CONCURRENT_SESSIONS",
            "5",
            "limit.max_concurrent_sessions: unknown key; did you mean 'limits'?",
            id="typo-in-section",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS_MAX_CONCURRENT_SESSIONS",
            "5",
            "limits.max_concurrent_sessions: nested keys are separated by two underscores;"
            " did you mean MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS?",
            id="single-underscore",
        ),
        pytest.param(
            "MCP_SESSIONS_MAX_CONCURRENT_SESSIONS",
            "5",
            "max_concurrent_sessions: names a key but not its table;"
            " did you mean MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS?",
            id="key-without-its-table",
        ),
        pytest.param(
            "MCP_SESSIONS_PORT",
            "9000",
            "port: names a key but not its table; did you mean MCP_SESSIONS_SERVER__PORT?",
            id="port-without-its-table",
        ),
        pytest.param(
            "MCP_SESSIONS_TIMEOUT_SECONDS",
            "3",
            "timeout_seconds: names a key but not its table; did you mean MCP_SESSIONS_SHUTDOWN__TIMEOUT_SECONDS,"
            " MCP_SESSIONS_STORE__TIMEOUT_SECONDS or MCP_SESSIONS_TOOLS__<name>__TIMEOUT_SECONDS?",
            id="key-of-several-tables",
        ),
        pytest.param(
            "MCP_SESSIONS_SERVER__TOOL_MODULES",
            "tools.demo",
            "server.tool_modules: must be JSON for a list,"
            ' e.g. MCP_SESSIONS_SERVER__TOOL_MODULES=\'["tools.demo"]\' (got "tools.demo")',
            id="list-not-json",
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS__ECHO__TIMEOUT_SECONDS",
            "500",
            "tools.echo.timeout_seconds: must not exceed limits.max_timeout_seconds, which is 300.0"
            " (built-in default); lower it or raise the cap (got 500.0)",
            id="tool-timeout-above-cap",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS__MAX_TIMEOUT_SECONDS",
            "10",
            "limits.max_timeout_seconds: must be at least limits.default_timeout_seconds, which is 30.0"
            " (built-in default); raise it or set a lower limits.default_timeout_seconds (got 10.0)",
            id="cap-below-default",
        ),
    ],
)
def test_a_bad_environment_variable_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)

    assert problems_of(None) == [f"environment variable {name}: {expected}"]


def test_a_cap_from_the_environment_is_named_in_the_file_key_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[tools.echo]\ntimeout_seconds = 120.0\n")
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_TIMEOUT_SECONDS", "100")

    assert problems_of(path) == [
        f"{path}: tools.echo.timeout_seconds: must not exceed limits.max_timeout_seconds, which is 100.0"
        " (environment variable MCP_SESSIONS_LIMITS__MAX_TIMEOUT_SECONDS); lower it or raise the cap (got 120.0)"
    ]


def test_a_bad_override_is_refused_naming_the_command_line_option(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")

    assert problems_of(path, {"server": {"port": 0}}) == [
        "command line option --port: server.port: must be between 1 and 65535 (got 0)"
    ]


def test_problems_from_every_source_are_reported_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[limits]\nmax_concurrent_sessions = 0\n")
    monkeypatch.setenv("MCP_SESSIONS_SHUTDOWN__TIMEOUT_SECONDS", "-1")

    assert problems_of(path, {"server": {"transport": "ftp"}}) == [
        "command line option --transport: server.transport: must be 'stdio' or 'streamable-http' (got \"ftp\")",
        f"{path}: limits.max_concurrent_sessions: must be between 1 and 1000000 (got 0)",
        "environment variable MCP_SESSIONS_SHUTDOWN__TIMEOUT_SECONDS: shutdown.timeout_seconds: must be at least 0.0"
        ' (got "-1")',
    ]


def test_an_off_loopback_host_is_reported_with_the_other_server_problems(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nhost = "0.0.0.0"\nport = 0\n')

    assert problems_of(path) == [
        f"{path}: server.port: must be between 1 and 65535 (got 0)",
        f"{path}: server.host: is not a loopback address, so server.allowed_hosts must list the Host header values"
        ' clients will use, e.g. ["mcp.example.com:*", "10.0.0.5:8765"], so that requests for any other host'
        ' (DNS rebinding) are refused (got "0.0.0.0")',
    ]


def test_an_off_loopback_host_with_the_transport_from_the_command_line_names_both_sources(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n')

    assert problems_of(path, {"server": {"transport": "streamable-http"}}) == [
        f'{path}: server.host: is not a loopback address and server.transport is "streamable-http"'
        " (command line option --transport), so server.allowed_hosts must list the Host header values clients"
        ' will use, e.g. ["mcp.example.com:*", "10.0.0.5:8765"], so that requests for any other host'
        ' (DNS rebinding) are refused (got "0.0.0.0")'
    ]


EXPORTER_ON_SERVER_PORT = (
    "on streamable-http, /metrics is served on server.port already; set metrics.prometheus_port = 0,"
    " or another port for a second, loopback-only exporter"
)


def test_an_exporter_on_the_http_port_itself_is_refused_naming_both_keys(tmp_path: Path) -> None:
    # It would pass, then fail to bind at start with the blame on server.port.
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nport = 9100\n[metrics]\nprometheus_port = 9100\n')

    assert problems_of(path) == [
        f"{path}: metrics.prometheus_port: is server.port too, 9100 in this file: {EXPORTER_ON_SERVER_PORT} (got 9100)"
    ]
    assert load_settings(path, {"server": {"port": 9101}}).metrics.prometheus_port == 9100  # fine once they differ
    with pytest.raises(ValidationError, match="metrics.prometheus_port"):  # built directly too (plugin mode)
        Settings(
            server=ServerSettings(transport="streamable-http", port=9100), metrics=MetricsSettings(prometheus_port=9100)
        )


def test_an_exporter_port_that_is_the_default_http_port_names_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_METRICS__PROMETHEUS_PORT", "8765")

    assert problems_of(None, {"server": {"transport": "streamable-http"}}) == [
        "environment variable MCP_SESSIONS_METRICS__PROMETHEUS_PORT: metrics.prometheus_port: is server.port too,"
        f' 8765 (built-in default): {EXPORTER_ON_SERVER_PORT} (got "8765")'
    ]
    assert load_settings(None).metrics.prometheus_port == 8765  # over stdio there is no HTTP port to clash with


@pytest.mark.parametrize(
    "host",
    ["localhost", "0.0.0.0", "::", "::1", "127.0.0.1", "10.0.0.5", "my-host.internal", "my_service", "fe80::1%eth0"],
)
def test_every_form_of_server_host_is_accepted_without_looking_the_name_up(tmp_path: Path, host: str) -> None:
    # my-host.internal resolves nowhere: the check is of the spelling, the start finds out the rest.
    path = write(tmp_path, f'[server]\nhost = "{host}"\n')

    assert load_settings(path).server.host == host
    assert Settings(server=ServerSettings(host=host)).server.host == host  # built directly too (plugin mode)


def test_a_host_with_a_port_from_the_command_line_says_to_use_the_port_option() -> None:
    assert problems_of(None, {"server": {"host": "127.0.0.1:8080"}}) == [
        'command line option --host: server.host: must not hold a port: write "127.0.0.1" and the port 8080'
        ' with --port (got "127.0.0.1:8080")'
    ]


def test_a_bad_host_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_SERVER__HOST", "[::1]")

    assert problems_of(None, {"server": {"transport": "streamable-http"}}) == [
        "environment variable MCP_SESSIONS_SERVER__HOST: server.host: is an IPv6 address in brackets: write it"
        ' without them, "::1" (brackets are for URLs and Host headers) (got "[::1]")'
    ]


def test_a_bad_host_is_reported_alone_not_also_as_an_off_loopback_host(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nhost = "http://0.0.0.0"\n')

    [problem] = problems_of(path)

    assert problem.startswith(f"{path}: server.host: must be an address or a host name, not a URL:"), problem
    assert "allowed_hosts" not in problem


def test_allowed_hosts_in_every_documented_form_are_accepted(tmp_path: Path) -> None:
    hosts = ["mcp.example.com:*", "10.0.0.5:8765", "[::1]:*", "[2001:db8::1]:443", "my-host", "a.b.c:65535"]
    path = write(tmp_path, f"[server]\nallowed_hosts = {hosts!r}\n".replace("'", '"'))

    assert load_settings(path).server.allowed_hosts == tuple(hosts)


def test_a_bad_allowed_host_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_SERVER__ALLOWED_HOSTS", '["ok.example.com:*", "http://x.com"]')

    assert problems_of(None) == [
        "environment variable MCP_SESSIONS_SERVER__ALLOWED_HOSTS: server.allowed_hosts.1: must be a Host header"
        ' value without a scheme, e.g. "x.com:*" (got "http://x.com")'
    ]


@pytest.mark.parametrize(
    ("name", "example"),
    [
        pytest.param("MCP_SESSIONS_SERVER__ALLOWED_HOSTS", '["mcp.example.com:*"]', id="allowed-hosts-list"),
        pytest.param("MCP_SESSIONS_SERVER__TOOL_MODULES", '["tools.demo"]', id="tool-modules-list"),
        pytest.param("MCP_SESSIONS_TOOLS__ECHO", '{"timeout_seconds": 60}', id="one-tool-table"),
        pytest.param("MCP_SESSIONS_TOOLS", '{"my_tool": {"timeout_seconds": 60}}', id="tools-table"),
        pytest.param("MCP_SESSIONS_SERVER", '{"port": 8765}', id="section-table"),
        pytest.param("MCP_SESSIONS_LIMITS", '{"max_concurrent_sessions": 100}', id="limits-table"),
    ],
)
def test_bad_json_in_a_variable_gets_an_example_of_the_shape_its_key_takes(
    monkeypatch: pytest.MonkeyPatch, name: str, example: str
) -> None:
    monkeypatch.setenv(name, "[oops")
    shape = "a list" if example.startswith("[") else "a table"
    key = name.removeprefix("MCP_SESSIONS_").lower().replace("__", ".")

    assert problems_of(None) == [
        f"environment variable {name}: {key}: must be JSON for {shape}, e.g. {name}='{example}' (got \"[oops\")"
    ]


def test_json_in_a_variable_nesting_deeper_than_the_json_reader_is_refused_like_bad_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # json.loads recursed past the interpreter's limit: a traceback and exit 1 at start, where the
    # problems of the config are listed (exit 2).
    monkeypatch.setenv("MCP_SESSIONS_SERVER__ALLOWED_HOSTS", "[" * 5000 + "]" * 5000)
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS", "0")

    assert problems_of(None) == [
        "environment variable MCP_SESSIONS_SERVER__ALLOWED_HOSTS: server.allowed_hosts: its JSON nests more than "
        "32 levels deep (a config value nests a few)",
        "environment variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS: limits.max_concurrent_sessions: "
        'must be between 1 and 1000000 (got "0")',
    ]


@pytest.mark.parametrize("levels", range(900, 1010, 5))
def test_json_in_a_variable_nesting_near_the_json_reader_s_limit_is_a_problem_never_a_crash(
    monkeypatch: pytest.MonkeyPatch, levels: int
) -> None:
    # Near the limit, the environment source's reader gave up (RecursionError) where json.loads, a few
    # frames shallower, did not: the variable was not reported, and the second read crashed.
    monkeypatch.setenv("MCP_SESSIONS_TOOLS", '{"a":' * levels + "1" + "}" * levels)

    [problem] = problems_of(None)

    assert problem.startswith("environment variable MCP_SESSIONS_TOOLS: tools"), problem


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param(
            "MCP_SESSIONS_LIMITS",
            '{"max_concurrent_sessions": true}',
            "limits.max_concurrent_sessions: must be a whole number (got true)",
            id="section",
        ),
        pytest.param(
            "MCP_SESSIONS_SERVER", '{"port": true}', "server.port: must be a whole number (got true)", id="port"
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS",
            '{"echo": {"timeout_seconds": false}}',
            "tools.echo.timeout_seconds: must be a number (got false)",
            id="tools",
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS__ECHO",
            '{"max_concurrent": true}',
            "tools.echo.max_concurrent: must be a whole number (got true)",
            id="one-tool",
        ),
    ],
)
def test_a_json_boolean_for_a_number_in_a_variable_is_refused_as_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    # Taken as 1 or 0: MCP_SESSIONS_LIMITS='{"max_concurrent_sessions": true}' gave a cap of 1,
    # where `max_concurrent_sessions = true` in the file is refused.
    monkeypatch.setenv(name, value)

    assert problems_of(None) == [f"environment variable {name}: {expected}"]
    key, _, reason = expected.partition(": ")
    table, _, leaf = key.rpartition(".")
    path = write(tmp_path, f"[{table}]\n{leaf} = {expected.rsplit('got ', 1)[1].rstrip(')')}\n")
    monkeypatch.delenv(name)
    assert problems_of(path) == [f"{path}: {key}: {reason}"]


def test_a_json_string_for_a_table_in_a_variable_is_called_json_that_is_not_an_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # '"x"' is JSON (a string), so "must be JSON for a table" misled; text that is not JSON keeps it.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS", '"x"')
    [json_string] = problems_of(None)
    monkeypatch.setenv("MCP_SESSIONS_LIMITS", "x")
    [not_json] = problems_of(None)

    example = "MCP_SESSIONS_LIMITS='{\"max_concurrent_sessions\": 100}'"
    assert (
        json_string
        == f'environment variable MCP_SESSIONS_LIMITS: limits: must be a JSON object, e.g. {example} (got "x")'
    )
    assert not_json.startswith(
        f"environment variable MCP_SESSIONS_LIMITS: limits: must be JSON for a table, e.g. {example}"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param(
            "MCP_SESSIONS_LIMITS",
            "null",
            "limits: must be a JSON object, e.g. MCP_SESSIONS_LIMITS='{\"max_concurrent_sessions\": 100}' (got null)",
            id="section",
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS",
            "null",
            'tools: must be a JSON object, e.g. MCP_SESSIONS_TOOLS=\'{"my_tool": {"timeout_seconds": 60}}\' (got null)',
            id="tools",
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS__ECHO",
            "null",
            "tools.echo: must be a JSON object, e.g. MCP_SESSIONS_TOOLS__ECHO='{\"timeout_seconds\": 60}' (got null)",
            id="one-tool",
        ),
        pytest.param(
            "MCP_SESSIONS_TOOLS",
            '{"echo": null}',
            'tools.echo: must be a JSON object, e.g. {"timeout_seconds": 60} (got null)',
            id="a-tool-in-the-tools-json",
        ),
        pytest.param(
            "MCP_SESSIONS_LIMITS",
            '{"max_queued": null}',
            "limits.max_queued: must be a whole number (got null)",
            id="a-key-in-the-section-json",
        ),
    ],
)
def test_json_null_in_a_variable_is_refused_and_shown_as_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    # MCP_SESSIONS_LIMITS=null was dropped unsaid, and the file's [limits] stayed in force; a null
    # elsewhere was shown as Python's None.
    path = write(tmp_path, "[limits]\nmax_concurrent_sessions = 7\n[tools.echo]\ntimeout_seconds = 2.0\n")
    monkeypatch.setenv(name, value)

    assert problems_of(path) == [f"environment variable {name}: {expected}"]


# -- a password in store.url is never echoed ---------------------------------------------

MALFORMED_URLS = [
    pytest.param("reds://:hunter2@h:6379/0", "reds://:***@h:6379/0", id="misspelt-scheme"),
    pytest.param("http://user:hunter2@x/0", "http://user:***@x/0", id="http-scheme"),
    pytest.param("user:hunter2@cache:6379", "user:***@cache:6379", id="no-scheme"),
    pytest.param("redis//:hunter2@h", "redis//:***@h", id="no-colon-after-scheme"),
    pytest.param("reds://:hunter2/with/slash@h/0", "reds://:***@h/0", id="password-with-slash"),
    pytest.param("reds://h:6379/0?password=hunter2", "reds://h:6379/0?password=***", id="password-in-query"),
]


@pytest.mark.parametrize(("url", "shown"), MALFORMED_URLS)
def test_a_malformed_store_url_is_refused_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, shown: str
) -> None:
    reason = "must be a Redis URL starting with redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0"
    path = write(tmp_path, f'[store]\nurl = "{url}"\n')
    assert problems_of(path) == [f'{path}: store.url: {reason} (got "{shown}")']

    monkeypatch.setenv("MCP_SESSIONS_STORE__URL", url)
    assert problems_of(None) == [f'environment variable MCP_SESSIONS_STORE__URL: store.url: {reason} (got "{shown}")']


def test_a_url_given_where_the_store_table_belongs_is_not_echoed_with_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [in_file] = problems_of(write(tmp_path, 'store = "redis://:hunter2@h:6379/0"\n'))
    monkeypatch.setenv("MCP_SESSIONS_STORE", "redis://:hunter2@h:6379/0")
    [in_env] = problems_of(None)

    assert "store: must be a table" in in_file and "redis://:***@h:6379/0" in in_file
    assert "store: must be JSON for a table" in in_env and "redis://:***@h:6379/0" in in_env
    assert "hunter2" not in in_file + in_env


PORT = "the port must be a number from 1 to 65535, e.g. redis://127.0.0.1:6379/0"
ENCODE = "(a password holding / ? # or @ must be percent-encoded, e.g. / as %2F)"
MISSHAPEN_URLS = [
    pytest.param("redis://127.0.0.1:notaport/0", PORT, id="port-not-a-number"),
    pytest.param("redis://127.0.0.1:99999/0", PORT, id="port-out-of-range"),
    pytest.param("redis://127.0.0.1:0/0", PORT, id="port-zero"),
    pytest.param(
        "redis://[::1/0", "is not a valid URL: an IPv6 host must be in brackets, e.g. redis://[::1]:6379/0", id="ipv6"
    ),
    pytest.param(
        "redis://h:6379/abc",
        "the path must be the database index, a whole number, e.g. redis://127.0.0.1:6379/0",
        id="database-not-a-number",
    ),
    pytest.param(
        "redis://h:6379/-1",
        "the path must be the database index, a whole number, e.g. redis://127.0.0.1:6379/0",
        id="database-negative",
    ),
    pytest.param("redis:///0", "names no host, e.g. redis://127.0.0.1:6379/0", id="no-host"),
    pytest.param(
        "unix://", "must give the socket's absolute path after unix://, e.g. unix:///run/redis.sock", id="unix-no-path"
    ),
    pytest.param(
        "unix://run/redis.sock",
        "must give the socket's absolute path after unix://, e.g. unix:///run/redis.sock",
        id="unix-relative-path",
    ),
    pytest.param(
        "redis://h/0?socket_timeout=abc",
        "is not a URL redis-py accepts: Invalid value for 'socket_timeout' in connection URL.",
        id="query-value-redis-py-refuses",
    ),
    pytest.param(
        "redis://h/0?db=x",
        "is not a URL redis-py accepts: Invalid value for 'db' in connection URL.",
        id="query-database-not-a-number",
    ),
]


@pytest.mark.parametrize(("url", "reason"), MISSHAPEN_URLS)
def test_a_store_url_redis_py_could_not_connect_with_is_a_config_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, reason: str
) -> None:
    path = write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{url}"\n')
    assert problems_of(path) == [f'{path}: store.url: {reason} (got "{url}")']

    monkeypatch.setenv("MCP_SESSIONS_STORE__URL", url)
    monkeypatch.setenv("MCP_SESSIONS_STORE__BACKEND", "redis")
    assert problems_of(None) == [f'environment variable MCP_SESSIONS_STORE__URL: store.url: {reason} (got "{url}")']


@pytest.mark.parametrize(
    ("url", "shown", "reason"),
    [
        pytest.param(
            "redis://app:hunter2@h:notaport/0",
            "redis://app:***@h:notaport/0",
            f"the port must be a number from 1 to 65535 {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="bad-port",
        ),
        pytest.param(
            "redis://app:hunter2/x@h:6379/0",
            "redis://app:***@h:6379/0",
            f"the port must be a number from 1 to 65535 {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="unescaped-slash-in-password",
        ),
        pytest.param(
            "redis://:hunter2#x@h/0",
            "redis://:***@h/0",
            f"the port must be a number from 1 to 65535 {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="unescaped-hash-in-password",
        ),
        pytest.param(
            "redis://:hunter2@/0",
            "redis://:***@/0",
            f"names no host {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="no-host",
        ),
        pytest.param(
            # The parser takes "ss" for the host and "/word@host:6379/0" for the path, while the
            # masked URL shown has a valid path: only the hint says what is wrong.
            "redis://:p@ss/word@host:6379/0",
            "redis://:***@host:6379/0",
            f"the path must be the database index, a whole number {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="unescaped-at-and-slash-in-password",
        ),
        pytest.param(
            # "app:123" parses as host and port, "/x@h:6379/0" as the path.
            "redis://app:123/x@h:6379/0",
            "redis://app:***@h:6379/0",
            f"the path must be the database index, a whole number {ENCODE}, e.g. redis://127.0.0.1:6379/0",
            id="unescaped-slash-in-numeric-password",
        ),
        pytest.param(
            # One '@' and no '/' before it: the password is read whole; the path itself is wrong.
            "redis://app:hunter2@h:6379/abc",
            "redis://app:***@h:6379/abc",
            "the path must be the database index, a whole number, e.g. redis://127.0.0.1:6379/0",
            id="database-not-a-number",
        ),
        pytest.param(
            # An '@' in the query is no password's: no hint. (The mask still runs to the last '@':
            # it never guesses where a password holding an unescaped '?' would end.)
            "redis://app:hunter2@h:6379/abc?client_name=a@b",
            "redis://app:***@b",
            "the path must be the database index, a whole number, e.g. redis://127.0.0.1:6379/0",
            id="at-in-the-query",
        ),
    ],
)
def test_a_misshapen_store_url_with_a_password_is_refused_without_echoing_it(
    tmp_path: Path, url: str, shown: str, reason: str
) -> None:
    path = write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{url}"\n')
    [problem] = problems_of(path)
    assert problem == f'{path}: store.url: {reason} (got "{shown}")'
    password = url.split("://", 1)[1].rpartition("@")[0].partition(":")[2]
    assert password not in problem


def test_a_query_argument_redis_py_would_crash_on_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"store": {"backend": "redis", "url": "redis://h:6379/0?sockettimeout=1"}})
    message = str(caught.value)
    assert "store.url" in message and "query argument 'sockettimeout' is not a connection option" in message
    assert "client_name" in message  # the known ones are listed
    # ...but not those refused because they would override store.timeout_seconds.
    known = message.split("(known: ", 1)[1].split(")", 1)[0].split(", ")
    assert "socket_keepalive" in known
    assert "socket_timeout" not in known and "socket_connect_timeout" not in known
    # TLS options only where the connection is TLS.
    with pytest.raises(ValidationError, match="'ssl_certfile' is not a connection option"):
        StoreSettings(backend="redis", url="redis://h:6379/0?ssl_certfile=/c.pem")
    tls = StoreSettings(backend="redis", url="rediss://h:6380/1?ssl_cert_reqs=required&client_name=tools")
    assert tls.url.endswith("client_name=tools")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("max_connections=-1", '"max_connections" must be a positive integer'),
        ("protocol=9", "protocol must be either 2 or 3"),
    ],
)
def test_a_query_argument_value_redis_py_refuses_is_refused_at_validation_without_the_password(
    tmp_path: Path, query: str, reason: str
) -> None:
    # redis-py refuses these values only when it builds the pool or a connection (no socket is
    # opened for either): at startup they were a traceback (exit 1) or "cannot reach the store".
    path = write(tmp_path, f'[store]\nbackend = "redis"\nurl = "redis://:s3cret@h:6379/0?{query}"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: store.url: has a query argument redis-py refuses: {reason}"), problem
    assert "s3cret" not in problem


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_a_connection_cap_below_what_a_replica_needs_is_refused(tmp_path: Path, cap: int) -> None:
    # redis-py accepts any positive cap, but its pool refuses a command at once when every
    # connection is in use: the listener to the other replicas keeps one for good (at 1 every
    # call was refused, forever), and the replica's own tasks may each hold one at a time (at 2,
    # an admission meeting the housekeeping was refused).
    path = write(tmp_path, f'[store]\nbackend = "redis"\nurl = "redis://:s3cret@h:6379/0?max_connections={cap}"\n')
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}: store.url: query argument 'max_connections' must be at least 5 (got {cap}): "
    ), problem
    assert "s3cret" not in problem


@pytest.mark.parametrize("query", ["max_connections=5", "max_connections=0"])
def test_a_connection_cap_a_replica_can_work_with_is_accepted(query: str) -> None:
    # 0 is redis-py's own default (no cap of its own choosing), not a pool of none.
    assert StoreSettings(backend="redis", url=f"redis://h:6379/0?{query}").url.endswith(query)


@pytest.mark.parametrize("argument", ["socket_timeout", "socket_connect_timeout"])
def test_a_query_argument_that_would_override_store_timeout_seconds_is_refused(argument: str) -> None:
    # redis-py lets a URL's own timeout win over the one the store passes, silently unbounding
    # (or shortening) every round trip that store.timeout_seconds is documented to bound.
    with pytest.raises(ValidationError) as caught:
        StoreSettings(backend="redis", url=f"redis://h:6379/0?{argument}=30")
    message = str(caught.value)
    assert f"query argument '{argument}' would override store.timeout_seconds" in message
    assert "set store.timeout_seconds instead" in message


def test_with_the_memory_backend_only_the_url_shape_is_checked() -> None:
    # The url is not used with the memory backend: redis-py is not asked about its query
    # (nor imported for it), but a URL of the wrong shape is refused as soon as it is written.
    assert StoreSettings(url="redis://h:6379/0?sockettimeout=1").backend == "memory"
    with pytest.raises(ValidationError, match="the port must be a number"):
        StoreSettings(url="redis://h:99999/0")


def test_without_redis_py_installed_the_url_shape_is_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # redis is an optional extra: with it missing, the urllib checks still catch a bad port.
    monkeypatch.setitem(sys.modules, "redis.connection", None)  # `import` then raises ImportError
    with pytest.raises(ValidationError, match="the port must be a number"):
        StoreSettings(backend="redis", url="redis://127.0.0.1:notaport/0")
    assert StoreSettings(backend="redis", url="redis://h:6379/0?client_name=x").backend == "redis"


def test_an_embedding_host_building_settings_with_a_bad_store_url_gets_the_key_and_reason_at_construction() -> None:
    url = "redis://127.0.0.1:notaport/0"
    with pytest.raises(ValidationError) as caught:
        SessionsExtension(Settings.model_validate({"store": {"backend": "redis", "url": url}}))
    [error] = caught.value.errors()
    assert (error["loc"], error["msg"]) == (("store", "url"), f"Value error, {PORT}")
    with pytest.raises(ValidationError) as built:
        SessionsExtension(Settings(store=StoreSettings(backend="redis", url=url)))
    [error] = built.value.errors()
    assert (error["loc"], error["msg"]) == (("url",), f"Value error, {PORT}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("redis://app:pass/word@h:6379/0", "redis://app:***@h:6379/0", id="slash-in-password"),
        pytest.param("redis://:pa?ss@h/0", "redis://:***@h/0", id="question-mark-in-password"),
        pytest.param("redis://:pa#ss@h/0", "redis://:***@h/0", id="hash-in-password"),
        pytest.param("redis://h:6379/0?password=hunter2&db=1", "redis://h:6379/0?password=***&db=1", id="query"),
        pytest.param("rediss://app@cache/1", "rediss://app@cache/1", id="user-only"),
    ],
)
def test_a_valid_store_url_is_shown_without_its_password_whatever_it_contains(url: str, shown: str) -> None:
    assert safe_url(url) == shown


# -- each problem names its own source, once ---------------------------------------------


def test_problems_from_the_environment_and_the_command_line_are_not_labelled_with_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS", "abc")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"server": {"port": 0}})

    assert config_problems(caught.value, path) == [
        "command line option --port: server.port: must be between 1 and 65535 (got 0)",
        "environment variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS: limits.max_concurrent_sessions:"
        ' must be a whole number (got "abc")',
    ]


def test_a_later_check_names_the_source_of_each_tool_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[tools.nosuchtool]\ntimeout_seconds = 1.0\n")
    monkeypatch.setenv("MCP_SESSIONS_TOOLS__OTHERTOOL__TIMEOUT_SECONDS", "2")
    settings = load_settings(path)

    with pytest.raises(ConfigError) as caught:
        check_tool_overrides(settings, [])
    first, second = sorted(config_problems(caught.value, path), key=lambda problem: "tools.nosuchtool" not in problem)

    assert first == (
        f"{path}: tools.nosuchtool: no hosted tool has this name (no tool is hosted besides the session tools)"
    )
    assert second.startswith(
        "environment variable MCP_SESSIONS_TOOLS__OTHERTOOL__TIMEOUT_SECONDS: tools.othertool: no hosted tool"
    )


def test_notes_and_reload_changes_write_a_tool_name_with_a_dot_as_toml_does() -> None:
    from server.reload import changes

    old = load_settings(None, {"limits": {"max_concurrent_sessions": 10}})
    new = load_settings(
        None, {"limits": {"max_concurrent_sessions": 10}, "tools": {"my.tool": {"max_concurrent": 500}}}
    )

    [note] = new.ineffective()
    assert note.startswith('tools."my.tool".max_concurrent (500) is above limits.max_concurrent_sessions'), note
    assert 'tools."my.tool".max_concurrent' in changes(old, new)


def test_a_table_for_no_hosted_tool_lists_a_few_hosted_ones_not_thousands(tmp_path: Path) -> None:
    # With 5,000 tools every such problem listed them all (34 KB a line): a reload's log line,
    # cut at 8 KB, lost the other problems and the "did you mean" hint.
    path = write(tmp_path, "[tools.t1x]\ntimeout_seconds = 1.0\n[tools.zz]\ntimeout_seconds = 1.0\n")
    hosted = [f"t{index}" for index in range(5000)]

    with pytest.raises(ConfigError) as caught:
        check_tool_overrides(load_settings(path), hosted)

    first, second = config_problems(caught.value, path)
    listed = "hosted: t0, t1, t10, t100, t1000, t1001, t1002, t1003, t1004, t1005, t1006, t1007, t1008, t1009, "
    assert first.startswith(f"{path}: tools.t1x: no hosted tool has this name ({listed}"), first
    assert "... and 4,980 more of 5,000)" in first and first.endswith("did you mean 't1'?"), first
    assert len(first) < 400 and len(second) < 400, (len(first), len(second))


def test_a_later_check_writes_a_tool_name_with_a_dot_as_toml_does_and_names_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `[tools."my.tool"]` was reported as `tools.my.tool`, a table `my` with a key `tool`.
    path = write(tmp_path, '[tools."my.tool"]\ntimeout_seconds = 1.0\n')
    monkeypatch.setenv("MCP_SESSIONS_TOOLS", '{"a.b": {"timeout_seconds": 2}}')
    settings = load_settings(path)

    with pytest.raises(ConfigError) as caught:
        check_tool_overrides(settings, [])

    hosted = "no hosted tool has this name (no tool is hosted besides the session tools)"
    assert sorted(config_problems(caught.value, path)) == sorted(
        [f'environment variable MCP_SESSIONS_TOOLS: tools."a.b": {hosted}', f'{path}: tools."my.tool": {hosted}']
    )


def test_a_table_for_a_session_tool_is_refused_since_it_would_do_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[tools.session_create]\ntimeout_seconds = 5.0\n[tools.session_metrics]\n")
    monkeypatch.setenv("MCP_SESSIONS_TOOLS__SERVER_SHUTDOWN__TIMEOUT_SECONDS", "2")
    settings = load_settings(path)

    with pytest.raises(ConfigError) as caught:
        check_tool_overrides(settings, [])

    reason = (
        "per-tool settings do not apply to the session tools: no per-tool deadline, cap or idle timeout holds them"
        " (they answer even when the server is full)"
    )
    assert sorted(config_problems(caught.value, path)) == sorted(
        [
            f"{path}: tools.session_create: {reason}; a session's deadline is session_create's timeout_seconds"
            " argument, else limits.default_timeout_seconds; remove it",
            f"{path}: tools.session_metrics: {reason}; remove it",
            "environment variable MCP_SESSIONS_TOOLS__SERVER_SHUTDOWN__TIMEOUT_SECONDS: tools.server_shutdown:"
            f" {reason}; the drain's deadline is server_shutdown's timeout_seconds argument, else"
            " shutdown.timeout_seconds; remove it",
        ]
    )


def test_a_reload_adding_a_table_for_a_session_tool_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntool_modules = ["tools.demo"]\n')
    app = build_app(load_settings(path))
    write(tmp_path, '[server]\ntool_modules = ["tools.demo"]\n[tools.session_release]\nmax_concurrent = 1\n')

    assert app.reloader(path).reload() is False
    assert app.sessions.config.tools == {}


def test_a_reload_adding_a_tool_module_with_a_table_for_its_tool_says_the_module_takes_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, '[server]\ntool_modules = ["tools.demo"]\n')
    app = build_app(load_settings(path))
    module = "tests.fixtures_config.good_tools"  # not imported by a reload: it takes a restart
    write(tmp_path, f'[server]\ntool_modules = ["tools.demo", "{module}"]\n[tools.held]\nmax_concurrent = 1\n')

    with caplog.at_level(logging.ERROR, logger="server.reload"):
        assert app.reloader(path).reload() is False
    [record] = caplog.records
    assert (
        f"{path}: tools.held: no hosted tool has this name (hosted: count_slowly, echo, fail, sleep_async, "
        "sleep_blocking); server.tool_modules changed in the file, "
        "which takes a restart: the tools of its new modules are not hosted until then"
    ) in record.getMessage(), record.getMessage()
    assert app.sessions.config.tools == {}


def test_a_tool_name_that_differs_only_in_case_says_why_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Environment variable names are not case-sensitive: the tool's name arrives in lower case.
    monkeypatch.setenv("MCP_SESSIONS_TOOLS__Search__TIMEOUT_SECONDS", "5")
    path = write(tmp_path, "[tools.SLEEP_ASYNC]\ntimeout_seconds = 1.0\n")
    settings = load_settings(path)

    def Search(q: str) -> str:  # noqa: N802 - a host's tool named in capitals
        return q

    def sleep_async() -> None: ...

    with pytest.raises(ConfigError) as caught:
        check_tool_overrides(settings, [Search, sleep_async])
    problems = sorted(config_problems(caught.value, path))

    hint = "tool names are case-sensitive (names in environment variables arrive in lower case): write"
    assert problems == [
        f"{path}: tools.SLEEP_ASYNC: no hosted tool has this name (hosted: Search, sleep_async);"
        f" {hint} [tools.sleep_async] in the config file,"
        ' or {"sleep_async": ...} in MCP_SESSIONS_TOOLS (JSON)',
        "environment variable MCP_SESSIONS_TOOLS__Search__TIMEOUT_SECONDS: tools.search: no hosted tool has this"
        " name (hosted: Search, sleep_async);"
        f' {hint} [tools.Search] in the config file, or {{"Search": ...}} in MCP_SESSIONS_TOOLS (JSON)',
    ], problems


def test_a_later_check_with_no_file_names_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_SERVER__TOOL_MODULES", '["tests.fixtures_config.no_tools"]')
    settings = load_settings(None)

    with pytest.raises(ConfigError) as caught:
        load_tool_modules(settings.server.tool_modules)

    assert config_problems(caught.value, None) == [
        "environment variable MCP_SESSIONS_SERVER__TOOL_MODULES: server.tool_modules:"
        " 'tests.fixtures_config.no_tools': the module has no TOOLS list (TOOLS = [my_tool, ...])"
    ]


def test_a_variable_that_is_not_json_is_reported_with_the_problems_of_the_other_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MCP_SESSIONS_SERVER__ALLOWED_HOSTS", "[oops")
    monkeypatch.setenv("MCP_SESSIONS_SERVER__PORT", "0")

    assert problems_of(None) == [
        "environment variable MCP_SESSIONS_SERVER__ALLOWED_HOSTS: server.allowed_hosts: must be JSON for a list,"
        ' e.g. MCP_SESSIONS_SERVER__ALLOWED_HOSTS=\'["mcp.example.com:*"]\' (got "[oops")',
        'environment variable MCP_SESSIONS_SERVER__PORT: server.port: must be between 1 and 65535 (got "0")',
    ]


def test_log_level_and_format_are_read_in_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python's logging spells levels in capitals, and operators often do too.
    path = tmp_path / "c.toml"
    path.write_text('[logging]\nlevel = "WARNING"\nformat = "JSON"\n', encoding="utf-8")
    from_file = load_settings(path)
    monkeypatch.setenv("MCP_SESSIONS_LOGGING__LEVEL", "DEBUG")
    from_environment = load_settings(path)

    assert (from_file.logging.level, from_file.logging.format) == ("warning", "json")
    assert from_environment.logging.level == "debug"


def test_settings_that_cannot_take_effect_are_named_and_a_sound_config_has_none() -> None:
    sound = Settings(
        limits=LimitsSettings(max_concurrent_sessions=10, max_sessions_per_client=10, default_timeout_seconds=30),
        tools={"a": ToolSettings(max_concurrent=10, idle_timeout_seconds=29.5)},
    )
    assert sound.ineffective() == []
    odd = Settings(
        limits=LimitsSettings(
            max_concurrent_sessions=4, max_sessions_per_client=8, default_timeout_seconds=30, max_abandoned_threads=0
        ),
        tools={"b": ToolSettings(idle_timeout_seconds=30), "a": ToolSettings(max_concurrent=5)},
    )
    assert odd.ineffective() == [
        "limits.max_sessions_per_client (8) is above limits.max_concurrent_sessions (4): "
        "the server-wide cap is reached first",
        "limits.max_abandoned_threads is 0: every call of a sync tool is refused (capacity_exceeded), "
        "even with no thread stuck; set it to 1 or more to serve sync tools",
        "tools.a.max_concurrent (5) is above limits.max_concurrent_sessions (4): the server-wide cap is reached first",
        "tools.b.idle_timeout_seconds (30) is not below the call's deadline (30, limits.default_timeout_seconds): "
        "a call reaches its deadline first, so the idle timeout never fires",
    ]


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_an_admin_token_variable_that_is_unset_or_empty_over_http_is_named_as_a_note(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    # server_shutdown over HTTP would be refused at its first call: the note says so at the check.
    if value is None:
        monkeypatch.delenv("MY_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("MY_ADMIN_TOKEN", value)
    http = Settings(
        server=ServerSettings(transport="streamable-http"), shutdown=ShutdownSettings(admin_token_env="MY_ADMIN_TOKEN")
    )

    state = "is not set" if value is None else "is empty"
    assert http.ineffective() == [
        f"shutdown.admin_token_env names the environment variable MY_ADMIN_TOKEN, which {state} in the server's"
        " environment: server_shutdown over streamable HTTP is refused (unauthorized) until the server is restarted"
        " with MY_ADMIN_TOKEN set to a non-empty token (SIGINT or SIGTERM still stop it)"
    ]
    # Over stdio no token is needed; a set variable is what the key asks for; its value is never named.
    assert http.model_copy(update={"server": ServerSettings(transport="stdio")}).ineffective() == []
    monkeypatch.setenv("MY_ADMIN_TOKEN", "hunter2")
    assert http.ineffective() == []


def test_a_misspelt_tool_table_is_told_the_close_name_and_the_hosted_list_leaves_out_the_session_tools(
    tmp_path: Path,
) -> None:
    # The session tools are not offered: a table for one is refused by the same check.
    path = write(
        tmp_path, '[server]\ntool_modules = ["tools.demo"]\n[tools.ecko]\ntimeout_seconds = 1.0\n[tools.zzz]\n'
    )

    with pytest.raises(ConfigError) as caught:
        build_app(load_settings(path))

    assert config_problems(caught.value, path) == [
        f"{path}: tools.ecko: no hosted tool has this name (hosted: count_slowly, echo, fail, sleep_async,"
        " sleep_blocking); did you mean 'echo'?",
        f"{path}: tools.zzz: no hosted tool has this name (hosted: count_slowly, echo, fail, sleep_async,"
        " sleep_blocking)",
    ]


@pytest.mark.parametrize(
    "build",
    [
        lambda: StoreSettings(backend="redis", url="redis://:p@ss/hunter2@host:6379/0"),
        lambda: Settings(store={"backend": "redis", "url": "redis://:p@ss/hunter2@host:6379/0"}),  # type: ignore[arg-type]
        lambda: Settings(store={"backend": "redis", "url": "redis://:hunter2@host:6379/0", "timeout_seconds": "x"}),  # type: ignore[arg-type]
        lambda: Settings(shutdown={"admin_token_env": "hunter2 token"}),  # type: ignore[arg-type]
        lambda: ShutdownSettings(admin_token_env="hunter2 token"),
    ],
    ids=["StoreSettings", "Settings-url", "Settings-other-key", "admin-token", "ShutdownSettings"],
)
def test_settings_built_directly_never_echo_a_refused_value_that_may_be_a_secret(build: Callable[[], Any]) -> None:
    # A host may log the ValidationError as it is; pydantic's text would hold the whole input.
    with pytest.raises(ValidationError) as raised:
        build()
    assert "hunter2" not in str(raised.value), str(raised.value)
    assert raised.value.errors()[0]["loc"][-1] in {"url", "timeout_seconds", "admin_token_env"}
