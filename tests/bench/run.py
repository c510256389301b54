"""`make bench`: run every benchmark, print one table, write bench-results.json.

Usage: python -m tests.bench.run [--quick] [--only NAME ...] [--out PATH]
Exit status 1 if any target fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import anyio

from tests.bench import cluster, deadlines, manager, overhead, shutdown
from tests.bench.common import Figure, median_spread, table

BENCHES = {
    "overhead": overhead.run,
    "manager": manager.run,
    "deadlines": deadlines.run,
    "shutdown": shutdown.run,
    "cluster": cluster.run,
}


def _memory(quick: bool) -> list[Figure]:
    growth: list[float] = []
    per_session: list[float] = []
    for _ in range(1 if quick else 3):
        args = [sys.executable, "-m", "tests.bench.memory"] + (["200000"] if quick else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600).stdout
        data = json.loads(out)
        growth.append(data["growth_mb"])
        per_session.append(data["per_open_session_bytes"])
    g, g_spread = median_spread(growth)
    p, p_spread = median_spread(per_session)
    sessions = "200k" if quick else "1M"
    return [
        Figure(f"memory growth after 10k, {sessions} sessions", g, "MB", "< 10 MB", g < 10, g_spread),
        Figure("memory per open session", p, "B", "< 1024 B", p < 1024, p_spread),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=[*BENCHES, "memory"], help="run only these")
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args()
    chosen = args.only or [*BENCHES, "memory"]
    figures: list[Figure] = []
    started = time.monotonic()
    for name in chosen:
        sys.stderr.write(f"bench: {name} ...\n")
        if name == "memory":
            figures += _memory(args.quick)
        else:
            figures += anyio.run(BENCHES[name], args.quick)
    sys.stdout.write(table(figures) + "\n")
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "quick": args.quick,
                "seconds": round(time.monotonic() - started, 1),
                "figures": [f.to_json() for f in figures],
            },
            out,
            indent=2,
        )
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
