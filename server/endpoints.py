"""The operational HTTP endpoints served next to `/mcp`: `/healthz`, `/readyz`, `/metrics`.

Tier: operations. Added to an `MCPServer` with its public `custom_route`, so they share the
streamable HTTP port (and the uvicorn server) with `/mcp` and need no MCP session:

- `GET /healthz`: 200 while the process serves HTTP at all (liveness).
- `GET /readyz`: 200 while new calls are admitted; 503 before the session runtime has started
  and from the moment a graceful shutdown begins, so a load balancer drains the replica while
  its running calls finish.
- `GET /metrics`: the Prometheus exposition of `server.prometheus` (text format, or OpenMetrics
  if the scraper asks for it).

Example:
    ```python
    add_operational_routes(server, sessions, build_registry(sessions.manager))
    app = server.streamable_http_app()
    ```
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from server.extension import SessionsExtension
from server.prometheus import render


def add_operational_routes(server: MCPServer[Any], sessions: SessionsExtension, registry: CollectorRegistry) -> None:
    """Register `/healthz`, `/readyz` and `/metrics` on `server`'s HTTP app (call before building it)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        if sessions.ready:
            return PlainTextResponse("ready\n")
        reason = "shutting down" if sessions.manager.shutting_down else "starting"
        return PlainTextResponse(f"not ready: {reason}\n", status_code=503)

    async def metrics(request: Request) -> Response:
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    server.custom_route("/healthz", methods=["GET"], include_in_schema=False)(healthz)
    server.custom_route("/readyz", methods=["GET"], include_in_schema=False)(readyz)
    server.custom_route("/metrics", methods=["GET"], include_in_schema=False)(metrics)
