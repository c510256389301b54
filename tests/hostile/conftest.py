"""A standalone server process over stdio shared by a module, driven by raw JSON-RPC lines.

The hostile client is raw on purpose: the SDK's client validates and serializes what it sends
(NaN becomes null, say), and a careless or hostile client does neither. The process runs in
a blocking portal's event loop so that (sync) hypothesis tests can call it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from anyio.from_thread import BlockingPortal

from tests.e2e.conftest import ServerProcess, server_config, start_server

ENDED = ("completed", "error", "timeout", "cancelled")


@dataclass
class Raw:
    """A raw JSON-RPC client of one server process, callable from sync code."""

    portal: BlockingPortal
    server: ServerProcess

    def request(self, method: str, params: dict[str, Any], within: float = 30.0) -> dict[str, Any]:
        return self.portal.call(lambda: self.server.request(method, params, within))

    def call(self, tool: str, arguments: Any) -> dict[str, Any]:
        """A raw `tools/call`; returns the whole response (a result or a protocol error)."""
        return self.request("tools/call", {"name": tool, "arguments": arguments})

    def metrics(self) -> dict[str, Any]:
        response = self.call("session_metrics", {})
        data: dict[str, Any] = response["result"]["structuredContent"]
        accounted = data["active_sessions"] + sum(data[f"total_sessions_{state}"] for state in ENDED)
        assert data["total_sessions_created"] == accounted, f"invariant broken: {data}"
        return data

    def rss_kib(self) -> int:
        """The server's resident memory (Linux)."""
        pid = self.server.process.pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Raw]:
    directory = tmp_path_factory.mktemp("hostile")
    config = server_config(shutdown={"timeout_seconds": 1.0})
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(start_server(directory, config)) as server,
    ):
        portal.call(server.initialize)
        yield Raw(portal, server)
        assert server.returncode is None, f"the server died:\n{server.stderr}"
        assert server.stray_stdout == []
