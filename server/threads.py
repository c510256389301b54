"""Sync tools in a worker thread whose wait a cancellation can end.

Tier: MCP integration (used by the extension). The SDK runs a sync tool with
`anyio.to_thread.run_sync(fn)`, whose wait is shielded: no cancellation reaches the call until
the thread returns, so a tool stuck in `time.sleep` holds its caller past any deadline.
`make_cancellable(tool, ...)` swaps such a tool's function, in the server's registry entry, for
an async stand-in that runs the same function with the same arguments through
`run_sync(..., abandon_on_cancel=True)`: a cancellation (the call's deadline, the client,
shutdown) ends the wait at once, and the thread, which nothing can stop, is *abandoned*:
reported to `on_abandoned()` when it is left running, and to `on_returned()` (on the event
loop) when it finally returns. A call the extension runs takes its thread through the extension's
own limiter, which admission bounds (so an admitted call never waits for a thread with its
deadline running); a host's own call of the tool, through anyio's default one. Its token goes
back at abandonment (anyio's rule for abandoned threads), so stuck threads never starve later
calls; at `limits.max_abandoned_threads` stuck threads, new sync calls are
refused (the calls already running may still each leave one).

A call the cancellation reaches before its thread begins never calls the function; one it reaches
after the function returned, before the result was handed to the loop, is reported to
`on_discarded()`: the work was done, and its result is lost.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, cast

import anyio
import anyio.to_thread

#: Set on a stand-in: the sync function it runs in a thread.
ORIGINAL_ATTRIBUTE = "__mcp_sessions_sync_fn__"


# A call's thread and its caller agree on what happened through `dict.setdefault` on one dict
# per call: one C call under the GIL, so of two racing writers of a key exactly one wins.
# "begin": "started" (the thread began the work) or "cancelled" (the caller left first: the
# work never begins). "end": "returned" or "raised" (the work ended, its result or error on its
# way to the caller) or "abandoned" (the caller left while the work ran: the thread reports its
# return on the caller's loop, "loop").
_BEGIN, _END, _LOOP = "begin", "end", "loop"
#: What `_caller_leaves` finds: the thread runs on; or the work returned a result its caller,
#: leaving, never receives.
_ABANDONED, _RETURNED = "abandoned", "returned"


def _thread_begins(call: dict[str, object]) -> bool:
    """In the thread, before the work: False if the caller has left (then it never begins)."""
    return call.setdefault(_BEGIN, "started") == "started"


def _caller_leaves(call: dict[str, object], loop: asyncio.AbstractEventLoop) -> object:
    """On the loop, when the wait is cancelled: `_ABANDONED` if the work runs on; `_RETURNED` if it
    had returned (its result, not yet handed over, is lost); else None (it never began, or raised)."""
    call[_LOOP] = loop  # before the race for "end" is decided: an abandoned thread needs it
    if call.setdefault(_BEGIN, "cancelled") != "started":
        return None
    end = call.setdefault(_END, _ABANDONED)
    return end if end in (_ABANDONED, _RETURNED) else None


def _thread_returns(call: dict[str, object], end: str = _RETURNED) -> bool:
    """In the thread, after the work (`end`: "returned", or "raised"): True if it had been
    abandoned (then it reports its return)."""
    return call.setdefault(_END, end) == _ABANDONED


def cancellable(
    fn: Callable[..., Any],
    on_abandoned: Callable[[], None],
    on_returned: Callable[[], None],
    pool: Callable[[], anyio.CapacityLimiter | None] = lambda: None,
    on_discarded: Callable[[], None] = lambda: None,
    pool_back: Callable[[], None] = lambda: None,
) -> Callable[..., Any]:
    """An async function that runs `fn(**kwargs)` in a worker thread and stops waiting for it
    when cancelled (see the module's docstring). Its thread comes through the limiter `pool()`
    returns at each call (None: anyio's default one); `pool_back()` is called when the wait for
    a thread `pool()` gave ends. A wait cancelled just after `fn` returned, before its result
    reached the loop, calls `on_discarded()` (in the caller's task): the work was done, and its
    result is lost."""
    cancelled_exc = anyio.get_cancelled_exc_class
    run_sync = anyio.to_thread.run_sync

    @functools.wraps(fn)
    async def run_in_thread(**kwargs: Any) -> Any:
        call: dict[str, object] = {}

        def body() -> Any:
            if not _thread_begins(call):
                return None  # the caller has gone: do not begin the work at all
            end = "raised"
            try:
                result = fn(**kwargs)
                end = _RETURNED
                return result
            except GeneratorExit as exc:
                # Thrown back into the waiting coroutine it would read as "close this coroutine"
                # and take the caller's task down with it; as an error it is the tool's failure.
                raise RuntimeError(f"tool {getattr(fn, '__name__', fn)!r} raised GeneratorExit") from exc
            finally:
                if _thread_returns(call, end):
                    try:
                        cast(asyncio.AbstractEventLoop, call[_LOOP]).call_soon_threadsafe(on_returned)
                    except RuntimeError:  # the loop has closed: the process is on its way out
                        pass

        limiter = pool()
        try:
            return await run_sync(body, abandon_on_cancel=True, limiter=limiter)
        except cancelled_exc():
            left = _caller_leaves(call, asyncio.get_running_loop())
            if left == _ABANDONED:
                on_abandoned()
            elif left == _RETURNED:
                on_discarded()
            raise
        finally:
            if limiter is not None:
                pool_back()

    setattr(run_in_thread, ORIGINAL_ATTRIBUTE, fn)
    return run_in_thread


def runs_in_thread(tool: object) -> bool:
    """Whether calls of this registry entry run their function in a worker thread (a sync
    tool, or one already made cancellable)."""
    return not getattr(tool, "is_async", True) or hasattr(getattr(tool, "fn", None), ORIGINAL_ATTRIBUTE)


def make_cancellable(
    tool: object,
    on_abandoned: Callable[[], None],
    on_returned: Callable[[], None],
    pool: Callable[[], anyio.CapacityLimiter | None] = lambda: None,
    on_discarded: Callable[[], None] = lambda: None,
    pool_back: Callable[[], None] = lambda: None,
) -> bool:
    """Make a sync tool's registry entry (the SDK's `Tool`) run its function through
    `cancellable`; True once it does (also if it already did).

    False, changing nothing, for an entry this cannot apply to: an async tool, one whose
    parameters are filled by resolvers (the SDK may run those in shielded threads of their
    own), or an entry that does not take the change.
    """
    fn = getattr(tool, "fn", None)
    if hasattr(fn, ORIGINAL_ATTRIBUTE):
        return True
    if fn is None or not callable(fn) or getattr(tool, "is_async", True) or getattr(tool, "resolved_params", None):
        return False
    try:
        tool.fn = cancellable(fn, on_abandoned, on_returned, pool, on_discarded, pool_back)  # type: ignore[attr-defined]
        tool.is_async = True  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):  # a frozen or validating entry
        try:
            tool.fn = fn  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            pass
        return False
    return True
