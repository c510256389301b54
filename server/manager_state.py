"""What a session manager holds and counts, and the readings of it: the metrics.

Tier: runtime core, the base of `server.sessions.SessionManager` (through `server.intake`).
`ManagerState` builds the manager's state from its limits: the active sessions by id, the
calls active per tool and the sessions per client, the queue, the deadline heap, the ids
recently ended, and every counter. Its methods read that state under the manager's one lock
(`metrics`, `metrics_with_histograms`), start counting afresh, or count what happens beside
admission and release: config reloads, refused shutdowns, threads stuck past their deadline.
The counting on the per-call path is `SessionManager`'s own (`_open_locked`, `end`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from server.admission import Refusal, Waiter
from server.config import TOOL_CAP_BOUNDS, LimitsSettings, Settings
from server.metrics import (
    ClusterMetrics,
    DurationStats,
    HistogramReading,
    MetricsSnapshot,
    ShutdownReport,
    ToolMetrics,
)
from server.session import Session, SessionState

#: Per-tool statistics are kept for at most this many tool names; the rest share one entry.
MAX_TRACKED_TOOLS = 1024
OTHER_TOOLS = "(other)"
#: The key, among the histograms of `metrics_with_histograms`, of sessions not tied to a tool
#: call (made by `session_create`).
NO_TOOL = "(none)"


@dataclass(slots=True)
class _ToolStats:
    calls: int = 0
    completed: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    rejected_tool_limit: int = 0
    durations: DurationStats = field(default_factory=DurationStats)


def checked_tool_caps(tool_caps: Mapping[str, int] | None) -> dict[str, int]:
    """`tool_caps` as a dict, or the reason it is not a cap per tool name (raised, naming the entry)."""
    if tool_caps is None:
        return {}
    if not isinstance(tool_caps, Mapping):
        raise TypeError(
            f"tool_caps must map tool names to caps, e.g. {{'search': 2}}, got {type(tool_caps).__name__}: "
            f"{tool_caps!r:.80}"
        )
    low, high = TOOL_CAP_BOUNDS
    for name, cap in tool_caps.items():
        if not isinstance(name, str):
            raise TypeError(f"tool_caps: tool names are text, got {type(name).__name__}: {name!r:.80}")
        if not isinstance(cap, int) or isinstance(cap, bool):
            raise TypeError(
                f"tool_caps[{name!r}] must be a whole number of calls, got {type(cap).__name__}: {cap!r:.80}"
            )
        if not low <= cap <= high:
            raise ValueError(f"tool_caps[{name!r}] must be between {low} and {high:,} calls at once, got {cap}")
    return dict(tool_caps)


def limits_and_caps(
    limits: Settings | LimitsSettings | None, tool_caps: Mapping[str, int] | None, taker: str
) -> tuple[LimitsSettings, Mapping[str, int] | None]:
    """The limits and per-tool caps `taker` (`SessionManager`, `set_limits`) was given: a whole
    `Settings` gives its `[limits]` and, unless `tool_caps` is given, its tools' caps; None, the
    defaults. Raises TypeError for anything else, before anything has changed."""
    if isinstance(limits, Settings):
        return limits.limits, limits.tool_caps() if tool_caps is None else tool_caps
    if limits is None:
        return LimitsSettings(), tool_caps
    if not isinstance(limits, LimitsSettings):
        raise TypeError(
            f"{taker} takes a Settings (from load_settings(path)), a LimitsSettings "
            f"(e.g. LimitsSettings(max_concurrent_sessions=10)) or None, got {type(limits).__name__}"
        )
    return limits, tool_caps


class ManagerState:
    """The state of a `SessionManager`, made by its constructor (this class's), and the readings of
    it. Not used alone: `server.intake.Intake`, then `SessionManager`, build on it."""

    def __init__(
        self, limits: Settings | LimitsSettings | None = None, tool_caps: Mapping[str, int] | None = None
    ) -> None:
        """`limits`: a whole `Settings` (what `load_settings` returns: its `[limits]`, and its
        `[tools.NAME].max_concurrent` caps unless `tool_caps` is given), a `LimitsSettings`, or
        None for the defaults. `tool_caps`: per-tool concurrency caps by tool name.

        Raises:
            TypeError: `limits` is none of these (a dict, a path, ...), or `tool_caps` is not a
                mapping of tool names to whole numbers.
            ValueError: a cap in `tool_caps` is below 1 or above 1,000,000 (as in the config file).
        """
        limits, tool_caps = limits_and_caps(limits, tool_caps, "SessionManager")
        self.limits = limits  # see the property
        #: Per-tool concurrency caps (`[tools.NAME].max_concurrent`), by tool name.
        self.tool_caps: dict[str, int] = checked_tool_caps(tool_caps)
        self._lock = threading.Lock()
        # Ids are "s<random>-<seq>": unguessable across servers and restarts, and recognisable
        # as ours after they end without remembering every one of them.
        self._id_prefix = f"s{secrets.token_hex(6)}-"
        #: Signs the ids of sessions made for no tool (`session_create`'s), which a client shows
        #: to release one: an id is then no guess from another's (see `SessionManager._signed_id_locked`).
        self._id_key = secrets.token_bytes(16)
        #: Ids are made ID_BATCH at a time: taking one from a list costs less on every call than
        #: formatting one (cold code between two calls). `_seq` is the last one made; the ones
        #: made and not yet given out wait in `_spare_ids`, next one last.
        self._seq = 0
        self._spare_ids: list[str] = []
        self._active: dict[str, Session] = {}
        # Admission state (not statistics: `reset_metrics` keeps it): calls active per tool,
        # sessions held or queued per client, and the calls waiting for a slot, oldest first.
        self._tool_active: dict[str, int] = {}
        self._client_load: dict[Hashable, int] = {}
        self._queue: dict[Waiter, None] = {}
        #: The queue again, in lines: the calls of each tool with a cap in that tool's line, every
        #: other call in the line under None; each line in order of arrival, and only lines that
        #: hold a call. A freed slot goes to the oldest head of a line whose tool has room (found
        #: in `_ready`): a release never looks at every call of a full tool, nor at every line.
        #: OrderedDicts: a plain dict's first key is found past every key deleted before it.
        self._lines: dict[str | None, OrderedDict[Waiter, None]] = {}
        #: The lines a freed slot may go to, as a heap of (arrival of the line's first call, line):
        #: each line whose tool has room has its first call's entry here, so the hand-over takes
        #: the oldest that fits off the top instead of looking at every line. Entries are put in
        #: when a line's first call changes and when a call of its tool ends; one that no longer
        #: holds (its call has left, or its tool is full) is dropped when it comes to the top, and
        #: the heap is made again from the lines when it holds more than 2L + 64 entries for L
        #: lines (see `Intake._line_ready_locked`).
        self._ready: list[tuple[int, str | None]] = []
        #: The queued calls that need a thread, in order of arrival (refused on their turn while
        #: too many threads are stuck: see `Intake._hand_over_locked`).
        self._thread_waiters: OrderedDict[Waiter, None] = OrderedDict()
        self._queued_count = 0
        self._recent: OrderedDict[str, SessionState] = OrderedDict()
        #: (deadline, session id) of every session the reaper expires. Entries hold the id, not
        #: the session: a released session must not stay alive (and age into the garbage
        #: collector's old generation) until its deadline; released entries are skipped.
        self._expiry: list[tuple[float, str]] = []
        self._end_waiters: dict[str, anyio.Event] = {}
        self._reaper_scope: anyio.CancelScope | None = None
        self._started_at = time.monotonic()
        self._shutting_down = False
        self._idle_waiter: anyio.Event | None = None
        self._shutdown_done: anyio.Event | None = None
        self._shutdown_begun: anyio.Event | None = None
        self._report: ShutdownReport | None = None
        #: The tool calls the shutdown cancelled at its drain deadline, by (request id, tool): their
        #: session's id, or None for two of one key (see `cancelled_at_shutdown`).
        self._cancelled_at_deadline: dict[tuple[str, str], str | None] = {}
        self._abandoned = 0
        self._no_abandoned = anyio.Event()
        self._no_abandoned.set()
        self._config_reloads = 0
        self._config_reload_failures = 0
        self._reset_counters()

    @property
    def limits(self) -> LimitsSettings:
        """The limits new sessions are admitted under (`set_limits` changes them)."""
        return self._limits

    @limits.setter
    def limits(self, limits: LimitsSettings) -> None:
        self._limits = limits
        # Plain copies of what admission reads on every call: a settings model's attribute
        # costs a type lookup through its class's MRO, often a cache miss between calls.
        self._max_active = limits.max_concurrent_sessions
        self._max_metadata = limits.max_metadata_bytes
        self._max_timeout = limits.max_timeout_seconds
        self._max_abandoned = limits.max_abandoned_threads
        self._per_client = bool(limits.max_sessions_per_client)

    def _reset_counters(self) -> None:
        self._created = len(self._active)
        self._peak = len(self._active)
        self._ended: dict[SessionState, int] = {s: 0 for s in SessionState if s is not SessionState.ACTIVE}
        self._rejected: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self._rejected_unauthorized = 0
        self._queue_cancelled = 0
        self._queue_waits = DurationStats()
        self._tools: dict[str, _ToolStats] = {}
        for session in self._active.values():  # running calls count as their tools' calls, as in `_created`
            if session.tool is not None:
                session.stats = stats = self._tool_stats(session.tool)
                stats.calls += 1
        self._untooled_durations = DurationStats()
        self._metadata_bytes = sum(s.metadata_bytes for s in self._active.values())

    def _tool_stats(self, tool: str) -> _ToolStats:
        stats = self._tools.get(tool)
        if stats is None:
            if len(self._tools) >= MAX_TRACKED_TOOLS and tool not in self.tool_caps:
                tool = OTHER_TOOLS
            stats = self._tools.setdefault(tool, _ToolStats())
        return stats

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def active_count(self) -> int:
        return len(self._active)

    # -- counted beside admission and release ----------------------------------------------

    def config_reloaded(self, ok: bool) -> None:
        """Count a config reload: applied (`ok`) or rejected as invalid."""
        with self._lock:
            if ok:
                self._config_reloads += 1
            else:
                self._config_reload_failures += 1

    def shutdown_refused(self) -> None:
        """Count a `server_shutdown` refused for a missing or wrong admin token."""
        with self._lock:
            self._rejected_unauthorized += 1

    # -- stuck threads ---------------------------------------------------------------------

    def thread_abandoned(self) -> None:
        """A call's deadline passed while its sync work still runs in a thread."""
        with self._lock:
            self._abandoned += 1
            if self._no_abandoned.is_set():
                self._no_abandoned = anyio.Event()

    def thread_ended(self) -> None:
        """An abandoned thread has finally returned."""
        with self._lock:
            self._abandoned -= 1
            idle = self._abandoned == 0
        if idle:
            self._no_abandoned.set()

    async def wait_no_abandoned_threads(self) -> None:
        """Return once no abandoned thread is running (at once if none is)."""
        while not self._no_abandoned.is_set():
            await self._no_abandoned.wait()

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> MetricsSnapshot:
        """A consistent snapshot of every counter."""
        with self._lock:
            return self._metrics_locked()

    def metrics_with_histograms(self, bounds: Sequence[float]) -> tuple[MetricsSnapshot, dict[str, HistogramReading]]:
        """`metrics()` and the durations of finished sessions per tool at `bounds` (ascending
        seconds), read at one moment: a scrape from another thread (the exporter's) shows counters
        and histogram counts that agree. Sessions made by `session_create` are under `NO_TOOL`
        (with those of a tool of that name, if one is hosted); tools with no finished session are
        left out."""
        with self._lock:
            return self._metrics_locked(), self._histograms_locked(bounds)

    def _metrics_locked(self) -> MetricsSnapshot:
        ended = self._ended
        rejected = self._rejected
        finished = sum(ended.values())
        durations = DurationStats.merged([self._untooled_durations, *(t.durations for t in self._tools.values())])

        def rate(state: SessionState) -> float:
            return ended[state] / finished if finished else 0.0

        return MetricsSnapshot(
            active_sessions=len(self._active),
            peak_concurrent_sessions=self._peak,
            total_sessions_created=self._created,
            total_sessions_completed=ended[SessionState.COMPLETED],
            total_sessions_timeout=ended[SessionState.TIMEOUT],
            total_sessions_error=ended[SessionState.ERROR],
            total_sessions_cancelled=ended[SessionState.CANCELLED],
            sessions_rejected_capacity=rejected[Refusal.CAPACITY],
            sessions_rejected_metadata_size=rejected[Refusal.METADATA],
            sessions_rejected_shutdown=rejected[Refusal.SHUTDOWN],
            sessions_rejected_queue_timeout=rejected[Refusal.QUEUE_TIMEOUT],
            sessions_rejected_tool_limit=rejected[Refusal.TOOL_LIMIT],
            sessions_rejected_client_limit=rejected[Refusal.CLIENT_LIMIT],
            sessions_rejected_threads=rejected[Refusal.THREADS],
            sessions_rejected_store_unavailable=rejected[Refusal.STORE],
            queued_sessions=len(self._queue),
            queued_calls_cancelled=self._queue_cancelled,
            queue_wait_p95=self._queue_waits.quantile(0.95),
            max_abandoned_threads=self.limits.max_abandoned_threads,
            shutdown_rejected_unauthorized=self._rejected_unauthorized,
            current_metadata_bytes=self._metadata_bytes,
            abandoned_threads=self._abandoned,
            success_rate=rate(SessionState.COMPLETED),
            error_rate=rate(SessionState.ERROR),
            timeout_rate=rate(SessionState.TIMEOUT),
            average_session_duration=durations.mean,
            duration_p50=durations.quantile(0.50),
            duration_p95=durations.quantile(0.95),
            duration_p99=durations.quantile(0.99),
            uptime_seconds=time.monotonic() - self._started_at,
            shutdown_requested=self._shutting_down,
            config_reloads=self._config_reloads,
            config_reload_failures=self._config_reload_failures,
            limits=self.limits.model_dump(),
            tools={
                name: ToolMetrics(
                    calls=s.calls,
                    completed=s.completed,
                    errors=s.errors,
                    timeouts=s.timeouts,
                    cancelled=s.cancelled,
                    p95=s.durations.quantile(0.95),
                    active=self._tool_active.get(name, 0) + (self._other_active_locked() if name == OTHER_TOOLS else 0),
                    max_concurrent=self.tool_caps.get(name),
                    rejected_tool_limit=s.rejected_tool_limit,
                )
                for name, s in self._tools.items()
            },
        )

    async def cluster_metrics(self) -> ClusterMetrics | None:
        """The cluster's totals (cluster mode, see `server.cluster`); None for a lone manager."""
        return None

    def _other_active_locked(self) -> int:
        """The running calls of the tools counted together as `OTHER_TOOLS` (those past
        `MAX_TRACKED_TOOLS` names, which have no entry of their own). A tool that is itself named
        `OTHER_TOOLS` shares the entry: its running calls are `_tool_active`'s, added by the caller."""
        tools = self._tools
        return sum(active for name, active in self._tool_active.items() if name not in tools)

    def _histograms_locked(self, bounds: Sequence[float]) -> dict[str, HistogramReading]:
        readings = {name: s.durations.reading(bounds) for name, s in self._tools.items() if s.durations.count}
        untooled = self._untooled_durations
        if untooled.count:
            # A hosted tool named `NO_TOOL` shares the key: both histograms together, so the
            # counts still add up to the finished sessions.
            named = self._tools.get(NO_TOOL)
            if named is not None and named.durations.count:
                untooled = DurationStats.merged([untooled, named.durations])
            readings[NO_TOOL] = untooled.reading(bounds)
        return readings

    def reset_metrics(self) -> None:
        """Start counting afresh; active sessions stay and are counted as created."""
        with self._lock:
            self._reset_counters()
