"""Metrics: bounded duration statistics and the typed snapshot models.

Tier: runtime foundation. `DurationStats` keeps a log-bucketed histogram (about 2 % relative
error, memory bounded by the number of distinct buckets, never by the number of sessions);
the snapshot models are what `session_metrics` and `server_shutdown` return. Counting itself
happens in the manager, under its lock: on the per-call path in `server.sessions`, at admission
beyond it in `server.intake`, and the rest (reloads, refused shutdowns, stuck threads) in
`server.manager_state`, which also reads the counters into a snapshot.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)
_MIN_SECONDS = 1e-6
_PER_MIN = 1 / _MIN_SECONDS
_INV_LOG_GROWTH = 1 / _LOG_GROWTH


def edge_index(bound: float) -> int:
    """The highest bucket whose upper edge (MIN * G**i) is at most `bound`; -1 if none is."""
    if bound < _MIN_SECONDS:
        return -1
    index = int(math.log(bound * _PER_MIN) * _INV_LOG_GROWTH)
    while _MIN_SECONDS * _GROWTH ** (index + 1) <= bound:
        index += 1
    while index >= 0 and _MIN_SECONDS * _GROWTH**index > bound:
        index -= 1
    return index


class DurationStats:
    """Count, sum and a sparse log-bucketed histogram of durations in seconds.

    `add` only appends to a short list of pending durations; they are folded into the histogram
    FOLD_AT at a time, and before anything reads it. A session's end then touches one list
    instead of the logarithm, the histogram's dict and its counters: on a no-op tool call, those
    are cache misses that cost a few microseconds each call (see README, Performance).
    """

    __slots__ = ("_count", "_total", "_buckets", "_pending")

    #: How many durations wait before they are folded: memory stays bounded (a list of at most
    #: this many floats per histogram), and folding them together keeps the fold's code hot.
    FOLD_AT = 64

    def __init__(self) -> None:
        self._count = 0
        self._total = 0.0
        self._buckets: dict[int, int] = {}
        self._pending: list[float] = []

    def add(self, seconds: float) -> None:
        """Record one duration. Bucket i > 0 covers (MIN * G**(i-1), MIN * G**i]; bucket 0 the rest."""
        pending = self._pending
        pending.append(seconds)
        if len(pending) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Put the pending durations into the histogram."""
        pending = self._pending
        if not pending:
            return
        buckets = self._buckets
        log, per_min, inv_log_growth = math.log, _PER_MIN, _INV_LOG_GROWTH
        for seconds in pending:
            index = 0 if seconds <= _MIN_SECONDS else int(log(seconds * per_min) * inv_log_growth) + 1
            buckets[index] = buckets.get(index, 0) + 1
        self._count += len(pending)
        self._total += math.fsum(pending)
        pending.clear()

    @property
    def count(self) -> int:
        return self._count + len(self._pending)

    @property
    def total(self) -> float:
        self._fold()
        return self._total

    @classmethod
    def merged(cls, parts: Iterable[DurationStats]) -> DurationStats:
        """One histogram holding every duration of `parts` (e.g. all tools' together)."""
        out = cls()
        buckets = out._buckets
        for part in parts:
            part._fold()
            out._count += part._count
            out._total += part._total
            for index, n in part._buckets.items():
                buckets[index] = buckets.get(index, 0) + n
        return out

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1), as the upper edge of its bucket; 0.0 with no data."""
        self._fold()
        if not self._count:
            return 0.0
        rank = max(1, math.ceil(q * self._count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return 0.0 if index == 0 else _MIN_SECONDS * _GROWTH**index
        raise AssertionError("unreachable: bucket counts sum to count")  # pragma: no cover

    def cumulative(self, bounds: Sequence[float]) -> list[int]:
        """How many durations are at most each of `bounds` (ascending, in seconds), cumulatively.

        Each duration counts as the upper edge of its bucket, as `quantile` reports it: one within
        about 2 % below a bound may be counted under the next bound, never under a lower one.
        O(distinct buckets + len(bounds)); the `+Inf` bucket is `count`.
        """
        self._fold()
        edges = [edge_index(bound) for bound in bounds]
        per_bound = [0] * (len(bounds) + 1)
        for index, n in self._buckets.items():
            per_bound[bisect.bisect_left(edges, index)] += n
        running = 0
        counts = []
        for n in per_bound[:-1]:
            running += n
            counts.append(running)
        return counts

    def reading(self, bounds: Sequence[float]) -> HistogramReading:
        """The histogram at `bounds` (see `cumulative`), with count and sum."""
        return HistogramReading(buckets=tuple(self.cumulative(bounds)), count=self.count, total=self.total)


@dataclass(frozen=True, slots=True)
class HistogramReading:
    """Cumulative counts at some upper bounds (seconds), plus the count and sum of all durations."""

    buckets: tuple[int, ...]
    count: int
    total: float


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class ToolMetrics(_Model):
    """One tool's counters in the metrics snapshot (`tools`), since the start."""

    calls: int
    completed: int
    errors: int
    timeouts: int
    cancelled: int
    p95: float
    #: Calls of this tool running now, its cap (`[tools.NAME].max_concurrent`, None if unset),
    #: and calls refused because the tool was at its cap.
    active: int
    max_concurrent: int | None
    rejected_tool_limit: int


class ClusterToolMetrics(_Model):
    """One tool's counters across the cluster (cluster mode's `cluster.tools`)."""

    #: Calls of this tool active now across the cluster.
    active: int


class ClusterMetrics(_Model):
    """The cluster's totals, read atomically from the shared store. When the store cannot be
    reached, `available` is false, `error` says why and the counts are None."""

    backend: str
    available: bool
    error: str | None = None
    #: This replica's id, and how many replicas reported in the last few seconds.
    replica: str
    replicas: int | None = None
    active_sessions: int | None = None
    peak_concurrent_sessions: int | None = None
    total_sessions_created: int | None = None
    total_sessions_completed: int | None = None
    total_sessions_error: int | None = None
    total_sessions_timeout: int | None = None
    total_sessions_cancelled: int | None = None
    sessions_rejected_capacity: int | None = None
    sessions_rejected_tool_limit: int | None = None
    sessions_rejected_client_limit: int | None = None
    current_metadata_bytes: int | None = None
    tools: dict[str, ClusterToolMetrics] = {}


class MetricsSnapshot(_Model):
    """One consistent reading of the manager's counters (all taken under its lock)."""

    active_sessions: int
    peak_concurrent_sessions: int
    total_sessions_created: int
    total_sessions_completed: int
    total_sessions_timeout: int
    total_sessions_error: int
    total_sessions_cancelled: int
    sessions_rejected_capacity: int
    sessions_rejected_metadata_size: int
    sessions_rejected_shutdown: int
    sessions_rejected_queue_timeout: int
    sessions_rejected_tool_limit: int
    sessions_rejected_client_limit: int
    sessions_rejected_threads: int
    #: Cluster mode: calls refused because the shared store (Redis) could not be reached.
    sessions_rejected_store_unavailable: int
    shutdown_rejected_unauthorized: int
    current_metadata_bytes: int
    #: Calls waiting for a slot now; calls that left the queue because the client cancelled;
    #: the 95th percentile of the time calls spent queued (0.0 until one has queued).
    queued_sessions: int
    queued_calls_cancelled: int
    queue_wait_p95: float
    abandoned_threads: int
    max_abandoned_threads: int
    success_rate: float
    error_rate: float
    timeout_rate: float
    average_session_duration: float
    duration_p50: float
    duration_p95: float
    duration_p99: float
    uptime_seconds: float
    shutdown_requested: bool
    config_reloads: int
    config_reload_failures: int
    limits: dict[str, Any]
    tools: dict[str, ToolMetrics]
    #: Cluster mode (`[store] backend = "redis"`): the totals of every replica sharing the
    #: store. None with the memory backend. Every field above is this replica's own view.
    cluster: ClusterMetrics | None = None


class ShutdownReport(_Model):
    """What a graceful shutdown did: how long it took, how many sessions were active, ended on
    their own during the drain, were cancelled during it (by their clients), or were cancelled at
    its deadline. Returned by `server_shutdown`."""

    shutdown_duration: float
    initial_active_sessions: int
    final_active_sessions: int
    sessions_completed_during_shutdown: int
    sessions_cancelled_at_deadline: int
    timeout_reached: bool
    total_sessions_at_shutdown: int
    #: Ended as `cancelled` during the drain, before its deadline: a client cancelled its call or
    #: went away, or (stdio) the client closed stdin, during a shutdown already under way, with
    #: sessions of `session_create` open (a close that starts the shutdown ends them before it).
    sessions_cancelled_during_shutdown: int = 0
