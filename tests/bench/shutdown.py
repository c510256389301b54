"""Figure 5: shutdown returns when the last session ends, or at its timeout — not later.

1,000 open sessions released at spread-out times within 1 s: how long after the last release
does `shutdown` return? And with sessions that never end: how long after its timeout?
"""

from __future__ import annotations

import random
import time

import anyio

from server import SessionManager
from server.config import LimitsSettings
from tests.bench.common import Figure, median_spread


async def _after_last_release() -> float:
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=2000))
    sessions = [manager.create_nowait(expire=False) for _ in range(1000)]
    rng = random.Random(3)
    last = 0.0

    async def release_later(session_id: str, delay: float) -> None:
        nonlocal last
        await anyio.sleep(delay)
        manager.release_nowait(session_id)
        last = max(last, time.perf_counter())

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(release_later, session.id, rng.uniform(0, 1))
        await manager.shutdown(10)
        returned = time.perf_counter()
    return returned - last


async def _after_timeout() -> float:
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=2000))
    for _ in range(1000):
        manager.create_nowait(expire=False)
    started = time.perf_counter()
    await manager.shutdown(0.5)
    return time.perf_counter() - started - 0.5


async def run(quick: bool = False) -> list[Figure]:
    rounds = 2 if quick else 5
    drained = [await _after_last_release() * 1000 for _ in range(rounds)]
    timed_out = [await _after_timeout() * 1000 for _ in range(rounds)]
    d, d_spread = median_spread(drained)
    t, t_spread = median_spread(timed_out)
    return [
        Figure("shutdown return after last release", d, "ms", "<= 20 ms", d <= 20, d_spread),
        Figure("shutdown return after its timeout", t, "ms", "<= 20 ms", t <= 20, t_spread),
    ]
