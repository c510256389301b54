"""The operational HTTP endpoints served next to `/mcp`: `/healthz`, `/readyz`, `/metrics`.

Tier: operations. Added to an `MCPServer` with its public `custom_route`, so they share the
streamable HTTP port (and the uvicorn server) with `/mcp` and need no MCP session:

- `GET /healthz`: 200 while the process serves HTTP at all (liveness).
- `GET /readyz`: 200 while new calls are admitted; 503 before the session runtime has started
  and from the moment a graceful shutdown begins, so a load balancer drains the replica while
  its running calls finish.
- `GET /metrics`: the Prometheus exposition of `server.prometheus` (text format, or OpenMetrics
  if the scraper asks for it), rendered in a worker thread, one scrape at a time: rendering
  1,025 tool entries takes about 150 ms (about 13 ms of it under the manager's lock), and on
  the event loop it held every MCP call of the server that long. Its thread comes through a
  limiter of its own, not anyio's default one: that is the sync tools', and a pool full of
  them must not hold a scrape up (nor a scrape take one of their threads).

They get the same DNS-rebinding check as `/mcp` (the SDK's own, with the same settings): a
request naming another host is refused with 421, one from another origin with 403, so a page
that rebinds its name to the server's address cannot read them either. One difference: a `Host`
that is an IP address (with or without a port) is accepted here when the request carries no
`Origin`. A rebinding page always sends the name it controls, never an address, and probes
and scrapers address a replica by its IP (the kubelet, Prometheus' service discovery), which
no list of names could hold.

Example:
    ```python
    security = transport_security(settings.server)
    add_operational_routes(server, sessions, build_registry(sessions.manager), security)
    app = server.streamable_http_app(transport_security=security)
    ```
"""

from __future__ import annotations

import gzip
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import gzip_accepted
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from server.config import split_host_port
from server.extension import SessionsExtension
from server.prometheus import render

Endpoint = Callable[[Request], Awaitable[Response]]


def _rendered(registry: CollectorRegistry, accept: str | None, names: list[str], gzipped: bool) -> tuple[bytes, str]:
    """`render`'s body, gzipped if asked (in the rendering thread too: off the event loop)."""
    body, content_type = render(registry, accept, names)
    return (gzip.compress(body) if gzipped else body), content_type


def is_ip_address(host: str) -> bool:
    """Whether a `Host` header value names an IP address (`10.0.0.12`, `10.0.0.12:8765`,
    `[fd00::1]:8765`) rather than a host name."""
    split = split_host_port(host)
    if split is None:
        return False
    address, port = split
    if port is not None and not port.isdigit():
        return False
    if address.startswith("["):
        address = address[1:-1]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def add_operational_routes(
    server: MCPServer[Any],
    sessions: SessionsExtension,
    registry: CollectorRegistry,
    security: TransportSecuritySettings | None = None,
) -> None:
    """Register `/healthz`, `/readyz` and `/metrics` on `server`'s HTTP app (call before building it).

    `security` must be what `/mcp` gets (`None`: no Host/Origin check, as the SDK does then).
    """
    guard = TransportSecurityMiddleware(security)
    rendering = anyio.CapacityLimiter(1)

    def checked(handler: Endpoint) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            headers = request.headers
            if "origin" not in headers and is_ip_address(headers.get("host", "")):
                return await handler(request)
            refused = await guard.validate_request(request)
            return refused if refused is not None else await handler(request)

        return endpoint

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        if sessions.ready:
            return PlainTextResponse("ready\n")
        reason = "shutting down" if sessions.manager.shutting_down else "starting"
        return PlainTextResponse(f"not ready: {reason}\n", status_code=503)

    async def metrics(request: Request) -> Response:
        accept, names = request.headers.get("accept"), request.query_params.getlist("name[]")
        gzipped = gzip_accepted(request.headers.get("accept-encoding", ""))
        body, content_type = await anyio.to_thread.run_sync(
            _rendered, registry, accept, names, gzipped, limiter=rendering
        )
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        if gzipped:  # as prometheus_client's own exporter does (Prometheus asks for it)
            headers["Content-Encoding"] = "gzip"
        return Response(body, headers=headers)

    server.custom_route("/healthz", methods=["GET"], include_in_schema=False)(checked(healthz))
    server.custom_route("/readyz", methods=["GET"], include_in_schema=False)(checked(readyz))
    server.custom_route("/metrics", methods=["GET"], include_in_schema=False)(checked(metrics))
