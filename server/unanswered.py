"""Answers for requests the standalone server stops without: their work held its cancellation off.

Tier: application wiring (used by `server.app`'s stdio loop and `server.http_shutdown`). A
shutdown cancels what is still running at its drain deadline; a call whose work holds that
cancellation off (a shielded wait, `anyio.to_thread.run_sync` without `abandon_on_cancel`) has
its session ended `cancelled` on time, but its handler still runs and writes no answer. Rather
than leave the caller with silence or a cut connection, the transport answers it itself when it
stops: a `tools/call` with the extension's `shutting_down` error result, any other request with
a JSON-RPC error. The work itself is left running until the process exits.

The result is shaped as the SDK shapes a handler's on the request's connection: a request of
protocol 2026-07-28 (its `params._meta` names the version) gets `resultType` and the `serverInfo`
stamp in `_meta`; one of the handshake era gets neither, as its schema has no `resultType`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from mcp_types import INTERNAL_ERROR, PROTOCOL_VERSION_META_KEY, SERVER_INFO_META_KEY, ErrorData
from mcp_types.jsonrpc import JSONRPCError, JSONRPCResponse

from server.errors import ErrorCode, SessionError, error_result, shorten

#: Request bodies larger than this are not kept to be answered at the exit (a tool call is far smaller).
MAX_BODY_BYTES = 1 << 20
#: Once requests have been answered this way, how long what still waits for their work (the stdio
#: server loop, the HTTP app's lifespan shutdown) may take before the process exits without it.
LEFT_BEHIND_GRACE = 0.2
#: At the exit, how long after the drain the answers still being written to clients slow to read
#: them get, on either transport (`server.app`'s stdio loop, `server.http_shutdown`), before the
#: process exits without the rest: a client that never reads cannot hold the exit.
WRITE_SECONDS = 5.0
#: What the log says of requests answered this way.
ANSWERED = "answered shutting_down (their work held the cancellation off past the shutdown)"


#: The session of a call the shutdown cancelled at its drain deadline, by its request id (as text)
#: and tool name; None if unknown (`SessionManager.cancelled_at_shutdown`).
SessionOf = Callable[[str, str], "str | None"]


def abandoned_answer(
    request_id: Any,
    method: str,
    params: Any = None,
    server_info: Mapping[str, Any] | None = None,
    session_of: SessionOf | None = None,
) -> JSONRPCResponse | JSONRPCError:
    """The answer to request `request_id` (`method`, `params`) left running when the server stopped;
    `server_info` is the server's `serverInfo` stamp (the SDK's `Server.server_info_stamp`), which
    a result of protocol 2026-07-28 carries in `_meta`; `session_of` names the call's session, as
    every other error result of a call does."""
    if method == "tools/call":
        name = params.get("name") if isinstance(params, dict) else None
        tool = shorten(name) if isinstance(name, str) else None
        subject = f"tool {tool!r}" if tool is not None else "the tool"
        session_id = session_of(str(request_id), name) if session_of is not None and isinstance(name, str) else None
        error = SessionError(
            ErrorCode.SHUTTING_DOWN,
            f"{subject} held its cancellation off past the shutdown deadline and was abandoned: the server "
            "has stopped, and its work may not have finished; retry on a running server",
            session_id=session_id,
            tool=tool,
        )
        result = error_result(error).model_dump(by_alias=True, exclude_none=True, mode="json")
        if not _modern(params):
            result.pop("resultType", None)  # a field of 2026-07-28, which the SDK leaves out on older connections
        elif server_info is not None:
            result["_meta"] = {**result.get("_meta", {}), SERVER_INFO_META_KEY: dict(server_info)}
        return JSONRPCResponse(jsonrpc="2.0", id=request_id, result=result)
    message = (
        f"the server stopped while {shorten(method)!r} still ran: it held its cancellation off past the "
        "shutdown deadline and was abandoned"
    )
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=INTERNAL_ERROR, message=message))


def _modern(params: Any) -> bool:
    """Whether a request with `params` is of protocol 2026-07-28 or later: its `_meta` carries the
    protocol version, as the SDK tells the eras apart (a handshake-era request never does)."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PROTOCOL_VERSION_META_KEY in meta


def abandoned_answer_to(
    body: bytes, server_info: Mapping[str, Any] | None = None, session_of: SessionOf | None = None
) -> bytes | None:
    """The JSON of `abandoned_answer` for a request received as `body` (one JSON-RPC request);
    None if `body` is not one (a notification, a response, a batch, not JSON)."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    answer = abandoned_answer(request_id, message["method"], message.get("params"), server_info, session_of)
    return answer.model_dump_json(by_alias=True, exclude_unset=True).encode()
