"""The four session tools: thin functions over the extension's `SessionManager`.

Tier: tools. Each tool has typed arguments (the input schema clients see) and a pydantic
result model (the output schema). Refusals come back as error results carrying the error
code and the tool's name in `_meta` and no `structuredContent`, so that clients validating
structured content against the output schema accept them; each is logged once
(`server.logs.log_refusal`). The extension checks a call's argument names against the tool's
input schema first (`unknown_arguments`), and gives the SDK's own codeless error results a code
(`with_error_code`).
"""

import hmac
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.context import HandlerResult
from mcp.server.extension import ToolBinding
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field
from pydantic_core import ErrorDetails

from server.admission import MAX_LABEL_CHARS
from server.errors import ERROR_META_KEY, ErrorCode, SessionError, error_result, result_text, shorten
from server.logs import log_refusal
from server.metrics import MetricsSnapshot, ShutdownReport
from server.sdk_seams import argument_errors, argument_validation_failure

if TYPE_CHECKING:
    from server.extension import SessionsExtension

logger = logging.getLogger(__name__)

MANAGEMENT_TOOLS = frozenset({"session_create", "session_release", "session_metrics", "server_shutdown"})
#: Arguments whose values no refusal quotes (refusals are logged): `server_shutdown`'s admin token.
SECRET_ARGUMENTS = frozenset({"token"})
#: Why a `[tools.NAME]` table for a session tool does nothing (refused by the standalone server,
#: warned about by a host's extension).
SESSION_TOOL_TABLE = (
    "per-tool settings do not apply to the session tools: no per-tool deadline, cap or idle timeout"
    " holds them (they answer even when the server is full)"
)


class SessionCreateResult(BaseModel):
    session_id: str = Field(description="Pass this to session_release when the work is done.")
    request_id: str = Field(description="The id of the request that created the session.")
    state: str = Field(description="Always 'active' for a new session.")
    timeout_seconds: float = Field(description="The session's effective timeout (capped by the server's maximum).")
    expires_at: str = Field(description="When the session times out if not released (ISO 8601, UTC).")


class SessionReleaseResult(BaseModel):
    session_id: str
    state: str = Field(description="How the session ended: 'completed' or 'error'.")
    duration_seconds: float = Field(description="Time from creation to release.")


def _ok(model: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=model.model_dump_json())],
        structured_content=model.model_dump(mode="json"),
    )


def _refused(error: SessionError, tool: str) -> CallToolResult:
    """A refusal of session tool `tool`: named in the error (the manager does not know which tool
    asked), logged once, and returned as an error result."""
    if error.tool is None:
        error.tool = tool
    log_refusal(error)
    return error_result(error)


def session_tool_bindings(ext: "SessionsExtension") -> list[ToolBinding]:
    """The four tools, bound to one extension instance (no globals)."""
    manager = ext.manager

    async def session_create(
        provider: Annotated[
            str, Field(description="Who the work is for, e.g. the model provider.", max_length=MAX_LABEL_CHARS)
        ] = "",
        model: Annotated[str, Field(description="The model the work is for.", max_length=MAX_LABEL_CHARS)] = "",
        timeout_seconds: Annotated[
            float | None,
            # strict: JSON `true` or "30" is not a number of seconds (lax mode would read 1.0 and 30.0)
            Field(description="Seconds until the session times out by itself; default is the server's.", strict=True),
        ] = None,
        metadata: Annotated[
            dict[str, Any] | None,
            # The advertised default is DESIGN's `{}`; null is accepted too, and means the same.
            Field(description="Any JSON object to keep with the session (size-limited)."),
        ] = {},  # noqa: B006 - never mutated; pydantic gives each call its own copy
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, SessionCreateResult]:
        """Open a session that holds one concurrency slot until session_release or its timeout.

        Use it to reserve capacity for multi-step work. Refused with capacity_exceeded when the
        server is full (retry later), metadata_too_large, shutting_down, or invalid_argument.
        """
        request_id = ctx.request_id if ctx is not None else None
        limited = ctx is not None and manager.limits.max_sessions_per_client > 0
        try:
            session = await manager.create(
                queue=False,  # a reservation is answered at once: the caller decides when to retry
                provider=provider,
                model=model,
                timeout_seconds=timeout_seconds,
                metadata=metadata or None,  # none kept for an empty one
                request_id=request_id,
                client=ext.client_of(ctx.request_context) if ctx is not None and limited else None,
            )
        except SessionError as exc:
            return _refused(exc, "session_create")
        return _ok(
            SessionCreateResult(
                session_id=session.id,
                request_id=session.request_id if session.request_id is not None else session.id,
                state=session.state.value,
                timeout_seconds=session.timeout_seconds,
                expires_at=session.expires_at.isoformat(),
            )
        )

    async def session_release(
        session_id: Annotated[str, Field(description="The session_id that session_create returned.")],
        outcome: Annotated[Literal["completed", "error"], Field(description="How the work ended.")] = "completed",
        error: Annotated[str | None, Field(description="What went wrong, when outcome is 'error'.")] = None,
    ) -> Annotated[CallToolResult, SessionReleaseResult]:
        """Release a session made by session_create, freeing its slot.

        Refused with unknown_session for an id this server never issued, already_released
        for a session that already ended (released before, timed out, or cancelled, as at a
        shutdown's deadline), and invalid_argument for the session of a running tool call (it
        ends with its call).
        """
        try:
            session = await manager.release(session_id, outcome, error, tool_calls=False)
        except SessionError as exc:
            return _refused(exc, "session_release")
        return _ok(
            SessionReleaseResult(session_id=session.id, state=session.state.value, duration_seconds=session.duration)
        )

    async def session_metrics() -> MetricsSnapshot:
        """Read the server's session counters, rates, duration percentiles and limits.

        Always answers, even when the server is full or shutting down. In cluster mode the
        fields are this replica's view and `cluster` holds the totals of all replicas.
        """
        snapshot = manager.metrics()
        cluster = await manager.cluster_metrics()
        return snapshot if cluster is None else snapshot.model_copy(update={"cluster": cluster})

    async def server_shutdown(
        timeout_seconds: Annotated[
            float | None,
            Field(
                description="Seconds to let running sessions finish before cancelling them; default from config.",
                strict=True,
            ),
        ] = None,
        token: Annotated[
            str | None, Field(description="Admin token; required over HTTP (see shutdown.admin_token_env).")
        ] = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, ShutdownReport]:
        """Shut the server down gracefully and report what happened; the process then exits.

        New work is refused at once; running sessions get timeout_seconds to finish, then are
        cancelled. Over HTTP it needs the admin token (refused with unauthorized otherwise).
        """
        if timeout_seconds is not None and (math.isnan(timeout_seconds) or not 0 <= timeout_seconds < math.inf):
            return _refused(
                SessionError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"timeout_seconds must be a finite number of seconds >= 0, got {timeout_seconds!r}",
                ),
                "server_shutdown",
            )
        over_http = ctx is not None and ctx.headers is not None
        refusal = _authorize(ext.config.shutdown.admin_token_env, token) if over_http else None
        if refusal is not None:
            manager.shutdown_refused()
            return _refused(SessionError(ErrorCode.UNAUTHORIZED, refusal), "server_shutdown")
        # As a signal's "Graceful shutdown: received SIGTERM": the log says who stopped the server,
        # and a call that comes during a shutdown under way says that it started nothing.
        caller = f"a server_shutdown call{' over HTTP' if over_http else ''}"
        if manager.shutting_down:
            logger.info("%s during the shutdown: joining it", caller)
        else:
            logger.info("Graceful shutdown: requested by %s", caller)
        report = await ext.shutdown(timeout_seconds)
        return _ok(report)

    # Each acts on this server alone (open world: false; the spec's default is true). Releasing
    # a session again, or asking for a shutdown under way, changes nothing more (idempotent).
    return [
        _binding(
            session_create,
            ToolAnnotations(
                title="Create a session", destructive_hint=False, idempotent_hint=False, open_world_hint=False
            ),
        ),
        _binding(
            session_release,
            ToolAnnotations(
                title="Release a session", destructive_hint=False, idempotent_hint=True, open_world_hint=False
            ),
        ),
        _binding(session_metrics, ToolAnnotations(title="Session metrics", read_only_hint=True, open_world_hint=False)),
        _binding(
            server_shutdown,
            ToolAnnotations(
                title="Shut the server down", destructive_hint=True, idempotent_hint=True, open_world_hint=False
            ),
        ),
    ]


#: Marks the functions of the session tools (see `is_session_tool`).
_SESSION_TOOL = "__mcp_sessions_tool__"


def _binding(fn: Callable[..., Any], annotations: ToolAnnotations) -> ToolBinding:
    description = inspect.cleandoc(fn.__doc__ or "")
    setattr(fn, _SESSION_TOOL, True)
    return ToolBinding(fn, kwargs={"description": description, "annotations": annotations})


def is_session_tool(entry: Any) -> bool:
    """Whether `entry` (a registry entry named like a session tool) is one of the four, not a
    host's own tool registered under a session tool's name after removing it."""
    return getattr(getattr(entry, "fn", None), _SESSION_TOOL, False) is True


def _authorize(env_name: str, token: str | None) -> str | None:
    """None if `token` matches the admin token; otherwise why the shutdown is refused."""
    if not env_name:
        return (
            "server_shutdown is disabled over HTTP because shutdown.admin_token_env is empty: the operator must set "
            "shutdown.admin_token_env to the name of an environment variable that holds an admin token"
        )
    expected = os.environ.get(env_name)
    if not expected:
        # The key is set: what is missing is the variable's value, which only a restart can bring.
        state = "is not set" if expected is None else "is empty"
        return (
            f"server_shutdown is disabled over HTTP because the environment variable {env_name} "
            f"(named by shutdown.admin_token_env) {state}: the operator must restart the server with "
            f"{env_name} set to a non-empty admin token"
        )
    if token is None:
        return f"server_shutdown over HTTP needs the admin token: pass it as 'token' (the value of ${env_name})"
    if not hmac.compare_digest(expected.encode("utf-8"), token.encode("utf-8", errors="surrogatepass")):
        return "server_shutdown refused: the token does not match the admin token"
    return None


def argument_problems(errors: list[ErrorDetails]) -> str:
    """pydantic's error details for a session tool's arguments, in one sentence: each argument
    with what is wrong and the value it got (`provider: input should be a valid string (got 5)`),
    except a secret's (`SECRET_ARGUMENTS`): the refusal is logged, and the right admin token in
    the wrong type (a number) must not end up in the log."""
    parts = []
    for error in errors:
        loc = error["loc"]
        where = ".".join(str(part) for part in loc) or "arguments"
        what = error["msg"][:1].lower() + error["msg"][1:]
        if error["type"] == "missing":
            got = ""
        elif loc and loc[0] in SECRET_ARGUMENTS:
            got = " (its value is not shown)"
        else:
            got = f" (got {shorten(_as_json(error.get('input')))})"
        parts.append(f"{where}: {what}{got}")
    return "; ".join(parts)


def _as_json(value: Any) -> str:
    """`value` as the client sent it (JSON), or its repr where it is no JSON (from a host's own call)."""
    try:
        return json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def with_error_code(
    result: HandlerResult, tool: str, entry: Any = None, arguments: Mapping[str, Any] | None = None
) -> HandlerResult:
    """Give an error result of session tool `tool` that carries no code (the tools' own refusals
    carry theirs, and are logged already) the code that says what happened, and log it once:

    - `invalid_argument` for the SDK's own argument-validation failure (`server.sdk_seams.
      argument_validation_failure`), logged as the refusal it is; with the tool's registry
      `entry` and the call's `arguments`, pydantic's multi-line report is put in one sentence
      (`argument_problems`), as the tools' own refusals read;
    - `internal_error` for anything else (an unexpected exception inside the tool, say a reply
      from the session store it could not read): the caller's arguments were not the problem, and
      the sentence says so. Logged at ERROR (the SDK logs the exception's traceback itself).
    """
    if not isinstance(result, CallToolResult) or not result.is_error:
        return result
    meta = dict(result.meta or {})
    if ERROR_META_KEY in meta:
        return result
    text = result_text(result)
    update: dict[str, Any] = {}
    if argument_validation_failure(text, tool):
        errors = argument_errors(entry, arguments)  # [] without an entry
        if errors:
            text = f"invalid arguments for {tool}: {argument_problems(errors)}"
            update["content"] = [TextContent(type="text", text=text)]
        elif arguments and SECRET_ARGUMENTS.intersection(arguments):
            # pydantic's own report quotes every value it refused: a secret's too.
            text = f"invalid arguments for {tool}: a value has the wrong type (not shown: it may be a secret)"
            update["content"] = [TextContent(type="text", text=text)]
        error = SessionError(ErrorCode.INVALID_ARGUMENT, text, tool=tool)
        log_refusal(error)
    else:
        what = text or f"Error executing tool {tool}"
        error = SessionError(
            ErrorCode.INTERNAL_ERROR,
            f"{what} (an internal error of the server, not a problem with the arguments; "
            "the server's log has the details)",
            tool=tool,
        )
        logger.error(
            "Session tool %s failed (%s): %s",
            tool,
            error.code.value,
            what,
            extra={"code": error.code.value, "tool": tool},
        )
        update["content"] = [TextContent(type="text", text=error.message)]
    meta[ERROR_META_KEY] = error.to_meta()
    update["meta"] = meta
    return result.model_copy(update=update)


def unknown_arguments(entry: Any, arguments: Mapping[str, Any] | None) -> str | None:
    """Why `arguments` has names the session tool `entry` (its registry entry) does not take, or
    None (also when its input schema cannot be read)."""
    schema = getattr(entry, "parameters", None)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not arguments or not isinstance(properties, dict):
        return None
    unknown = [key for key in arguments if key not in properties]
    if not unknown:
        return None
    names = ", ".join(repr(shorten(key)) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    takes = f"its arguments are {', '.join(properties)}" if properties else "it takes no arguments"
    return f"unknown argument{'s' if len(unknown) > 1 else ''} {names} for {entry.name}: {takes}"
