"""Ending the HTTP responses still open when the standalone server stops, before uvicorn does.

Tier: application wiring. `server.app.serve_http` wraps its ASGI app in `HttpShutdown` and calls
`close()` between the graceful drain and telling uvicorn to exit.

A client of the handshake era (protocol 2025-11-25 and earlier: the MCP Inspector by default,
the SDK's `Client(url, mode="legacy")`) keeps a GET /mcp open after `initialize`: a
`text/event-stream` response for what the server sends unprompted, which never ends by itself.
Left open until uvicorn exits, it is cut instead of ended. Measured with mcp 2.3.0, sse-starlette
3.7.0 and uvicorn 0.54.0: once `uvicorn.Server.should_exit` is set, sse-starlette's shutdown
watcher (it polls that flag every 0.5 s, finding the server through the SIGTERM handler) cancels
the response, which returns without its last, empty chunk. uvicorn then logs `ERROR ... ASGI
callable returned without completing response` once per open stream and closes the connection,
and the client reads an incomplete chunked body. Without the watcher, uvicorn's graceful-shutdown
timeout would cancel the response instead, with an ERROR and a traceback. The SDK's session
manager, which would close these streams, stops only in the lifespan shutdown, after both.

So `HttpShutdown` notes each GET whose response starts as an event stream. `close(within)`
cancels those (and any that starts later) and sends the final empty body itself, so each
response ends properly. They carry nothing the client is still owed: the answer to a request
goes out on the POST that asked for it. `close` then waits, up to `within` seconds, for the
other requests in flight (responses on their way out, `server_shutdown`'s own report among
them) so that uvicorn does not cut those either. Everything else passes through untouched.

Example:
    ```python
    http = HttpShutdown(server.streamable_http_app())
    ...  # serve `http` with uvicorn; once the drain has finished:
    await http.close(within=2.0)
    uvicorn_server.should_exit = True
    ```
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_LAST_CHUNK: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class HttpShutdown:
    """An ASGI app around `app` that can end its open GET event streams and wait for the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: One cancel scope per GET whose event stream has started and not ended.
        self._streams: set[anyio.CancelScope] = set()
        self._in_flight = 0
        self._idle: anyio.Event | None = None
        self._closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # the lifespan
            return
        self._in_flight += 1
        try:
            if scope["method"] == "GET":
                await self._serve_get(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def _serve_get(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = False  # an event stream has started and its last chunk is not sent yet
        with anyio.CancelScope() as stream:

            async def watch(message: Message) -> None:
                nonlocal streaming
                await send(message)
                if message["type"] == "http.response.start" and _is_event_stream(message):
                    streaming = True
                    self._streams.add(stream)
                    if self._closing:
                        stream.cancel()
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    streaming = False

            try:
                await self.app(scope, receive, watch)
            finally:
                self._streams.discard(stream)
        if stream.cancel_called and streaming:
            await send(_LAST_CHUNK)

    async def close(self, within: float) -> None:
        """End every open GET event stream, then wait up to `within` seconds for the requests
        still in flight; GET event streams that start from now on are ended at once."""
        self._closing = True
        if self._streams:
            logger.info("Ending %s open event stream(s)", len(self._streams))
        for stream in self._streams:
            stream.cancel()
        with anyio.move_on_after(within):
            while self._in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self._in_flight:
            logger.warning("Stopping with %s HTTP request(s) still in flight after %ss", self._in_flight, within)


def _is_event_stream(start: Message) -> bool:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return bool(value.split(b";")[0].strip().lower() == b"text/event-stream")
    return False
