"""A model-based test of the queue's hand-over (server.intake): random runs of thousands of steps
through the manager's own synchronous entry points, against the hand-over as first written.

Why: the hand-over takes the oldest waiter that fits off a heap of lines (`ManagerState._ready`)
whose entries are put in at a few places (a line's first call changes, a call of its tool ends,
the limits change) and dropped only when they come to the top. One push forgotten loses a
wake-up in one interleaving only, which the comparison through real tasks in test_admission
(`test_the_hand_over_admits_and_refuses_exactly_as_a_look_at_every_line_would`) reaches in few
of its runs. Here no step awaits: a call arrives as `Intake.create` admits, refuses or queues
it up to its await, and a waiter leaves the queue as `Intake._wait_in_queue` takes it out when
its caller is cancelled or its queue timeout passes; a run of a thousand steps takes a fraction
of a second, so the suite takes many thousands. Two managers take the same steps,
`SessionManager` and test_admission's `_ScanningManager` (a look at the first call of every
line per freed slot), and after every step they must agree on what runs, what waits, what was
refused and what every counter says; the heap manager must also keep:

- I1 no lost wake-up: while a server slot is free, no queued call's tool has room;
- I2 a complete heap: every line whose tool has room has its first call's entry in `_ready`;
- I3 a bounded heap: `_ready` never holds more than 2 entries a line (at the most lines seen)
  plus 64, the point where it is made again from the lines, and none while nothing waits;
- I4 the lines are the queue: each queued call in its line, each line in order and not empty,
  the calls that need a thread listed in order, the tools' and clients' counts as the
  sessions and waiters make them;
- I5 no arrival in `_ready` under two lines (a heap comparing None with a tool's name raises).

A run ends with a shutdown, which must refuse every waiter and leave nothing counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from server import SessionError, SessionManager, SessionState
from server.admission import Waiter
from server.config import LimitsSettings
from server.session import Session
from tests.unit.test_admission import _ScanningManager

#: The tools calls are made for: "a" and "b" have caps from the start, None is `session_create`'s.
BASE_TOOLS: list[str | None] = ["a", "a", "b", "c", "d", "e", None]
CAPPABLE = ["a", "b", "c", "d", "e"]
ENDED_STATES = [SessionState.COMPLETED, SessionState.ERROR, SessionState.TIMEOUT, SessionState.CANCELLED]


def _extra_tools(count: int) -> list[str]:
    return [f"t{n}" for n in range(count)]


def _arrive(
    sessions: SessionManager, tool: str | None, needs_thread: bool, client: Hashable | None, queue: bool
) -> Session | Waiter:
    """A call arrives as `Intake.create` takes it up to its await: admitted (its session), queued
    (its waiter) or refused (`SessionError`, counted)."""
    session = sessions._prepare(
        tool=tool, needs_thread=needs_thread, client=client, timeout_seconds=300.0, expire=False
    )
    with sessions._lock:
        if session.tool is None:
            session.id = sessions._signed_id_locked()
        if sessions._admit_locked(session):
            return session
        if not queue or len(sessions._queue) >= sessions.limits.max_queued:
            raise sessions._full_locked(session, may_queue=queue)
        return sessions._enqueue_locked(session)


def _cancel_in_queue(sessions: SessionManager, waiter: Waiter) -> None:
    """The waiter's caller is cancelled while it waits, as `Intake._wait_in_queue` handles it."""
    with sessions._lock:
        assert not waiter.admitted and waiter.refusal is None
        sessions._leave_queue_locked(waiter)
        sessions._queue_cancelled += 1


def _wait_out(sessions: SessionManager, waiter: Waiter) -> SessionError:
    """The waiter's queue timeout passes, as `Intake._wait_in_queue` handles it."""
    with sessions._lock:
        assert not waiter.admitted and waiter.refusal is None
        return sessions._waited_out_locked(waiter)


@dataclass(frozen=True)
class _Shape:
    """What a run draws from: the tools capped at 1 from the start beside the base ones, the
    server caps and queue sizes new limits take, and how often each operation comes (in
    `OPERATIONS` order: a busier queue when arrivals outweigh the ends)."""

    extra_tools: int = 0
    slots: tuple[int, ...] = (1, 2, 3, 5, 8)
    queues: tuple[int, ...] = (5, 40, 400)
    weights: tuple[int, ...] = (40, 5, 25, 8, 7, 3, 2, 10)


OPERATIONS = ["arrive", "open_call", "end", "leave", "threads", "reset_metrics", "end_reservations", "set_limits"]


class _World:
    """One manager and what its callers know: the calls running and waiting, and how each went,
    by the step the call arrived at."""

    def __init__(self, sessions: SessionManager, shape: _Shape) -> None:
        self.sessions = sessions
        self.shape = shape
        extra = _extra_tools(shape.extra_tools)
        self.tools = BASE_TOOLS + list(extra)
        self.cappable = CAPPABLE + extra
        self.running: dict[int, Session] = {}
        self.waiting: dict[int, Waiter] = {}
        self.outcome: dict[int, str] = {}

    def step(self, rng: random.Random, n: int) -> None:
        """Take step `n`: one operation drawn from `rng` (the other manager's world draws the same)."""
        sessions = self.sessions
        [operation] = rng.choices(OPERATIONS, self.shape.weights)
        if operation == "arrive":  # with or without a thread, a client; some may not queue
            tool = rng.choice(self.tools)
            needs_thread = rng.random() < 0.15
            client = rng.choice([None, None, "x", "y"])
            try:
                arrived = _arrive(sessions, tool, needs_thread, client, queue=rng.random() < 0.95)
            except SessionError as refused:
                self.outcome[n] = f"refused {refused.code.value}"
                return
            if isinstance(arrived, Session):
                self.running[n] = arrived
                self.outcome[n] = "admitted"
            else:
                self.waiting[n] = arrived
        elif operation == "open_call":  # the extension's fast path (None: the call goes to `create`)
            try:
                session = sessions.open_call(rng.choice(["a", "b", "c", "f"]), 300.0, None, rng.random() < 0.1, None)
            except SessionError as refused:
                self.outcome[n] = f"refused {refused.code.value}"
                return
            if session is not None:
                self.running[n] = session
                self.outcome[n] = "admitted (open_call)"
        elif operation == "end" and self.running:  # one call ends, or several at once, in any state
            for k in rng.sample(sorted(self.running), min(len(self.running), rng.choice([1, 1, 1, 2, 4]))):
                session = self.running[k]
                if session.tool is None and rng.random() < 0.3:
                    sessions.release_nowait(session.id, tool_calls=False)  # its client releases it
                else:
                    sessions.end(session, rng.choice(ENDED_STATES))
        elif operation == "leave" and self.waiting:  # a waiter is cancelled, or its queue timeout passes
            k = rng.choice(sorted(self.waiting))
            if rng.random() < 0.5:
                _cancel_in_queue(sessions, self.waiting[k])
                self.outcome[k] = "cancelled in queue"
            else:
                self.outcome[k] = f"refused {_wait_out(sessions, self.waiting[k]).code.value}"
        elif operation == "threads":  # a sync call's thread gets stuck past its deadline, or returns
            if sessions._abandoned and rng.random() < 0.5:
                sessions.thread_ended()
            else:
                sessions.thread_abandoned()
        elif operation == "reset_metrics":
            sessions.reset_metrics()
        elif operation == "end_reservations":  # a stdio client closed stdin
            sessions.end_reservations("gone")
        elif operation == "set_limits":  # with new caps (the queue lined up again), or the caps in force
            limits = LimitsSettings(
                max_concurrent_sessions=rng.choice(self.shape.slots),
                max_queued=rng.choice(self.shape.queues),
                max_abandoned_threads=rng.choice([1, 2]),
                max_sessions_per_client=rng.choice([0, 0, 3]),
            )
            if rng.random() < 0.5:
                sessions.set_limits(limits, {t: rng.choice([1, 2, 3]) for t in self.cappable if rng.random() < 0.6})
            else:
                sessions.set_limits(limits)

    def collect(self) -> None:
        """Settle what the step did to the callers: waiters admitted or refused, sessions ended."""
        for n, waiter in list(self.waiting.items()):
            if waiter.admitted:
                self.running[n] = waiter.session
                self.outcome[n] = "admitted"
                del self.waiting[n]
            elif waiter.refusal is not None:
                self.outcome[n] = f"refused {waiter.refusal.code.value}"
                del self.waiting[n]
            elif waiter not in self.sessions._queue:  # it gave up (its outcome was set then)
                del self.waiting[n]
        for n, session in list(self.running.items()):
            if session.state is not SessionState.ACTIVE:
                del self.running[n]

    def snapshot(self) -> dict[str, object]:
        """What the two managers must agree on after every step (named, for the diff of a failure)."""
        sessions = self.sessions
        return {
            "running": set(self.running),
            "waiting": set(self.waiting),
            "outcome": dict(self.outcome),
            "active": len(sessions._active),
            "tools active": dict(sessions._tool_active),
            "clients' load": dict(sessions._client_load),
            "ended": dict(sessions._ended),
            "refused": dict(sessions._rejected),
            "cancelled in queue": sessions._queue_cancelled,
        }


def _check_invariants(sessions: SessionManager, peak_lines: int) -> None:
    """I1 to I5 (see the module's docstring) on the heap manager."""
    caps = sessions.tool_caps

    def room(key: str | None) -> bool:
        return key is None or sessions._tool_active.get(key, 0) < caps.get(key, math.inf)

    queue = list(sessions._queue)
    # I4: the lines are the queue, in order; the thread waiters and the counts are as they should be.
    assert [w.seq for w in queue] == sorted(w.seq for w in queue), "queue out of order"
    assert sum(len(line) for line in sessions._lines.values()) == len(queue), "lines and queue differ in size"
    for key, line in sessions._lines.items():
        assert line, f"line {key!r} is empty"
        assert [w.seq for w in line] == sorted(w.seq for w in line), f"line {key!r} out of order"
        for waiter in line:
            assert waiter.line == key and waiter in sessions._queue, (waiter.seq, waiter.line, key)
            assert key == (waiter.session.tool if waiter.session.tool in caps else None), (waiter.seq, key)
    assert list(sessions._thread_waiters) == [w for w in queue if w.session.needs_thread], "thread waiters"
    active = list(sessions._active.values())
    assert sessions._tool_active == dict(Counter(s.tool for s in active if s.tool is not None)), "tool counts"
    clients = Counter(s.client for s in active if s.client is not None)
    clients.update(w.session.client for w in queue if w.session.client is not None)
    assert sessions._client_load == dict(clients), "client counts"
    # I1: no lost wake-up.
    if len(sessions._active) < sessions.limits.max_concurrent_sessions:
        fits = [(w.seq, w.line) for w in queue if room(w.line)]
        assert not fits, f"lost wake-up: a slot is free and {fits} fit (tools active {sessions._tool_active})"
    # I2: a complete heap.
    entries = set(sessions._ready)
    for key, line in sessions._lines.items():
        if room(key):
            assert (next(iter(line)).seq, key) in entries, f"line {key!r} has room and no entry in the heap"
    # I5: no arrival under two lines.
    line_of: dict[int, str | None] = {}
    for seq, key in sessions._ready:
        assert line_of.setdefault(seq, key) == key, f"arrival {seq} in the heap under {line_of[seq]!r} and {key!r}"
    # I3: a bounded heap.
    assert len(sessions._ready) <= 2 * peak_lines + 64, f"{len(sessions._ready)} heap entries for {peak_lines} lines"
    assert sessions._queue or not sessions._ready, f"{len(sessions._ready)} heap entries kept while nothing waits"


@contextmanager
def _told_where(seed: int, step: int, manager: str) -> Iterator[None]:
    """Add to any failure the seed and step that lead to it (the test's id names the seed too)."""
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"seed {seed}, step {step}, {manager}")
        raise


class _HeapManager(SessionManager):
    """The manager under test, counting the times its heap is made again from the lines (so that
    a run can show it reached that path)."""

    remakes = 0

    def _remake_ready_locked(self) -> None:
        self.remakes += 1
        super()._remake_ready_locked()


async def _run(seed: int, steps: int, shape: _Shape) -> Counter[str]:
    """Run both managers `steps` steps from `seed`; return what the run reached (so that a test
    can check it reached what it is for)."""
    limits = LimitsSettings(max_concurrent_sessions=3, max_queued=400, max_abandoned_threads=1)
    caps = {"a": 1, "b": 2, **dict.fromkeys(_extra_tools(shape.extra_tools), 1)}
    heap = _HeapManager(limits, caps)
    ours, scan = _World(heap, shape), _World(_ScanningManager(limits, caps), shape)
    rngs = {ours: random.Random(seed), scan: random.Random(seed)}
    reached: Counter[str] = Counter()
    peak_lines = 0
    for n in range(steps):
        for world, name in ((ours, "the heap manager"), (scan, "the scanning reference")):
            with _told_where(seed, n, name):
                world.step(rngs[world], n)
                world.collect()
        peak_lines = max(peak_lines, len(heap._lines))
        with _told_where(seed, n, "the heap manager"):
            _check_invariants(heap, peak_lines)
        assert ours.snapshot() == scan.snapshot(), f"seed {seed} step {n}: the heap and the scan disagree"
        if heap._queue and len(heap._active) < heap.limits.max_concurrent_sessions:
            reached["steps with a free slot and waiters"] += 1
        reached["most lines"] = max(reached["most lines"], len(heap._lines))
    for world in (ours, scan):
        await world.sessions.shutdown(0)
        world.collect()
        assert not world.waiting and not world.running, f"seed {seed}: calls left after the shutdown"
    assert ours.snapshot() == scan.snapshot(), f"seed {seed} at the shutdown: the heap and the scan disagree"
    left = {
        "queue": heap._queue,
        "lines": heap._lines,
        "thread waiters": heap._thread_waiters,
        "tools active": heap._tool_active,
        "clients' load": heap._client_load,
    }
    assert not any(left.values()), f"seed {seed}: left after the shutdown: {left}"
    reached["heap made again"] = heap.remakes
    return reached


@pytest.mark.parametrize("seed", range(12))
async def test_the_hand_over_heap_agrees_with_a_look_at_every_line_and_keeps_its_invariants(seed: int) -> None:
    reached = await _run(seed, 1000, _Shape())
    assert reached["steps with a free slot and waiters"] > 0, reached


async def test_the_hand_over_heap_agrees_and_keeps_its_invariants_with_many_capped_tools_waiting() -> None:
    # Arrivals outweigh the ends: many lines wait at once, and the heap's entries outnumber them.
    shape = _Shape(extra_tools=60, slots=(1, 2, 3), queues=(400,), weights=(60, 5, 15, 4, 7, 3, 2, 4))
    reached = await _run(1000, 1000, shape)
    assert reached["most lines"] >= 20 and reached["heap made again"] > 0, reached
