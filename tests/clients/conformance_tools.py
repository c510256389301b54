"""The fixture tools, resources and prompts the MCP conformance suite's server scenarios call.

Tier: test fixture. Hosted by the standalone server through `server.tool_modules` (with the
session extension installed, as in production), so the conformance run proves that the
plugin keeps a server conformant. `TOOLS` holds the tools (each call is a tracked session);
`setup(server)` adds the resources, prompts and handlers the scenarios read.

The names and payloads are the ones the scenarios of `@modelcontextprotocol/conformance`
expect (`conformance list` names them; a failing scenario prints what it wanted).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer, UserMessage
from mcp_types import (
    AudioContent,
    Completion,
    CompletionArgument,
    CompletionContext,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field

#: A 1x1 PNG and a tiny WAV: what the image/audio scenarios check is the shape, not the picture.
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


def test_simple_text() -> str:
    """Returns one text block."""
    return "This is a simple text response for testing."


def test_image_content() -> list[ImageContent]:
    """Returns one image block."""
    return [ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")]


def test_audio_content() -> list[AudioContent]:
    """Returns one audio block."""
    return [AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")]


def _embedded(uri: str, text: str, mime_type: str = "text/plain") -> EmbeddedResource:
    return EmbeddedResource(type="resource", resource=TextResourceContents(uri=uri, mime_type=mime_type, text=text))


def test_embedded_resource() -> list[EmbeddedResource]:
    """Returns one embedded resource block."""
    return [_embedded("test://embedded-resource", "This is an embedded resource content.")]


def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Returns text, image and an embedded resource together."""
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
        _embedded("test://mixed-content-resource", json.dumps({"test": "data", "value": 123}), "application/json"),
    ]


async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three log notifications while it runs."""
    for text in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(text)
        await anyio.sleep(0.02)  # the work this tool pretends to do
    return "Tool with logging executed successfully"


async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50, 100 of 100 and returns the progress token."""
    for step in (0, 50, 100):
        await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
        await anyio.sleep(0.02)  # the work this tool pretends to do
    meta = ctx.request_context.meta
    token = getattr(meta, "progress_token", None) if meta is not None else None
    return str(token if token is not None else 0)


def test_error_handling() -> str:
    """Always fails: the client must get a result with `isError`."""
    raise RuntimeError("This tool intentionally returns an error for testing")


async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's model to complete `prompt`.

    The request names the tool call it belongs to, so over streamable HTTP it travels on that
    call's own response stream (as `ctx.elicit` does). Without it the SDK sends it on the
    client's standalone GET stream, which the conformance client opens only after initializing:
    a call made before that stream is up has its sampling request dropped (no event store), and
    the call hangs until its deadline (seen in about 1 run of the suite in 8, bare SDK too).
    """
    result: Any = await ctx.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=100,
        related_request_id=ctx.request_id,
    )
    content = result.content
    text = content.text if getattr(content, "type", None) == "text" else "No response"
    return f"LLM response: {text}"


class _Answer(BaseModel):
    response: str = Field(description="User's response")


async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user for one string."""
    result = await ctx.elicit(message=message, schema=_Answer)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"User response: action={result.action}, content={content}"


class _Defaults(BaseModel):
    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(
        default="active", description="User status", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    verified: bool = Field(default=True, description="Verification status")


async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicitation whose schema has a default for every primitive type (SEP-1034)."""
    result = await ctx.elicit(message="Please provide user information", schema=_Defaults)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"Elicitation result: action={result.action}, content={content}"


class _Enums(BaseModel):
    untitledSingle: str = Field(  # noqa: N815 - the names the scenario checks
        description="Simple enum without titles", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    titledSingle: str = Field(  # noqa: N815
        description="Enum with titled options (oneOf)",
        json_schema_extra={
            "oneOf": [
                {"const": "low", "title": "Low Priority"},
                {"const": "medium", "title": "Medium Priority"},
                {"const": "high", "title": "High Priority"},
            ]
        },
    )
    untitledMulti: list[str] = Field(  # noqa: N815
        description="Multi-select without titles",
        json_schema_extra={"items": {"type": "string", "enum": ["read", "write", "execute"]}},
    )
    titledMulti: list[str] = Field(  # noqa: N815
        description="Multi-select with titled options",
        json_schema_extra={
            "items": {
                "anyOf": [
                    {"const": "feature", "title": "New Feature"},
                    {"const": "bug", "title": "Bug Fix"},
                    {"const": "docs", "title": "Documentation"},
                ]
            }
        },
    )
    legacyEnum: str = Field(  # noqa: N815
        description="Legacy enum with enumNames",
        json_schema_extra={
            "enum": ["small", "medium", "large"],
            "enumNames": ["Small Size", "Medium Size", "Large Size"],
        },
    )


async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicitation with every enum schema variant (SEP-1330)."""
    result = await ctx.elicit(message="Please select values using different enum schema types", schema=_Enums)
    content = result.data.model_dump_json() if result.action == "accept" else "{}"
    return f"Elicitation completed: action={result.action}, content={content}"


async def test_reconnection(ctx: Context) -> str:
    """Closes its SSE stream mid-call so that the client reconnects (SEP-1699)."""
    await ctx.info("Before disconnect")
    await ctx.close_sse_stream()
    await anyio.sleep(0.2)  # the client's reconnection window
    await ctx.info("After reconnect")
    return "Reconnection test completed"


def json_schema_2020_12_tool(name: str = "", address: dict[str, Any] | None = None) -> str:
    """A tool whose input schema uses JSON Schema 2020-12 keywords (SEP-1613); see `setup`."""
    return json.dumps({"name": name, "address": address or {}})


#: The input schema the json-schema-2020-12 scenario expects to find verbatim in `tools/list`.
JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}

TOOLS = [
    json_schema_2020_12_tool,
    test_simple_text,
    test_image_content,
    test_audio_content,
    test_embedded_resource,
    test_multiple_content_types,
    test_tool_with_logging,
    test_tool_with_progress,
    test_error_handling,
    test_sampling,
    test_elicitation,
    test_elicitation_sep1034_defaults,
    test_elicitation_sep1330_enums,
    test_reconnection,
]


# -- resources, prompts and handlers -----------------------------------------------------


def setup(server: MCPServer[Any]) -> None:
    """Add the resources, prompts and protocol handlers the scenarios use."""
    subscriptions: set[str] = set()
    # The SDK derives a tool's schema from its signature; this scenario wants one written by hand.
    tool = server._tool_manager.get_tool(json_schema_2020_12_tool.__name__)
    if tool is not None:
        tool.parameters = JSON_SCHEMA_2020_12

    @server.resource("test://static-text", mime_type="text/plain")
    def static_text() -> str:
        """A static text resource."""
        return "This is the content of the static text resource."

    @server.resource("test://static-binary", mime_type="image/png")
    def static_binary() -> bytes:
        """A static binary resource (a PNG)."""
        return base64.b64decode(PNG_BASE64)

    @server.resource("test://template/{id}/data", mime_type="application/json")
    def template(id: str) -> str:  # noqa: A002 - the template's parameter name
        """A resource template with one parameter."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @server.resource("test://watched-resource", mime_type="text/plain")
    def watched() -> str:
        """A resource a client can subscribe to."""
        return "Watched resource content"

    @server.prompt()
    def test_simple_prompt() -> list[UserMessage]:
        """A prompt without arguments."""
        return [UserMessage(TextContent(type="text", text="This is a simple prompt for testing."))]

    @server.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        """A prompt with two required arguments."""
        text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
        return [UserMessage(TextContent(type="text", text=text))]

    @server.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:  # noqa: N803
        """A prompt that embeds a resource."""
        return [
            UserMessage(_embedded(resourceUri, "Embedded resource content for testing.")),
            UserMessage(TextContent(type="text", text="Please process the embedded resource above.")),
        ]

    @server.prompt()
    def test_prompt_with_image() -> list[UserMessage]:
        """A prompt that carries an image."""
        return [
            UserMessage(ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
            UserMessage(TextContent(type="text", text="Please analyze the image above.")),
        ]

    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        return Completion(values=[], total=0, has_more=False)

    server.completion()(complete)  # type: ignore[no-untyped-call]  # the SDK's decorator is untyped

    async def set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        subscriptions.add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        subscriptions.discard(str(params.uri))
        return EmptyResult()

    lowlevel = server._lowlevel_server  # the SDK has no MCPServer-level hook for these three
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
