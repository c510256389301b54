"""Figure 4: memory. Run in a fresh process (`python -m tests.bench.memory`), it prints JSON.

1,000,000 sessions created and released: resident memory after the first 10,000 may grow by
less than 10 MB (bounded duration statistics, nothing kept per finished session). Then the
resident cost of one open session (no metadata), which must stay under 1 KB.
"""

from __future__ import annotations

import gc
import json
import sys

from server import SessionManager
from server.config import LimitsSettings


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(total: int = 1_000_000, open_count: int = 100_000) -> dict[str, float]:
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=open_count + 10))
    create, release = manager.create_nowait, manager.release_nowait
    for _ in range(10_000):
        release(create(tool="t").id)
    gc.collect()
    after_warmup = rss_bytes()
    for _ in range(total - 10_000):
        release(create(tool="t").id)
    gc.collect()
    growth = rss_bytes() - after_warmup
    before_open = rss_bytes()
    held = [create(tool="t") for _ in range(open_count)]
    gc.collect()
    per_session = (rss_bytes() - before_open) / open_count
    del held
    return {"growth_mb": growth / 2**20, "per_open_session_bytes": per_session}


if __name__ == "__main__":
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    sys.stdout.write(json.dumps(main(total)) + "\n")
