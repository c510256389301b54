"""Demo tools for trying the session layer: loaded by `config/demo.toml` via `server.tool_modules`.

`sleep_async` and `sleep_blocking` get a short deadline in the demo config, so a newcomer
sees a timeout fire for an async tool and for a sync tool stuck in a thread. `count_slowly`
reports progress at each step: with its idle timeout it lives as long as it keeps reporting,
and is timed out when a step takes longer than that.
"""

import time
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field


def echo(text: Annotated[str, Field(description="Text to send back.")]) -> str:
    """Return the text unchanged."""
    return text


async def sleep_async(seconds: Annotated[float, Field(ge=0, description="How long to sleep.")]) -> str:
    """Sleep without blocking (await); a deadline cancels it."""
    await anyio.sleep(seconds)
    return f"slept {seconds:g}s"


def sleep_blocking(seconds: Annotated[float, Field(ge=0, description="How long to block.")]) -> str:
    """Block a worker thread with time.sleep; a deadline cannot stop it, only abandon it."""
    time.sleep(seconds)
    return f"slept {seconds:g}s"


async def count_slowly(
    steps: Annotated[int, Field(ge=1, le=1000, description="How many steps to count.")],
    seconds_per_step: Annotated[float, Field(ge=0, description="How long each step takes.")],
    ctx: Context,
) -> str:
    """Count steps, reporting progress after each; a step slower than the idle timeout times it out."""
    for step in range(1, steps + 1):
        await anyio.sleep(seconds_per_step)
        await ctx.report_progress(step, steps, f"step {step} of {steps}")
    return f"counted {steps} steps"


def fail(message: Annotated[str, Field(description="The error message to raise.")]) -> str:
    """Raise an error with the given message (the session ends as 'error')."""
    raise ToolError(message)


TOOLS: list[Callable[..., Any]] = [echo, sleep_async, sleep_blocking, count_slowly, fail]
