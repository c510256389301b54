"""The `[store]` keys through the CLI: defaults, environment overrides, and each mistake refused
with exit status 2 naming the source, the key and the reason (`--check-config`, and a real start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.conftest import pem_pair
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


#: (query of a rediss:// URL, `{dir}` for the test's folder; a fragment of the reason). redis-py
#: loads these files only as it connects, and its error then blamed the host: "cannot reach ...
#: Error 2 connecting to 127.0.0.1:PORT. No such file or directory".
TLS_FILE_MISTAKES = [
    pytest.param(
        "ssl_ca_certs=/nonexistent/ca.pem",
        "query argument 'ssl_ca_certs' names '/nonexistent/ca.pem', which cannot be read: No such file or directory",
        id="missing-ca",
    ),
    pytest.param(
        "ssl_certfile={dir}/nope.pem&ssl_keyfile={dir}/key.pem",
        "query argument 'ssl_certfile' names '{dir}/nope.pem', which cannot be read: No such file or directory",
        id="missing-cert",
    ),
    pytest.param(
        "ssl_certfile={dir}/cert.pem&ssl_keyfile={dir}/nope.pem",
        "query argument 'ssl_keyfile' names '{dir}/nope.pem', which cannot be read",
        id="missing-key",
    ),
    pytest.param("ssl_ca_certs={dir}", "names '{dir}', which cannot be read: Is a directory", id="ca-is-a-folder"),
    pytest.param(
        "ssl_ca_certs={dir}/plain.txt", "'ssl_ca_certs' names no PEM CA certificates OpenSSL can load", id="ca-not-pem"
    ),
    pytest.param(
        "ssl_certfile={dir}/plain.txt&ssl_keyfile={dir}/key.pem",
        "'ssl_certfile' and 'ssl_keyfile' name no PEM certificate and private key OpenSSL can load",
        id="cert-not-pem",
    ),
    pytest.param("ssl_keyfile={dir}/key.pem", "'ssl_keyfile' needs 'ssl_certfile' too", id="key-alone"),
    pytest.param(
        "ssl_ca_path={dir}/nope", "'ssl_ca_path' names '{dir}/nope', which is not a folder", id="missing-ca-path"
    ),
]


@pytest.mark.parametrize(("query", "reason"), TLS_FILE_MISTAKES)
def test_a_tls_file_that_cannot_be_loaded_is_a_config_problem(tmp_path: Path, query: str, reason: str) -> None:
    pem_pair(tmp_path)
    (tmp_path / "plain.txt").write_text("not a certificate\n")
    url = f"rediss://:s3cret@127.0.0.1:6379/0?{query.format(dir=tmp_path)}"
    path = write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{url}"\n')

    result = run("--config", str(path), "--check-config")

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: store.url"), problem
    assert reason.format(dir=tmp_path) in problem, problem
    assert "s3cret" not in result.stderr


def test_an_encrypted_key_needs_its_password_in_the_url(tmp_path: Path) -> None:
    cert, key = pem_pair(tmp_path, password="keypass")
    base = f"rediss://:s3cret@127.0.0.1:6379/0?ssl_certfile={cert}&ssl_keyfile={key}"

    without = run("--config", str(write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{base}"\n')), "--check-config")
    wrong = run(
        "--config",
        str(write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{base}&ssl_password=nope"\n')),
        "--check-config",
    )
    right = run(
        "--config",
        str(write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{base}&ssl_password=keypass"\n')),
        "--check-config",
    )

    assert_refused(without)
    assert "an encrypted private key: give its password as query argument 'ssl_password'" in problems(without)[0]
    assert_refused(wrong)
    assert "(or 'ssl_password' is not the key's password)" in problems(wrong)[0]
    assert "nope" not in wrong.stderr and "s3cret" not in wrong.stderr
    assert right.returncode == 0, right.stderr
    assert "keypass" not in right.stdout and "s3cret" not in right.stdout


def test_readable_tls_files_pass_the_check(tmp_path: Path) -> None:
    cert, key = pem_pair(tmp_path)
    url = f"rediss://127.0.0.1:6379/0?ssl_ca_certs={cert}&ssl_certfile={cert}&ssl_keyfile={key}&ssl_ca_path={tmp_path}"

    result = run("--config", str(write(tmp_path, f'[store]\nbackend = "redis"\nurl = "{url}"\n')), "--check-config")

    assert result.returncode == 0, result.stderr
