"""The `[store]` keys through the CLI: defaults, environment overrides, and each mistake refused
with exit status 2 naming the source, the key and the reason (`--check-config`, and a real start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e_cli.test_cli import assert_refused, problems, run, write

DEFAULT_STORE = {
    "backend": "memory",
    "url": "redis://127.0.0.1:6379/0",
    "key_prefix": "mcp-sessions:",
    "timeout_seconds": 1.0,
}

#: (the [store] section's body, the key path the problem must name, a fragment of the reason).
MISTAKES = [
    pytest.param('backend = "foo"\n', "store.backend", "redis", id="unknown-backend"),
    pytest.param('backend = "Redis"\n', "store.backend", "redis", id="backend-wrong-case"),
    pytest.param('url = "http://127.0.0.1:6379/0"\n', "store.url", "redis://", id="http-url"),
    pytest.param('url = "127.0.0.1:6379"\n', "store.url", "redis://", id="url-without-scheme"),
    pytest.param('url = ""\n', "store.url", "", id="empty-url"),
    pytest.param("url = 6379\n", "store.url", "string", id="url-not-a-string"),
    pytest.param('key_prefix = ""\n', "store.key_prefix", "", id="empty-key-prefix"),
    pytest.param("timeout_seconds = 0\n", "store.timeout_seconds", "must be", id="zero-timeout"),
    pytest.param("timeout_seconds = -1.0\n", "store.timeout_seconds", "must be", id="negative-timeout"),
    pytest.param("timeout_seconds = nan\n", "store.timeout_seconds", "finite", id="nan-timeout"),
    pytest.param('urll = "redis://127.0.0.1:6379/0"\n', "store.urll", "did you mean 'url'", id="typo-in-key"),
    # redis-py takes these, but the listener to the other replicas holds one connection for good
    # and the pool refuses a command at once when all are in use: at 1, every call, forever.
    pytest.param(
        'url = "redis://127.0.0.1:6379/0?max_connections=1"\n',
        "store.url",
        "'max_connections' must be at least 5 (got 1)",
        id="max-connections-1",
    ),
    pytest.param(
        'url = "redis://127.0.0.1:6379/0?max_connections=4"\n',
        "store.url",
        "'max_connections' must be at least 5 (got 4)",
        id="max-connections-4",
    ),
]


def test_the_store_defaults_to_memory(tmp_path: Path) -> None:
    result = run("--check-config")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store"] == DEFAULT_STORE


@pytest.mark.parametrize(("body", "key", "reason"), MISTAKES)
def test_a_store_mistake_is_refused_with_exit_2(tmp_path: Path, body: str, key: str, reason: str) -> None:
    section = body if body.startswith("backend") else f'backend = "redis"\n{body}'
    path = write(tmp_path, f"[store]\n{section}")

    result = run("--config", str(path), "--check-config")

    assert_refused(result)
    reported = problems(result)
    assert len(reported) == 1, reported
    [problem] = reported
    assert problem.startswith(f"{path}: {key}"), problem
    assert reason in problem, problem


@pytest.mark.parametrize("body", ['backend = "foo"\n', 'url = "http://x"\n'], ids=["backend", "url"])
def test_a_store_mistake_stops_a_real_start_with_exit_2(tmp_path: Path, body: str) -> None:
    path = write(tmp_path, f"[store]\n{body}")

    result = run("--config", str(path), "--transport", "streamable-http", "--port", "1")

    assert_refused(result)
    assert len(problems(result)) == 1


def test_the_store_url_comes_from_the_environment(shared_redis_url: str) -> None:
    env = {"MCP_SESSIONS_STORE__BACKEND": "redis", "MCP_SESSIONS_STORE__URL": shared_redis_url}

    result = run("--check-config", env=env)

    assert result.returncode == 0, result.stderr
    store = json.loads(result.stdout)["store"]
    assert store["backend"] == "redis" and store["url"] == shared_redis_url, store


def test_a_bad_store_url_in_the_environment_names_the_variable() -> None:
    result = run("--check-config", env={"MCP_SESSIONS_STORE__URL": "http://127.0.0.1:6379/0"})

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith("environment variable MCP_SESSIONS_STORE__URL: store.url:"), problem
    assert "redis://" in problem, problem
