"""Security over streamable HTTP: `server_shutdown` without the right admin token, and
DNS-rebinding protection (the Host header) on loopback and with `server.allowed_hosts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from tests.e2e.conftest import PROTOCOL_VERSION, ServerProcess, metrics, server_config, start_server
from tests.e2e_cli.test_cli import assert_refused, problems, run, write
from tests.helpers import code_of, text_of

TOKEN_ENV = "HOSTILE_ADMIN_TOKEN"
TOKEN = "the-real-admin-token-7f3a"
WRONG = "a-wrong-guess-19c2"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("token_env", "env", "attempts"),
    [
        pytest.param(TOKEN_ENV, {TOKEN_ENV: TOKEN}, [None, WRONG, "", TOKEN[:-1], TOKEN + " "], id="token-configured"),
        pytest.param(TOKEN_ENV, {TOKEN_ENV: ""}, [None, "", WRONG], id="empty-token-configured"),
        pytest.param(TOKEN_ENV, {}, [None, "", WRONG], id="token-variable-unset"),
        pytest.param("", {}, [None, "", WRONG], id="no-token-variable"),
    ],
)
async def test_server_shutdown_over_http_without_the_right_token_is_unauthorized_counted_and_never_logged(
    tmp_path: Path, token_env: str, env: dict[str, str], attempts: list[str | None]
) -> None:
    config = server_config(shutdown={"admin_token_env": token_env})
    async with start_server(tmp_path, config, transport="streamable-http", env=env) as server:
        async with server.client() as client:
            before = await metrics(client)
            for token in attempts:
                arguments: dict[str, Any] = {"timeout_seconds": 1}
                if token is not None:
                    arguments["token"] = token
                assert code_of(await client.call_tool("server_shutdown", arguments)) == "unauthorized", token
            after = await metrics(client)
            assert text_of(await client.call_tool("echo", {"text": "still up"})) == "still up"
        assert server.returncode is None
    assert after["shutdown_rejected_unauthorized"] - before["shutdown_rejected_unauthorized"] == len(attempts)
    assert after["shutdown_requested"] is False
    for secret in (TOKEN, WRONG):
        assert secret not in server.stderr, "a token reached the log"


async def post_initialize(url: str, host: str | None = None, origin: str | None = None) -> httpx2.Response:
    headers = dict(HEADERS)
    if host is not None:
        headers["Host"] = host
    if origin is not None:
        headers["Origin"] = origin
    params = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "rebind", "version": "0"}}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
    with anyio.fail_after(15):
        async with httpx2.AsyncClient() as http:
            return await http.post(url, content=body, headers=headers)


def port_of(server: ServerProcess) -> str:
    return (server.url or "").rsplit(":", 1)[1].split("/")[0]


async def test_on_loopback_a_foreign_host_header_is_refused(tmp_path: Path) -> None:
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        url, port = server.url or "", port_of(server)

        foreign = await post_initialize(url, host=f"evil.example:{port}")
        foreign_origin = await post_initialize(url, origin="http://evil.example")
        own = await post_initialize(url, host=f"127.0.0.1:{port}")
        named = await post_initialize(url, host=f"localhost:{port}", origin=f"http://localhost:{port}")

    assert foreign.status_code in (400, 403, 421), foreign.text
    assert foreign_origin.status_code in (400, 403), foreign_origin.text
    assert own.status_code == 200 and named.status_code == 200


async def test_allowed_hosts_extends_the_hosts_accepted_and_nothing_else(tmp_path: Path) -> None:
    config = server_config()
    config["server"] = {**config["server"], "allowed_hosts": ["mcp.internal.test:*"]}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url, port = server.url or "", port_of(server)

        listed = await post_initialize(url, host=f"mcp.internal.test:{port}", origin="http://mcp.internal.test:1")
        foreign = await post_initialize(url, host=f"evil.example:{port}")
        own = await post_initialize(url)

    assert listed.status_code == 200, listed.text
    assert foreign.status_code in (400, 403, 421), foreign.text
    assert own.status_code == 200, own.text


def test_binding_off_loopback_without_allowed_hosts_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nhost = "0.0.0.0"\n')

    result = run("--config", str(path))

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: server.host: is not a loopback address"), problem
    assert "server.allowed_hosts must list" in problem and problem.endswith('(got "0.0.0.0")'), problem
