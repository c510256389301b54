"""A cancel scope that costs nothing until it is cancelled: the deadline of one tool call.

Tier: runtime. Every tool call needs a way to be cancelled at its deadline (or at the
shutdown deadline) that respects anyio's semantics: a shielded scope inside the tool (as in
`anyio.to_thread.run_sync`, or a tool's own clean-up) holds the cancellation off until it
exits, and the cancellation is caught where it was aimed, not by the SDK's request scope.
An `anyio.CancelScope` around each call does exactly that, but making, entering and leaving
one costs about 20,000 CPU instructions on Python 3.11 (weak-key lookups, set updates, the walk
for a cancelled parent): a quarter of what this extension added to a no-op tool call, paid by
every call although almost no call reaches its deadline.

`LateScope` pays for the scope only when a call is cancelled. When made it notes the task and
the task's current anyio scope (its *base*); `cancel()` (usually from another task, while the
call waits) builds a real `anyio.CancelScope` and splices it into the task's scope
tree just below the base (above every scope the call has entered since), as if it had been
entered on entry, then cancels it. From there anyio's own delivery runs unchanged, shields
included. Leaving the `with` block leaves the spliced scope, if any, as anyio's own would.

Splicing writes anyio's private scope fields (`_parent_scope`, `_child_scopes`, `_tasks`,
`_host_task`, `_active`, `_cancelling_at_enter`) and reads its task states, the same fields
anyio's own `CancelScope._reparent` moves. `available()` checks their shape once (anyio 4 on
asyncio); where it fails, `deadline_scope()` hands out plain `anyio.CancelScope`s instead, so
the worst case is the old cost, never a missed deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio

logger = logging.getLogger(__name__)

try:  # anyio's asyncio backend; its private parts are checked in `available`
    from anyio._backends import _asyncio as _anyio_asyncio
except ImportError:  # pragma: no cover - anyio without its asyncio backend
    _anyio_asyncio = None  # type: ignore[assignment]

_SCOPE_FIELDS = (
    "_parent_scope",
    "_child_scopes",
    "_tasks",
    "_host_task",
    "_active",
    "_cancelling_at_enter",
    "_pending_uncancellations",
)


_current_task = asyncio.current_task
# On Python 3.11, `asyncio.current_task()` makes a system call (getpid, its fork check), about
# 0.4 µs on this project's VMs. The C dict it reads maps each loop running a task step to that
# task; with one entry, the entry is the caller's own task (the caller runs in a task, so its
# loop has an entry; a LateScope made outside any task, which the extension never does, could
# note another thread's task here where `current_task()` would have refused). `tuple()` copies
# it in one C call, atomic under the GIL. 3.12 dropped the system call, and later versions may
# keep the dict differently: there, `current_task` itself.
_running_tasks: dict[Any, Any] | None = None
if sys.version_info < (3, 12):
    try:
        import _asyncio

        _running_tasks = _asyncio._current_tasks  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - asyncio without its C accelerator
        _running_tasks = None
_ref = weakref.ref
#: The dict behind anyio's `_task_states` (a WeakKeyDictionary, keyed by weak references to
#: tasks): one module global instead of two attribute lookups on every call.
_states_by_ref: dict[Any, Any] = getattr(getattr(_anyio_asyncio, "_task_states", None), "data", {})

#: Numbers the LateScopes in the order they are entered.
_entries = itertools.count()
#: The scopes `LateScope.cancel` has spliced in and not yet left, by id: their LateScope's number.
_spliced: dict[int, int] = {}


def available() -> bool:
    """Whether anyio's internals have the shape `LateScope` splices into (checked, not assumed)."""
    if _anyio_asyncio is None:
        return False
    scope_class = getattr(_anyio_asyncio, "CancelScope", None)
    states = getattr(_anyio_asyncio, "_task_states", None)
    state_class = getattr(_anyio_asyncio, "TaskState", None)
    if scope_class is None or states is None or state_class is None:
        return False
    if not all(name in getattr(scope_class, "__slots__", ()) for name in _SCOPE_FIELDS):
        return False
    if "cancel_scope" not in getattr(state_class, "__slots__", ()):
        return False
    return isinstance(getattr(states, "data", None), dict)


class LateScope:
    """The deadline of the code the current task runs in a `with` block, as an anyio
    `CancelScope` would be, except that the scope is built only if `cancel()` is called:

        with LateScope() as deadline:  # made right where the block begins: it notes the place
            result = await work()
        if deadline.cancel_called:
            ...  # cancelled by `deadline.cancel()`; its cancellation was swallowed
    """

    __slots__ = ("_task", "_state", "_base", "_cancelling", "_order", "scope", "cancel_called")

    def __init__(self) -> None:
        """Note where the current task is (no scope is built)."""
        running = tuple(_running_tasks.values()) if _running_tasks is not None else ()
        task = running[0] if len(running) == 1 else _current_task()
        if task is None:  # pragma: no cover - always made in a task
            raise RuntimeError("a LateScope must be entered in an asyncio task")
        state = _states_by_ref.get(_ref(task))  # what WeakKeyDictionary.get does, minus a call
        if state is None:  # the task has never entered an anyio scope: give it its root state
            state = _anyio_asyncio._task_states[task] = _anyio_asyncio.TaskState(None, None)
        self._task = task
        self._state = state
        self._base = state.cancel_scope
        self._cancelling = task.cancelling()
        self._order = next(_entries)  # LateScopes with the same base nest in this order
        #: The real scope, once `cancel()` has spliced one in; and whether it has (a plain
        #: attribute, not a property: it is read after every call).
        self.scope: anyio.CancelScope | None = None
        self.cancel_called = False

    def cancel(self) -> None:
        """Cancel what the task runs inside this scope (from another task, while it waits)."""
        if self.scope is not None:
            return
        task = self._task
        if task.done():
            return
        # Where the new scope goes: below `parent` and above `child`, the outermost scope the
        # task has entered since this LateScope began (None: it runs directly in `parent`).
        # `parent` is the base, or the scope spliced for an enclosing LateScope of the same base.
        base = self._base
        parent = self._state.cancel_scope
        child = None
        while parent is not base:
            if parent is None:  # anyio's invariants broken: refuse rather than corrupt the tree
                # (The tool's name is not at hand here: a LateScope notes nothing of its call.)
                logger.error(
                    "cannot cancel a tool call: its task's cancel scopes do not lead back to where the call began, "
                    "so the call runs on past its deadline; the likely cause is an anyio version other than the "
                    "ones this server was tested with (see the anyio pin in its pyproject.toml)"
                )
                return
            if _spliced.get(id(parent), self._order) < self._order:
                break  # spliced for a LateScope entered before this one, so enclosing it
            child = parent
            parent = parent._parent_scope
        scope: Any = anyio.CancelScope()
        if child is None:
            # The task runs directly in `parent`: the new scope takes it over.
            if parent is not None:
                parent._tasks.discard(task)
            scope._tasks.add(task)
            self._state.cancel_scope = scope
        else:
            if parent is not None:
                parent._child_scopes.discard(child)
            child._parent_scope = scope
            scope._child_scopes.add(child)
        scope._parent_scope = parent
        if parent is not None:
            parent._child_scopes.add(scope)
        scope._host_task = task
        scope._active = True
        scope._cancelling_at_enter = self._cancelling
        self.scope = scope
        self.cancel_called = True
        _spliced[id(scope)] = self._order
        scope.cancel()

    #: Calling the scope cancels it: it can be handed on as the callback that stops the call
    #: (`Session.on_cancel`) without making a bound method on every call.
    __call__ = cancel

    def __enter__(self) -> LateScope:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        """Leave the block; True (swallow `exc`) if it is this scope's own cancellation, as
        `CancelScope.__exit__` decides."""
        scope = self.scope
        if scope is None:
            return False
        _spliced.pop(id(scope), None)
        return bool(scope.__exit__(exc_type, exc, traceback))


#: What `deadline_scope()` returns.
Deadline = LateScope | anyio.CancelScope
#: A call's deadline scope, for a `with` block in the current task: a `LateScope` where anyio's
#: internals have the expected shape, else a plain `anyio.CancelScope` (the old cost).
deadline_scope: Callable[[], Deadline] = LateScope if available() else anyio.CancelScope
