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

from server.app import transport_security
from server.config import ServerSettings
from server.endpoints import is_ip_address
from tests.e2e.conftest import PROTOCOL_VERSION, ServerProcess, free_port, metrics, server_config, start_server
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


async def test_an_allowed_host_written_with_capitals_admits_the_name_as_clients_send_it(tmp_path: Path) -> None:
    # Host names are case-insensitive and clients send them in lower case; the SDK compares
    # each entry exactly, so an entry as an operator may write it must not silently never match.
    config = server_config()
    config["server"] = {**config["server"], "allowed_hosts": ["MCP.Internal.Test:*", "Proxy.Example:8443"]}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url, port = server.url or "", port_of(server)

        any_port = await post_initialize(url, host=f"mcp.internal.test:{port}", origin="https://mcp.internal.test")
        exact = await post_initialize(url, host="proxy.example:8443", origin="https://proxy.example:8443")
        other_port = await post_initialize(url, host="proxy.example:8444")

    assert any_port.status_code == 200, any_port.text
    assert exact.status_code == 200, exact.text
    assert (other_port.status_code, other_port.text) == (421, "Invalid Host header")


async def test_a_host_pattern_with_any_port_also_admits_the_bare_host_name(tmp_path: Path) -> None:
    # Behind a proxy on port 80/443 clients send no port: "name:*" must admit "Host: name" too.
    config = server_config()
    config["server"] = {**config["server"], "allowed_hosts": ["mcp.internal.test:*", "10.0.0.5:8765"]}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        url = server.url or ""

        bare = await post_initialize(url, host="mcp.internal.test")
        bare_origins = [
            await post_initialize(url, host="mcp.internal.test", origin=f"{scheme}://mcp.internal.test")
            for scheme in ("http", "https")
        ]
        with_port = await post_initialize(url, host="mcp.internal.test:443", origin="https://mcp.internal.test:443")
        # An exact host:port entry stays exact, and a name that only starts like an allowed one is not it.
        refused = [
            await post_initialize(url, host=host)
            for host in ("10.0.0.5", "10.0.0.5:8766", "mcp.internal.test.evil.example", "evil-mcp.internal.test")
        ]
        refused_origin = await post_initialize(url, host="mcp.internal.test", origin="http://mcp.internal.test.evil")

    assert bare.status_code == 200, bare.text
    assert [r.status_code for r in bare_origins] == [200, 200], [r.text for r in bare_origins]
    assert with_port.status_code == 200, with_port.text
    assert [(r.status_code, r.text) for r in refused] == [(421, "Invalid Host header")] * 4
    assert (refused_origin.status_code, refused_origin.text) == (403, "Invalid Origin header")


OPERATIONAL = ("/healthz", "/readyz", "/metrics")


async def get(url: str, host: str | None = None, origin: str | None = None) -> httpx2.Response:
    headers = {name: value for name, value in (("Host", host), ("Origin", origin)) if value is not None}
    with anyio.fail_after(15):
        async with httpx2.AsyncClient() as http:
            return await http.get(url, headers=headers)


async def test_the_operational_endpoints_refuse_a_foreign_host_or_origin_as_mcp_does(tmp_path: Path) -> None:
    # A page that rebinds its name to 127.0.0.1 must not read /metrics (or anything else) either.
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        url, port = server.url or "", port_of(server)
        base = url.removesuffix("/mcp")
        mcp_host = await post_initialize(url, host=f"evil.example:{port}")
        mcp_origin = await post_initialize(url, origin="http://evil.example")
        answers = {
            path: (
                await get(base + path, host=f"evil.example:{port}", origin="http://evil.example"),
                await get(base + path, origin="http://evil.example"),
                await get(base + path, host=f"localhost:{port}", origin=f"http://localhost:{port}"),
                await get(base + path),
            )
            for path in OPERATIONAL
        }

    assert (mcp_host.status_code, mcp_host.text) == (421, "Invalid Host header")
    assert (mcp_origin.status_code, mcp_origin.text) == (403, "Invalid Origin header")
    for path, (foreign_host, foreign_origin, named, own) in answers.items():
        assert (foreign_host.status_code, foreign_host.text) == (421, "Invalid Host header"), path
        assert (foreign_origin.status_code, foreign_origin.text) == (403, "Invalid Origin header"), path
        assert named.status_code == 200 and own.status_code == 200, (path, named.text, own.text)
    assert "mcp_sessions_created_total" in answers["/metrics"][3].text


async def test_the_operational_endpoints_admit_the_allowed_hosts(tmp_path: Path) -> None:
    config = server_config()
    config["server"] = {**config["server"], "allowed_hosts": ["mcp.internal.test:*"]}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        base = (server.url or "").removesuffix("/mcp")
        answers = {
            path: [
                await get(base + path, host=host, origin=origin)
                for host, origin in (
                    ("mcp.internal.test", "https://mcp.internal.test"),
                    (f"mcp.internal.test:{port_of(server)}", None),
                    ("evil.example", None),
                    # A probe or scraper addressing the replica by its IP (not a name a page
                    # could rebind): admitted, unless it comes with a foreign Origin.
                    (f"10.0.0.12:{port_of(server)}", None),
                    ("[fd00::12]:8765", None),
                    ("10.0.0.12", "http://evil.example"),
                )
            ]
            for path in OPERATIONAL
        }
        mcp_by_ip = await post_initialize(server.url or "", host=f"10.0.0.12:{port_of(server)}")

    for path, (bare, with_port, foreign, by_ip, by_ipv6, by_ip_foreign_origin) in answers.items():
        assert (bare.status_code, with_port.status_code) == (200, 200), (path, bare.text, with_port.text)
        assert (foreign.status_code, foreign.text) == (421, "Invalid Host header"), path
        assert (by_ip.status_code, by_ipv6.status_code) == (200, 200), (path, by_ip.text, by_ipv6.text)
        # With an Origin, the whole check applies again (the Host is checked first).
        assert (by_ip_foreign_origin.status_code, by_ip_foreign_origin.text) == (421, "Invalid Host header"), path
    assert mcp_by_ip.status_code == 421  # /mcp itself admits only the listed names


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.12", True),
        ("10.0.0.12:8765", True),
        ("[fd00::12]", True),
        ("[fd00::12]:8765", True),
        ("10.0.0.12:http", False),
        ("fd00::12", False),  # a Host header brackets an IPv6 address
        ("[fd00::12]x", False),
        ("[fd00::12", False),
        ("10.0.0.12:", False),
        ("10.0.0.12.evil.example", False),
        ("evil.example:8765", False),
        ("", False),
    ],
)
def test_what_counts_as_a_host_given_as_an_ip_address(host: str, expected: bool) -> None:
    assert is_ip_address(host) is expected


@pytest.mark.parametrize(
    ("host", "bound"),
    [("10.0.0.5", "10.0.0.5:9000"), ("fd00::5", "[fd00::5]:9000"), ("MCP.Internal", "mcp.internal:9000")],
)
def test_the_address_the_server_binds_and_logs_is_an_accepted_host(host: str, bound: str) -> None:
    # The log says "Serving MCP over streamable HTTP at http://10.0.0.5:9000/mcp": that URL must
    # not get 421 because allowed_hosts lists only the names behind a proxy.
    settings = ServerSettings(transport="streamable-http", host=host, port=9000, allowed_hosts=("mcp.example.com:*",))
    security = transport_security(settings)
    assert security is not None
    assert bound in security.allowed_hosts and f"http://{bound}" in security.allowed_origins
    assert "mcp.example.com:*" in security.allowed_hosts
    # Bound to every interface, no one address is the server's: only the list (and loopback) pass.
    anywhere = transport_security(settings.model_copy(update={"host": "0.0.0.0"}))
    assert anywhere is not None and not [h for h in anywhere.allowed_hosts if h.startswith("0.0.0.0")]


async def test_the_stdio_servers_prometheus_exporter_refuses_a_foreign_host_or_origin(tmp_path: Path) -> None:
    port = free_port()
    config = {**server_config(), "metrics": {"prometheus_port": port}}
    async with start_server(tmp_path, config) as server:
        await server.wait_stderr(f"Serving Prometheus metrics at http://127.0.0.1:{port}/metrics")
        url = f"http://127.0.0.1:{port}/metrics"
        foreign_host = await get(url, host=f"evil.example:{port}")
        foreign_origin = await get(url, origin="http://evil.example")
        lookalike = await get(url, host=f"localhost.evil.example:{port}")
        own = [await get(url), await get(url, host="localhost", origin=f"http://localhost:{port}")]

    assert (foreign_host.status_code, foreign_host.text) == (421, "Invalid Host header")
    assert (lookalike.status_code, lookalike.text) == (421, "Invalid Host header")
    assert (foreign_origin.status_code, foreign_origin.text) == (403, "Invalid Origin header")
    assert [r.status_code for r in own] == [200, 200]
    assert "mcp_sessions_created_total" in own[0].text


def test_binding_off_loopback_without_allowed_hosts_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntransport = "streamable-http"\nhost = "0.0.0.0"\n')

    result = run("--config", str(path))

    assert_refused(result)
    [problem] = problems(result)
    assert problem.startswith(f"{path}: server.host: is not a loopback address"), problem
    assert "server.allowed_hosts must list" in problem and problem.endswith('(got "0.0.0.0")'), problem
