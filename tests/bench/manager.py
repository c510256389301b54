"""Figure 2: SessionManager create+release pairs per second with 0, 1,000 and 10,000 open.

Admission is O(1), so the rate with 10,000 sessions open must stay within 0.8x of the rate
with none. Rounds interleave the three cases in one process, alternating their order so that
neither case always runs first; the scaling ratio is computed per round.
"""

from __future__ import annotations

import time

from server import SessionManager
from server.config import LimitsSettings
from tests.bench.common import Figure, median_spread


def _rate(open_sessions: int, pairs: int) -> float:
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=open_sessions + 10))
    for _ in range(open_sessions):
        manager.create_nowait(metadata={"k": "v"})
    create, release = manager.create_nowait, manager.release_nowait
    started = time.perf_counter()
    for _ in range(pairs):
        release(create().id)
    return pairs / (time.perf_counter() - started)


async def run(quick: bool = False) -> list[Figure]:
    rounds = 6 if quick else 14
    pairs = 20_000 if quick else 50_000
    rates: dict[int, list[float]] = {0: [], 1000: [], 10_000: []}
    for i in range(rounds):
        for open_sessions in list(rates) if i % 2 == 0 else list(rates)[::-1]:
            rates[open_sessions].append(_rate(open_sessions, pairs))
    figures = []
    zero, zero_spread = median_spread(rates[0])
    figures.append(Figure("manager pairs/s, 0 open", zero, "/s", ">= 100000", zero >= 100_000, zero_spread))
    for open_sessions in (1000, 10_000):
        value, spread = median_spread(rates[open_sessions])
        figures.append(Figure(f"manager pairs/s, {open_sessions} open", value, "/s", "info", True, spread))
    ratios = [rates[10_000][i] / rates[0][i] for i in range(rounds)]
    ratio, ratio_spread = median_spread(ratios)
    figures.append(Figure("manager rate ratio, 10000 open / 0 open", ratio, "x", ">= 0.8", ratio >= 0.8, ratio_spread))
    return figures
