"""Tool modules: the modules `server.tool_modules` names, imported, their tools registered on an
`MCPServer` and their `setup(server)` hooks run, every failure a config problem naming the module.

Tier: application wiring (beside `server.app`, which builds the standalone server with these).
The standalone server and `--check-config` both go through `import_tool_modules_noting` and then
`install_tool_modules_noting` (every module that imported is installed, whatever the problems of
the others, so that all are reported together), so that a check finds what would make the start fail: a tool the SDK
cannot register (a lambda, a `functools.partial`, a parameter type it has no schema for), a
`setup` that raises, an `async def setup` (never awaited, so it would do nothing), a module that
calls `sys.exit` while imported or set up. What a module raises
need not be an `Exception`: a class of its own derived from `BaseException` is reported the same
way. Only `KeyboardInterrupt` and `StartInterrupted` go through: the process is being stopped.

Each problem reads `server.tool_modules: 'MODULE': reason`, for example:

    server.tool_modules: 'my_tools': cannot import it: ModuleNotFoundError: No module named 'requests'
    server.tool_modules: 'my_tools': setup(server) failed: KeyError: 'API_KEY'
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import MCPServer

from server.config import ConfigError, module_name_problem
from server.sdk_seams import screened_tool_registrations, tool_names
from tools.sessions import MANAGEMENT_TOOLS

#: The longest error text quoted in a problem (a module's own message can be anything).
_QUOTE_CHARS = 300


@dataclass(frozen=True)
class ToolModule:
    """One imported tool module: its `TOOLS`, and its `setup(server)` hook if it has one."""

    name: str
    tools: tuple[Callable[..., Any], ...]
    setup: Callable[[MCPServer[Any]], None] | None


def _key(module_name: str) -> str:
    return f"server.tool_modules: {module_name!r}"


def _one_line(exc: BaseException) -> str:
    """`Type: message`, the message's first line only, shortened: a problem is one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > _QUOTE_CHARS:
        text = text[: _QUOTE_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exit_call(exc: SystemExit) -> str:
    """The `sys.exit(...)` call that raised `exc`, as the module would have written it."""
    return "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"


#: What to do about a module that exits: the usual culprit is a command line parsed at import.
_EXIT_HINT = (
    "a tool module must not exit the process (argparse's parse_args() does, on arguments it does not "
    'know: run it under if __name__ == "__main__":)'
)


#: Why an `async def setup` (or a generator) is refused: called, its body does not run.
_NOT_PLAIN_SETUP = (
    "setup must be a plain function (def setup(server)); {what} is never {verb}, so nothing in it runs: "
    "register what you host in a def setup, and start async work from a tool"
)


def _setup_never_runs(setup: Callable[..., Any]) -> str | None:
    """If calling `setup` would not run its body (an `async def`, whose coroutine nobody awaits, or
    a generator function), what it is, for `_NOT_PLAIN_SETUP`; else None."""
    if inspect.iscoroutinefunction(setup):
        return _NOT_PLAIN_SETUP.format(what="an async def setup", verb="awaited")
    if inspect.isasyncgenfunction(setup) or inspect.isgeneratorfunction(setup):
        return _NOT_PLAIN_SETUP.format(what="a setup that yields", verb="iterated")
    return None


#: What to do about a tool with no name of its own (a lambda, a `functools.partial`).
_NAMELESS_HINT = "; list functions defined with def in TOOLS (a tool takes its name from the function's __name__)"


def _search_roots() -> str:
    """Where a module was looked for, in one phrase: the working directory, PYTHONPATH, the venv."""
    roots = []
    if "" in sys.path or os.getcwd() in sys.path:
        roots.append(f"the working directory ({os.getcwd()})")
    pythonpath = os.environ.get("PYTHONPATH", "")
    roots.append(f"PYTHONPATH ({pythonpath})" if pythonpath else "PYTHONPATH (not set)")
    roots.append("the installed packages")
    return ", ".join(roots[:-1]) + " and " + roots[-1]


#: This product's own top-level packages, imported before any tool module: a project package of
#: the same name (a `tools/` folder in the working directory, say) cannot be imported beside them.
OWN_PACKAGES = ("server", "tools")


def _shadowed(module_name: str, preloaded: bool) -> str | None:
    """Why `module_name`, in a package named like one of this product's own, was not found: a
    package of the user's by that name is shadowed, or (none on the path) which of the product's
    modules is close to the name. For another package (`preloaded`: imported before this module
    was), that the user's package of that name is shadowed, if it is."""
    top = module_name.partition(".")[0]
    if top not in OWN_PACKAGES:
        return _hidden_elsewhere(top, preloaded)
    package = sys.modules.get(top)
    if package is None:
        return None
    hidden = _hidden_by_ours(top)
    if hidden is not None:
        return hidden
    modules = [f"{top}.{info.name}" for info in pkgutil.iter_modules(getattr(package, "__path__", []))]
    near = difflib.get_close_matches(module_name, modules, n=1)
    return f"did you mean {near[0]!r}?" if near else None


class StartInterrupted(BaseException):
    """The process is being stopped while the tool modules import or set up (the CLI raises a
    subclass from its SIGINT/SIGTERM handler): let through, never reported as the module's problem.
    Not a KeyboardInterrupt, which a module may catch (and so swallow the stop) while it imports."""


def _hidden_by_ours(top: str) -> str | None:
    """If the user has a package or module named `top` (one of this product's own packages) on
    the path, the sentence saying it is never imported and to rename it; else None."""
    package = sys.modules.get(top) if top in OWN_PACKAGES else None
    if package is None:
        return None
    own = [os.path.realpath(entry) for entry in getattr(package, "__path__", [])]
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), top)
        for theirs, kind in ((folder, "package"), (folder + ".py", "module")):
            found = os.path.isdir(theirs) if kind == "package" else os.path.isfile(theirs)
            if found and os.path.realpath(theirs) not in own:
                return (
                    f"{top!r} is mcp-session-manager's own package ({', '.join(own)}), imported before any tool "
                    f"module, so your {kind} {theirs} is never looked at: rename yours (e.g. my_{top}) and list "
                    "that name"
                )
    return None


def _hidden_elsewhere(top: str, preloaded: bool) -> str | None:
    """If the module `top` that imports is not the user's `top.py` or `top/` in the working directory
    or on PYTHONPATH (Python's `calendar`, say, which the server imported before any tool module:
    `preloaded`), the sentence saying the user's is never looked at and to rename it; else None."""
    module = sys.modules.get(top)
    if module is None:
        return None
    paths = getattr(module, "__path__", None)
    file = getattr(module, "__file__", None)
    where: list[str] = [str(path) for path in paths] if paths is not None else [str(file)] if file else []
    own = {os.path.realpath(path) for path in where}
    entries = [os.getcwd()] if "" in sys.path or os.getcwd() in sys.path else []
    entries += [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    for entry in entries:
        folder = os.path.join(entry, top)
        for theirs, kind in ((folder, "package"), (folder + ".py", "module")):
            found = os.path.isdir(theirs) if kind == "package" else os.path.isfile(theirs)
            if found and os.path.realpath(theirs) not in own:
                when = "was imported before any tool module" if preloaded else "is found before yours"
                return (
                    f"a module named {top!r} {when} ({', '.join(where) or 'built into Python'}), so your {kind} "
                    f"{theirs} is never looked at: rename yours (e.g. my_{top}) and list that name"
                )
    return None


def _no_tools(module_name: str, preloaded: bool = False) -> str:
    """Why a module without `TOOLS` is refused: most often, a module of the user's own that lacks
    the list, or a module of Python's (`calendar`) imported in place of the user's of that name
    (`preloaded`: imported before); for one of this product's own modules (`server`,
    `tools.sessions`), that it is ours."""
    top = module_name.partition(".")[0]
    if top not in OWN_PACKAGES:
        return _hidden_elsewhere(top, preloaded) or "the module has no TOOLS list (TOOLS = [my_tool, ...])"
    hidden = _hidden_by_ours(top) if module_name == top else None
    return hidden or (
        "a module of mcp-session-manager itself, which hosts no tools: list your own tool modules (the demo "
        'tools are "tools.demo")'
    )


def _import_problem(module_name: str, exc: BaseException, preloaded: bool) -> str:
    """Why importing `module_name` failed, naming where it was looked for if it was not found
    (`preloaded`: its top-level package was imported before it)."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
        shadowed = _shadowed(module_name, preloaded)
        if shadowed is not None:
            return f"cannot import it: {_one_line(exc)}; {shadowed}"
        return f"cannot import it: {_one_line(exc)}; looked for in {_search_roots()}"
    return f"cannot import it: {_one_line(exc)}"


def import_tool_modules(names: Sequence[str]) -> list[ToolModule]:
    """Import each module and collect its `TOOLS` and `setup`.

    A name that is a file path or a relative name is refused without importing anything.

    Raises:
        ConfigError: a name is not a module name, a module does not import (or exits while
            imported), has no `TOOLS`, its `TOOLS` is not a list of callables, its `setup` is not
            callable or is an `async def` (or a generator: its body would never run), or two tools
            share a name; every problem at once.
    """
    modules, problems = import_tool_modules_noting(names)
    if problems:
        raise ConfigError(problems)
    return modules


def import_tool_modules_noting(
    names: Sequence[str], after_each: Callable[[], None] | None = None
) -> tuple[list[ToolModule], list[str]]:
    """As `import_tool_modules`, but the problems are returned, with the modules that can still be
    installed to find theirs: each module that imported with a usable `TOOLS` and `setup`, less
    any tool whose name an earlier one took (so that installing them finds no clash twice). A
    module missing from them (not a module name, not imported, no `TOOLS`, a bad `setup`) has its
    problem among the problems. `after_each`, if given, is called after each import, whatever
    it did (see `server.app.build_app`'s `after_module_code`)."""
    modules: list[ToolModule] = []
    owners: dict[str, str] = {name: "the session extension" for name in MANAGEMENT_TOOLS}
    problems: list[str] = []
    for module_name in names:
        key = _key(module_name)
        shape = module_name_problem(module_name)
        if shape is not None:
            problems.append(f"{key}: {shape}")
            continue
        preloaded = module_name.partition(".")[0] in sys.modules  # (Python's `calendar`, the SDK's `mcp`)
        try:
            module = importlib.import_module(module_name)
        except SystemExit as exc:
            problems.append(f"{key}: called {_exit_call(exc)} while being imported; {_EXIT_HINT}")
            continue
        except (KeyboardInterrupt, StartInterrupted):
            raise  # Ctrl-C, or a signal ending the start (see `server.cli`): the process is being stopped
        except BaseException as exc:  # noqa: BLE001 - any import failure is a config error to report
            problems.append(f"{key}: {_import_problem(module_name, exc, preloaded)}")
            continue
        finally:
            if after_each is not None:
                after_each()
        setup = getattr(module, "setup", None)
        if setup is not None and not callable(setup):
            problems.append(f"{key}: setup must be a function setup(server), got {setup!r:.200}")
            continue
        never_runs = _setup_never_runs(setup) if setup is not None else None
        if never_runs is not None:
            problems.append(f"{key}: {never_runs}")
            continue
        exported = getattr(module, "TOOLS", None)
        if exported is None:
            problems.append(f"{key}: {_no_tools(module_name, preloaded)}")
            continue
        if not isinstance(exported, list | tuple) or not all(callable(fn) for fn in exported):
            problems.append(f"{key}: TOOLS must be a list of functions, got {exported!r:.200}")
            continue
        kept = []
        for fn in exported:
            tool_name = _tool_name(fn)
            if tool_name is not None:  # (a nameless one is refused when registered, with the SDK's reason)
                if tool_name in owners:
                    problems.append(f"{key}: tool {tool_name!r} is already provided by {owners[tool_name]}")
                    continue
                owners[tool_name] = f"module {module_name!r}"
            kept.append(fn)
        modules.append(ToolModule(module_name, tuple(kept), setup))
    return modules, problems


def tools_not_known(names: Sequence[str], modules: Sequence[ToolModule], unfinished: Sequence[str]) -> str:
    """For a `[tools.NAME]` naming no tool while some are not known: which modules' tools, and why
    (`names` listed, `modules` imported, `unfinished` those whose hook did not run to its end), as
    the end of its sentence; "" when every tool is known."""
    imported = {module.name for module in modules}
    parts = [f"{name!r} (refused)" for name in dict.fromkeys(names) if name not in imported]
    parts += [f"{name!r} (its setup(server) did not finish)" for name in unfinished]
    if not parts:
        return ""
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"; the tools of {listed} are not known: it may name one of theirs"


def hosting_nothing(modules: Sequence[ToolModule]) -> list[str]:
    """A note for each module with an empty `TOOLS` and no `setup(server)`: it hosts nothing, most
    likely by mistake (a list left empty). Not a problem, since such a module is harmless and may be
    a placeholder: noted by `--check-config` and warned about at start, as settings that cannot take
    effect are. A module with a `setup` is not noted: its hook may register tools, or other handlers."""
    return [
        f"{_key(module.name)}: its TOOLS is empty and it has no setup(server), so it hosts nothing; "
        "list its tools in TOOLS (TOOLS = [my_tool, ...]), or remove it from server.tool_modules"
        for module in modules
        if not module.tools and module.setup is None
    ]


def load_tool_modules(names: Sequence[str]) -> list[Callable[..., Any]]:
    """Import each module and collect its `TOOLS` (a list of functions); see `import_tool_modules`."""
    return [fn for module in import_tool_modules(names) for fn in module.tools]


def _tool_name(fn: Callable[..., Any]) -> str | None:
    """The name `fn` is registered under (its `__name__`), or None if it has no usable one."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name != "<lambda>" else None


def install_tool_modules(server: MCPServer[Any], modules: Sequence[ToolModule]) -> None:
    """Register every module's tools on `server` with `add_tool`, then run the `setup(server)` hooks.

    The hooks run only once every tool is registered (a hook may rely on them). A tool a hook
    registers is hosted like those of `TOOLS` (a session per call, its `[tools.NAME]` settings),
    and its name must be free as theirs must: a name already taken (by a session tool, a module's
    `TOOLS` or another hook) is a problem, where the SDK would keep the first tool and only log.
    A hook may remove a tool (`server.remove_tool`), but not a session tool; the name is then free
    again, for a tool of this hook or a later one.

    Raises:
        ConfigError: a tool the SDK refuses, a hook that raises or exits, a hook returning an
            awaitable (nothing awaits it), a hook registering a tool under a name already taken,
            or one removing a session tool; every problem at once.
    """
    problems = install_tool_modules_noting(server, modules).problems
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class Installed:
    """What `install_tool_modules_noting` found."""

    #: One line per problem, as `install_tool_modules` raises them.
    problems: list[str]
    #: The names of tools of `TOOLS` the SDK refused (a table naming one is no second problem).
    refused: list[str]
    #: The modules whose `setup(server)` did not run to its end: the tools it would have
    #: registered are not known.
    unfinished: list[str]
    #: Each tool a hook removed (`server.remove_tool`), and the module whose hook did: not hosted.
    removed: dict[str, str]
    #: One sentence per tool a hook removed, or replaced with one of its own under the same name,
    #: to note (not a problem: a hook may mean it).
    notes: list[str]


def install_tool_modules_noting(
    server: MCPServer[Any], modules: Sequence[ToolModule], after_each: Callable[[], None] | None = None
) -> Installed:
    """As `install_tool_modules`, but what it finds is returned. Every hook runs, even once a tool
    the SDK refused makes the start fail, so that their problems are reported together.
    `after_each`, if given, is called after each hook, whatever it did."""
    problems: list[str] = []
    refused: list[str] = []
    unfinished: list[str] = []
    removed: dict[str, str] = {}
    notes: list[str] = []
    removal_notes: dict[str, str] = {}  # the note of each tool in `removed`
    owners: dict[str, str] = {name: "the session extension" for name in MANAGEMENT_TOOLS}
    owner_modules: dict[str, tuple[str, ...]] = {}  # the module behind each owner, if a module
    for module in modules:
        for fn in module.tools:
            name = _tool_name(fn)
            try:
                server.add_tool(fn)
            except Exception as exc:  # noqa: BLE001 - any refusal by the SDK is a config error to report
                if name is not None:
                    refused.append(name)
                label = repr(name) if name is not None else f"{getattr(fn, '__name__', None) or fn!r:.200}"
                hint = "" if name is not None else _NAMELESS_HINT
                problems.append(f"{_key(module.name)}: tool {label} cannot be registered: {_one_line(exc)}{hint}")
                continue
            if name is not None and name not in owners:  # (the SDK keeps the first tool of a name)
                owners[name] = f"module {module.name!r} (in its TOOLS)"
                owner_modules[name] = (module.name,)
    for module in modules:
        if module.setup is None:
            continue
        key = _key(module.name)

        def admit(fn: Callable[..., Any], name: str | None, key: str = key, module: ToolModule = module) -> bool:
            tool_name = name if name is not None else _tool_name(fn)
            if tool_name is None:
                return True  # nameless: the SDK refuses it, and the hook fails with its reason
            owner = owners.get(tool_name)
            if owner is not None:
                if tool_name in MANAGEMENT_TOOLS or tool_name in tool_names(server):
                    problems.append(
                        f"{key}: setup(server) registers tool {tool_name!r}, a name already taken by {owner}; "
                        "give one of them another name"
                    )
                    return False
                # A name a hook removed (`server.remove_tool`) is free again: this one replaces it.
                if tool_name in removed:  # by an earlier hook: it is hosted after all
                    del removed[tool_name]
                    notes.remove(removal_notes.pop(tool_name))
                if module.name not in owner_modules.get(tool_name, ()):
                    notes.append(f"{key}: setup(server) replaces tool {tool_name!r}, registered by {owner}")
            owners[tool_name] = f"the setup(server) of module {module.name!r}"
            owner_modules[tool_name] = (module.name,)
            return True

        before = set(tool_names(server))
        try:
            with screened_tool_registrations(server, admit):
                # tools, resources, prompts, other handlers; tools/call goes through the sessions
                returned = module.setup(server)
            if inspect.isawaitable(returned):  # an object whose __call__ is an async def, say
                if inspect.iscoroutine(returned):
                    returned.close()  # never awaited: no RuntimeWarning for it
                problems.append(
                    f"{key}: "
                    + _NOT_PLAIN_SETUP.format(what=f"a setup returning {type(returned).__name__}", verb="awaited")
                )
                unfinished.append(module.name)
        except SystemExit as exc:
            problems.append(f"{key}: setup(server) called {_exit_call(exc)}; {_EXIT_HINT}")
            unfinished.append(module.name)
        except (KeyboardInterrupt, StartInterrupted):
            raise  # as for an import: the process is being stopped
        except BaseException as exc:  # noqa: BLE001 - any failure of a hook is a config error to report
            problems.append(f"{key}: setup(server) failed: {_one_line(exc)}")
            unfinished.append(module.name)
        finally:
            if after_each is not None:
                after_each()
        after = set(tool_names(server))
        for name in after - before:  # those added past add_tool too
            owners.setdefault(name, f"the setup(server) of module {module.name!r}")
        for name in sorted(before - after):  # `server.remove_tool(name)`
            if name in MANAGEMENT_TOOLS:
                problems.append(
                    f"{key}: setup(server) removes session tool {name!r}; the session tools are the session "
                    "extension's (its clients create, release and count sessions with them): leave them registered"
                )
                continue
            removed[name] = module.name
            removal_notes[name] = (
                f"{key}: setup(server) removes tool {name!r}, registered by {owners.get(name, 'the server')}: "
                "it is not hosted"
            )
            notes.append(removal_notes[name])
    return Installed(problems, refused, unfinished, removed, notes)
