"""The MCP conformance suite (`@modelcontextprotocol/conformance`, pinned) against the standalone
server over streamable HTTP, with the session extension installed and the suite's fixture tools,
resources and prompts hosted from `tests.clients.conformance_tools`.

Every scenario passes except those in `conformance-baseline.yml`, each listed with its reason;
a listed scenario that starts passing fails the run (checked by the CLI and again here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anyio.from_thread
import pytest

from tests.clients.node import CLIENTS, CONFORMANCE, Completed, run_node
from tests.e2e.conftest import Config, ServerProcess, metrics, start_server

BASELINE = CLIENTS / "conformance-baseline.yml"
MODULE = "tests.clients.conformance_tools"
#: The whole suite takes about 5 s on loopback; the bound leaves room for a loaded CI machine.
SUITE_SECONDS = 240.0
SCENARIO_SECONDS = 60.0
_RESULT_DIR = re.compile(r"^server-(?P<name>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


def baseline() -> dict[str, str]:
    """The baseline's scenarios and their reasons (every entry must give one)."""
    entries: dict[str, str] = {}
    for line in BASELINE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s+-\s+(?P<name>[\w-]+)\s*(?:#\s*(?P<reason>.*))?$", line)
        if match:
            assert match["reason"], f"{BASELINE.name}: {match['name']} has no reason (write it after '#')"
            entries[match["name"]] = match["reason"]
    return entries


def results(directory: Path) -> dict[str, list[dict[str, object]]]:
    """Each scenario's checks, from the suite's output directory."""
    found: dict[str, list[dict[str, object]]] = {}
    for path in directory.glob("*/checks.json"):
        match = _RESULT_DIR.match(path.parent.name)
        assert match, f"unexpected result directory {path.parent.name}"
        found[match["name"]] = json.loads(path.read_text(encoding="utf-8"))
    return found


def passed(checks: list[dict[str, object]]) -> bool:
    """The CLI's rule: a scenario fails on any FAILURE or WARNING check."""
    return not any(check["status"] in ("FAILURE", "WARNING") for check in checks)


@pytest.fixture(scope="module")
def conformance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("conformance")
    config: Config = {"server": {"tool_modules": [MODULE]}, "shutdown": {"timeout_seconds": 5.0}}
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, config, transport="streamable-http")) as server,
    ):
        yield server


async def conformance(*args: str) -> Completed:
    return await run_node(CONFORMANCE, args, within=SUITE_SECONDS, cwd=CLIENTS)


async def all_server_scenarios() -> set[str]:
    listed = await conformance("list", "--server")
    assert listed.returncode == 0, listed
    return set(re.findall(r"^\s+-\s+([\w-]+)", listed.stdout, flags=re.MULTILINE))


async def test_every_scenario_passes_except_the_baseline_with_the_extension_installed(
    conformance_server: ServerProcess, tmp_path: Path
) -> None:
    assert conformance_server.url is not None
    expected = await all_server_scenarios()
    assert len(expected) >= 30, expected
    listed = baseline()
    assert set(listed) <= expected, f"baseline names unknown scenarios: {set(listed) - expected}"

    run = await conformance(
        "server", "--url", conformance_server.url, "--suite", "all", "--expected-failures", str(BASELINE),
        "-o", str(tmp_path),
    )  # fmt: skip

    outcome = results(tmp_path)
    failing = {name for name, checks in outcome.items() if not passed(checks)}
    assert failing == set(listed), f"failing {sorted(failing)} != baseline {sorted(listed)}:\n" + "\n".join(
        f"{name}: {check}" for name in sorted(failing - set(listed)) for check in outcome[name] if not passed([check])
    )
    assert set(outcome) == expected, f"scenarios without a result: {expected - set(outcome)}"
    assert run.returncode == 0, str(run)
    assert "Baseline check passed" in run.stdout, str(run)
    assert all(outcome[name] for name in expected - failing), "a passing scenario made no check"

    # The scenarios' tool calls went through the session layer and were all accounted.
    async with conformance_server.client() as client:
        data = await metrics(client)
    assert data["active_sessions"] == 0
    assert data["tools"]["test_simple_text"]["completed"] >= 1
    assert data["tools"]["test_error_handling"]["errors"] >= 1
    assert data["total_sessions_created"] >= 10


async def test_a_baseline_entry_that_now_passes_fails_the_run(
    conformance_server: ServerProcess, tmp_path: Path
) -> None:
    assert conformance_server.url is not None
    stale = tmp_path / "stale.yml"
    stale.write_text("server:\n  - ping\n", encoding="utf-8")

    run = await conformance(
        "server", "--url", conformance_server.url, "--scenario", "ping", "--expected-failures", str(stale)
    )

    assert run.returncode == 1, run
    assert "Stale baseline entries" in run.stdout and "ping" in run.stdout, run


async def test_a_failure_missing_from_the_baseline_fails_the_run(
    conformance_server: ServerProcess, tmp_path: Path
) -> None:
    assert conformance_server.url is not None
    failing = sorted(baseline())
    assert failing, "no scenario in the baseline: this direction cannot be shown against the server"
    empty = tmp_path / "empty.yml"
    empty.write_text("server: []\n", encoding="utf-8")

    run = await conformance(
        "server", "--url", conformance_server.url, "--scenario", failing[0], "--expected-failures", str(empty)
    )

    assert run.returncode == 1, run
    assert "Unexpected failures" in run.stdout and failing[0] in run.stdout, run
