"""Tool modules imported, registered on a real `MCPServer` and set up, as the standalone server and
`--check-config` both do it: every failure a config problem naming the module, nothing escaping.

The fixture modules are in `tests/fixtures_config/`; the ones that print, read stdin or parse the
command line at import are left to the CLI tests, which run them in a process of their own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from server import ConfigError, load_settings
from server.app import build_app
from server.sdk_seams import tool_names
from server.tool_modules import ToolModule, import_tool_modules, install_tool_modules, install_tool_modules_noting

FIXTURES = "tests.fixtures_config"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MCP_SESSIONS_"):
            monkeypatch.delenv(name)


def problems_building(*modules: str) -> list[str]:
    """The problems `build_app` raises for settings hosting `modules` (asserting it raises)."""
    settings = load_settings(None, {"server": {"tool_modules": list(modules)}})
    with pytest.raises(ConfigError) as caught:
        build_app(settings)
    return caught.value.problems


def test_a_module_name_that_is_a_file_path_is_refused_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # importlib would take "good_tools.py" as the submodule `py` of `good_tools`, and import that first.
    monkeypatch.delitem(sys.modules, f"{FIXTURES}.good_tools", raising=False)

    with pytest.raises(ConfigError) as caught:
        import_tool_modules([f"{FIXTURES}.good_tools.py", "tests/fixtures_config/good_tools", ".good_tools"])

    assert f"{FIXTURES}.good_tools" not in sys.modules
    assert caught.value.problems == [
        f"server.tool_modules: '{FIXTURES}.good_tools.py': is a file path, not a module name; write the module's"
        f' dotted name, e.g. "tests.fixtures_config.good_tools"; modules are found from the working directory'
        " and PYTHONPATH",
        "server.tool_modules: 'tests/fixtures_config/good_tools': is a file path, not a module name; write the"
        ' module\'s dotted name, e.g. "tests.fixtures_config.good_tools"; modules are found from the working'
        " directory and PYTHONPATH",
        "server.tool_modules: '.good_tools': is a relative module name; write the full dotted name, e.g."
        ' "my_package.good_tools"; modules are found from the working directory and PYTHONPATH',
    ]


def test_a_module_that_is_not_found_names_where_it_was_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/opt/mcp-tools")
    monkeypatch.syspath_prepend(os.getcwd())

    with pytest.raises(ConfigError) as caught:
        import_tool_modules(["no_such_tools", "no_such_package.tools"])

    assert caught.value.problems == [
        f"server.tool_modules: '{name}': cannot import it: ModuleNotFoundError: No module named '{missing}';"
        f" looked for in the working directory ({os.getcwd()}), PYTHONPATH (/opt/mcp-tools) and the installed"
        " packages"
        for name, missing in [("no_such_tools", "no_such_tools"), ("no_such_package.tools", "no_such_package")]
    ]


def test_a_misspelt_module_of_the_product_s_own_package_is_told_the_close_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # No package of the user's is named `tools` here: the name is a typo of the demo module,
    # not a clash to rename away.
    monkeypatch.chdir(Path(__file__).parent)

    with pytest.raises(ConfigError) as caught:
        import_tool_modules(["tools.dmeo"])

    assert caught.value.problems == [
        "server.tool_modules: 'tools.dmeo': cannot import it: ModuleNotFoundError: No module named 'tools.dmeo';"
        " did you mean 'tools.demo'?"
    ]


@pytest.mark.parametrize("name", ["server", "tools"])
def test_a_plain_file_named_like_the_product_s_package_is_not_called_a_package_of_the_user_s(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A launcher script called `server` (no .py) is no module: Python never imports it, so the
    # sentence about a package of the user's being hidden would send them after the wrong thing.
    (tmp_path / name).write_text("#!/bin/sh\nexec mcp-session-manager\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigError) as caught:
        import_tool_modules([name])

    assert caught.value.problems == [f"server.tool_modules: {name!r}: {OURS_HOST_NO_TOOLS}"]


OURS_HOST_NO_TOOLS = (
    "a module of mcp-session-manager itself, which hosts no tools: list your own tool modules"
    ' (the demo tools are "tools.demo")'
)


@pytest.mark.parametrize("name", ["server", "tools", "server.config", "tools.sessions"])
def test_a_module_of_the_product_itself_is_refused_as_ours_not_as_one_lacking_tools(name: str) -> None:
    # "the module has no TOOLS list" would send the user to add one to our package.
    with pytest.raises(ConfigError) as caught:
        import_tool_modules([name])

    assert caught.value.problems == [f"server.tool_modules: {name!r}: {OURS_HOST_NO_TOOLS}"]


def test_a_module_whose_own_import_is_missing_says_only_that(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_a_package.py").write_text("import no_such_dependency\nTOOLS = []\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigError) as caught:
        import_tool_modules(["needs_a_package"])

    assert caught.value.problems == [
        "server.tool_modules: 'needs_a_package': cannot import it: ModuleNotFoundError:"
        " No module named 'no_such_dependency'"
    ]


def test_a_module_calling_sys_exit_while_imported_is_a_problem_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        import_tool_modules([f"{FIXTURES}.exits_at_import"])

    [problem] = caught.value.problems
    assert problem.startswith(
        f"server.tool_modules: '{FIXTURES}.exits_at_import': called sys.exit(3) while being imported;"
        " a tool module must not exit the process"
    ), problem


def test_a_module_raising_a_base_exception_of_its_own_while_imported_is_a_problem_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        import_tool_modules([f"{FIXTURES}.raises_base_exception_at_import"])

    assert caught.value.problems == [
        f"server.tool_modules: '{FIXTURES}.raises_base_exception_at_import': cannot import it:"
        " FixtureAbort: fixture module aborting its import on purpose"
    ]


def test_a_setup_hook_raising_a_base_exception_of_its_own_is_a_problem_naming_the_module() -> None:
    assert problems_building(f"{FIXTURES}.setup_raises_base_exception") == [
        f"server.tool_modules: '{FIXTURES}.setup_raises_base_exception': setup(server) failed:"
        " FixtureAbort: no licence server"
    ]


def test_a_module_hosting_nothing_is_noted_and_one_whose_setup_registers_tools_is_not() -> None:
    settings = load_settings(None, {"server": {"tool_modules": [f"{FIXTURES}.empty_tools", f"{FIXTURES}.setup_only"]}})

    app = build_app(settings)

    assert app.ineffective() == [
        f"server.tool_modules: '{FIXTURES}.empty_tools': its TOOLS is empty and it has no setup(server), so it"
        " hosts nothing; list its tools in TOOLS (TOOLS = [my_tool, ...]), or remove it from server.tool_modules"
    ]
    assert "registered_by_setup" in tool_names(app.server)


def test_a_keyboard_interrupt_while_a_module_imports_still_stops_the_start() -> None:
    # Ctrl-C (under Python's own handler) is the user stopping the process, not a module's fault.
    with pytest.raises(KeyboardInterrupt):
        import_tool_modules([f"{FIXTURES}.interrupted_at_import"])


def test_tools_without_a_name_of_their_own_are_problems_naming_each() -> None:
    problems = problems_building(f"{FIXTURES}.nameless_tools")

    assert len(problems) == 2, problems
    lambda_problem, partial_problem = problems
    key = f"server.tool_modules: '{FIXTURES}.nameless_tools'"
    hint = "; list functions defined with def in TOOLS (a tool takes its name from the function's __name__)"
    assert lambda_problem == (
        f"{key}: tool '<lambda>' cannot be registered: ValueError: You must provide a name for lambda functions{hint}"
    )
    assert partial_problem.startswith(f"{key}: tool functools.partial(<function scale at "), partial_problem
    assert partial_problem.endswith(
        "cannot be registered: AttributeError: 'functools.partial' object has no attribute '__name__'" + hint
    ), partial_problem


class Opaque:
    """A parameter type pydantic has no JSON schema for."""


def takes_opaque(value: Opaque) -> str:
    return "never"


def test_a_tool_the_sdk_cannot_describe_is_a_problem_with_the_first_line_of_its_error() -> None:
    with pytest.raises(ConfigError) as caught:
        install_tool_modules(MCPServer("t"), [ToolModule("my_tools", (takes_opaque,), None)])

    [problem] = caught.value.problems
    assert problem.startswith(
        "server.tool_modules: 'my_tools': tool 'takes_opaque' cannot be registered: PydanticInvalidForJsonSchema:"
    ), problem
    assert "\n" not in problem


def test_a_setup_hook_that_raises_is_a_problem_naming_the_module_and_the_error() -> None:
    assert problems_building(f"{FIXTURES}.good_tools", f"{FIXTURES}.setup_raises") == [
        f"server.tool_modules: '{FIXTURES}.setup_raises': setup(server) failed: KeyError: 'API_KEY'"
    ]


def test_a_setup_hook_calling_sys_exit_is_a_problem_naming_the_module() -> None:
    [problem] = problems_building(f"{FIXTURES}.exits_in_setup")

    assert problem.startswith(
        f"server.tool_modules: '{FIXTURES}.exits_in_setup': setup(server) called sys.exit('no database');"
    ), problem


def test_a_tool_a_setup_hook_registers_under_a_taken_name_is_a_problem_naming_what_it_clashes_with() -> None:
    # The SDK keeps the first tool of a name and only logs "Tool already exists": the hook's tool
    # would silently not be hosted (and a session tool's name not be the session tool's).
    problems = problems_building(f"{FIXTURES}.good_tools", f"{FIXTURES}.setup_clashes")

    key = f"server.tool_modules: '{FIXTURES}.setup_clashes'"
    assert problems == [
        f"{key}: setup(server) registers tool 'session_metrics', a name already taken by the session extension;"
        " give one of them another name",
        f"{key}: setup(server) registers tool 'shout', a name already taken by module '{FIXTURES}.good_tools'"
        " (in its TOOLS); give one of them another name",
    ]


def test_a_tool_two_setup_hooks_register_is_a_problem_naming_the_first_hook() -> None:
    with pytest.raises(ConfigError) as caught:
        install_tool_modules(
            MCPServer("t"),
            [ToolModule("first", (), _registers_lookup), ToolModule("second", (), _registers_lookup)],
        )

    assert caught.value.problems == [
        "server.tool_modules: 'second': setup(server) registers tool 'lookup', a name already taken by the"
        " setup(server) of module 'first'; give one of them another name"
    ]


def _registers_lookup(server: MCPServer[Any]) -> None:
    def lookup(key: str) -> str:
        return key

    server.add_tool(lookup)


def _lookup(key: str) -> str:
    return key


def _replaces_lookup(server: MCPServer[Any]) -> None:
    """A hook that swaps its module's `TOOLS` tool for a configured one of the same name."""

    def lookup(key: str) -> str:
        return key.upper()

    server.remove_tool("_lookup")
    server.add_tool(lookup, name="_lookup")


async def test_a_setup_hook_may_replace_a_tool_it_removed_with_one_of_the_same_name() -> None:
    # The name is free again once removed: a hook that configures its module's tool this way is no clash.
    server: MCPServer[Any] = MCPServer("t")

    install_tool_modules(server, [ToolModule("my_tools", (_lookup,), _replaces_lookup)])

    with anyio.fail_after(10):
        async with Client(server) as client:
            result = await client.call_tool("_lookup", {"key": "abc"})
    assert not result.is_error and result.structured_content == {"result": "ABC"}


def test_a_setup_hook_replacing_another_module_s_tool_is_noted_as_replacing_it() -> None:
    installed = install_tool_modules_noting(
        MCPServer("t"), [ToolModule("first", (_lookup,), None), ToolModule("second", (), _replaces_lookup)]
    )

    assert installed.problems == [] and installed.removed == {}
    assert installed.notes == [
        "server.tool_modules: 'second': setup(server) replaces tool '_lookup', registered by module 'first'"
        " (in its TOOLS)"
    ]


def _registers_its_own_takes_opaque(server: MCPServer[Any]) -> None:
    def takes_opaque(value: str) -> str:
        return value

    server.add_tool(takes_opaque)


def test_a_hook_registering_the_name_of_a_tool_the_sdk_refused_is_not_noted_as_replacing_it() -> None:
    installed = install_tool_modules_noting(
        MCPServer("t"),
        [ToolModule("first", (takes_opaque,), None), ToolModule("second", (), _registers_its_own_takes_opaque)],
    )

    [refused] = installed.problems
    assert refused.startswith("server.tool_modules: 'first': tool 'takes_opaque' cannot be registered:"), refused
    assert installed.notes == []  # 'first' never had a tool of that name to replace


def _removes_lookup(server: MCPServer[Any]) -> None:
    server.remove_tool("_lookup")


def _registers_other_lookup(server: MCPServer[Any]) -> None:
    server.add_tool(_lookup)


def test_a_tool_one_hook_removes_and_a_later_one_registers_again_is_hosted_not_noted_as_removed() -> None:
    server: MCPServer[Any] = MCPServer("t")

    installed = install_tool_modules_noting(
        server, [ToolModule("first", (_lookup,), _removes_lookup), ToolModule("second", (), _registers_other_lookup)]
    )

    assert installed.problems == [] and installed.removed == {}
    assert installed.notes == [
        "server.tool_modules: 'second': setup(server) replaces tool '_lookup', registered by module 'first'"
        " (in its TOOLS)"
    ]
    assert "_lookup" in tool_names(server)


async def test_a_tool_a_setup_hook_registers_is_hosted_and_takes_its_per_tool_settings() -> None:
    module = f"{FIXTURES}.setup_registers_tool"
    settings = load_settings(
        None, {"server": {"tool_modules": [module]}, "tools": {"lookup_later": {"timeout_seconds": 7.0}}}
    )

    app = build_app(settings)

    assert {"lookup_now", "lookup_later"} <= set(tool_names(app.server))
    assert app.sessions.config.timeout_for("lookup_later") == 7.0
    with anyio.fail_after(10):
        async with Client(app.server) as client:
            result = await client.call_tool("lookup_later", {"key": "abc"})
            metrics = (await client.call_tool("session_metrics", {})).structured_content
    assert not result.is_error and result.structured_content == {"result": "ABC"}
    assert metrics is not None and metrics["tools"]["lookup_later"]["calls"] == 1  # through a session


@pytest.fixture
def own_logging() -> Iterator[None]:
    """The standalone server's reload applies `[logging]` to the process (its root logger, the
    session-end logger's level, the logging module's flags): put them back afterwards."""
    root, ends = logging.getLogger(), logging.getLogger("server.sessions.ends")
    handlers, levels = list(root.handlers), (root.level, ends.level)
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(levels[0])
        ends.setLevel(levels[1])
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = flags


@pytest.mark.usefixtures("own_logging")
def test_a_reload_bringing_a_table_for_a_tool_a_setup_hook_registers_applies_it(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\ntool_modules = ["{FIXTURES}.setup_registers_tool"]\n', encoding="utf-8")
    app = build_app(load_settings(path))
    path.write_text(
        f'[server]\ntool_modules = ["{FIXTURES}.setup_registers_tool"]\n[tools.lookup_later]\nmax_concurrent = 2\n',
        encoding="utf-8",
    )

    assert app.reloader(path).reload() is True
    assert app.sessions.config.tool_caps() == {"lookup_later": 2}
