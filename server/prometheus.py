"""Prometheus exposition of the manager's metrics, read at scrape time.

Tier: operations. One source of truth: `SessionsCollector` turns `manager.metrics()` (the same
snapshot `session_metrics` returns) and the manager's duration histograms into Prometheus
families on every scrape; nothing here counts anything itself. Each server gets its own
`CollectorRegistry` (never the library's global one), so two servers in one process do not mix.

Counters, gauges and the rejected-by-reason counter are driven by the tables below: a snapshot
field becomes a sample by adding a row. Each row must name a field of `MetricsSnapshot` (a scrape
reads every row's field); only a limit gauge whose key the snapshot's `limits` lacks is skipped.
The per-tool families make their samples one tool at a time, as the exposition reads them
(see `_SamplesAsRead`).

Example:
    ```python
    registry = build_registry(sessions.manager)
    body, content_type = render(registry, request.headers.get("accept"))
    ```
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from server.config import LOOPBACK_HOST_NAMES
from server.logs import EventReport
from server.metrics import HistogramReading, MetricsSnapshot, ToolMetrics
from server.sessions import SessionManager

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication

logger = logging.getLogger(__name__)

PREFIX = "mcp_sessions_"
#: The exporter closes a connection that has not sent its request, or read its answer, within this
#: many seconds (each read and write of the connection is bounded by it).
EXPORTER_TIMEOUT_SECONDS = 5.0
#: The connections the exporter handles at once (a thread each); one past it is closed at once.
EXPORTER_MAX_CONNECTIONS = 8
#: Upper bounds (seconds) of the duration histogram: from a fast in-process call to the
#: default `limits.max_timeout_seconds`.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: Counters: snapshot field -> (name without prefix or `_total`, help).
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("total_sessions_created", "created", "Sessions admitted."),
    ("total_sessions_completed", "completed", "Sessions that ended completed."),
    ("total_sessions_error", "error", "Sessions that ended in error."),
    ("total_sessions_timeout", "timeout", "Sessions that reached their deadline."),
    ("total_sessions_cancelled", "cancelled", "Sessions cancelled by the client or at the shutdown deadline."),
    (
        "shutdown_rejected_unauthorized",
        "shutdown_rejected_unauthorized",
        "server_shutdown calls refused as unauthorized (a missing or wrong admin token).",
    ),
    ("config_reloads", "config_reloads", "Config reloads applied."),
    ("config_reload_failures", "config_reload_failures", "Config reloads rejected (invalid file)."),
    ("queued_calls_cancelled", "queue_cancelled", "Queued calls the client cancelled before they were admitted."),
)

#: `mcp_sessions_rejected_total{reason}`: snapshot field -> reason label (the error code clients see).
REJECTED: tuple[tuple[str, str], ...] = (
    ("sessions_rejected_capacity", "capacity_exceeded"),
    ("sessions_rejected_metadata_size", "metadata_too_large"),
    ("sessions_rejected_shutdown", "shutting_down"),
    # Admission: waited out the queue, the client's share, the tool's cap, too many stuck threads.
    ("sessions_rejected_queue_timeout", "queue_timeout"),
    ("sessions_rejected_client_limit", "client_limit"),
    ("sessions_rejected_tool_limit", "tool_limit"),
    ("sessions_rejected_threads", "threads"),
    ("sessions_rejected_store_unavailable", "store_unavailable"),
)

#: Gauges: snapshot field -> (name without prefix, help). Booleans export as 0/1.
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("active_sessions", "active", "Sessions active now."),
    ("peak_concurrent_sessions", "peak_concurrent", "The most sessions active at once."),
    ("queued_sessions", "queued", "Calls waiting for admission."),
    (
        "abandoned_threads",
        "abandoned_threads",
        "Sync tool calls ended (deadline or cancellation) whose thread still runs.",
    ),
    ("max_abandoned_threads", "max_abandoned_threads", "limits.max_abandoned_threads in force."),
    ("current_metadata_bytes", "metadata_bytes", "Metadata bytes held by active sessions."),
    ("shutdown_requested", "shutting_down", "1 while a graceful shutdown runs."),
    ("uptime_seconds", "uptime_seconds", "Seconds since the session manager was created."),
)

#: Gauges from `limits` (the limits in force; they change on a config reload).
LIMIT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("max_concurrent_sessions", "max_concurrent", "limits.max_concurrent_sessions in force."),
    ("default_timeout_seconds", "default_timeout_seconds", "limits.default_timeout_seconds in force."),
)

#: Snapshot fields deliberately not exported one to one: rates and duration percentiles are
#: computed from the counters and the histogram in PromQL; `tools` and `limits` are exported
#: above (of `tools`, not `active`, `max_concurrent`, `rejected_tool_limit` nor `p95`).
#: `queue_wait_p95` is not exported at all (no queue-wait histogram is): `session_metrics` only.
#: `cluster` (cluster mode's totals) is not exported: each replica exports its own counters,
#: and Prometheus sums them across replicas (`sum(mcp_sessions_created_total)`).
DERIVED = frozenset(
    {
        "success_rate",
        "error_rate",
        "timeout_rate",
        "average_session_duration",
        "duration_p50",
        "duration_p95",
        "duration_p99",
        "queue_wait_p95",
        "limits",
        "tools",
        "cluster",
    }
)

_TOOL_STATES = (("completed", "completed"), ("errors", "error"), ("timeouts", "timeout"), ("cancelled", "cancelled"))


class SessionsCollector(Collector):
    """Reads one manager's snapshot and histograms on each scrape (thread-safe: both take its lock)."""

    def __init__(self, manager: SessionManager, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be distinct upper bounds in ascending order")
        self.manager = manager
        self.buckets = buckets
        self._bounds = [_le(bound) for bound in buckets] + ["+Inf"]

    def describe(self) -> list[Metric]:
        """Every family a scrape may yield, without samples: their names are what a registry
        checks for clashes, and what its `name[]` filter (`restricted_registry`) looks a
        collector up by. Undescribed, `/metrics?name[]=mcp_sessions_active` found nothing."""
        families: list[Metric] = [CounterMetricFamily(PREFIX + name, text) for _, name, text in COUNTERS]
        families.append(CounterMetricFamily(PREFIX + "rejected", "", labels=["reason"]))
        families += [GaugeMetricFamily(PREFIX + name, text) for _, name, text in (*GAUGES, *LIMIT_GAUGES)]
        families.append(CounterMetricFamily(PREFIX + "tool_calls", "", labels=["tool"]))
        families.append(CounterMetricFamily(PREFIX + "tool_ended", "", labels=["tool", "state"]))
        families.append(HistogramMetricFamily(PREFIX + "duration_seconds", "", labels=["tool"]))
        return families

    def collect(self) -> Iterator[Metric]:
        # One reading of the counters and the histograms: a scrape from the exporter's thread
        # runs beside the calls, and its finished counts must agree with the histogram's count.
        snapshot, histograms = self.manager.metrics_with_histograms(self.buckets)
        yield from self._counters(snapshot)
        yield from self._gauges(snapshot)
        yield from self._per_tool(snapshot)
        yield self._durations(histograms)

    def _counters(self, snapshot: MetricsSnapshot) -> Iterator[Metric]:
        for field, name, help_text in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=getattr(snapshot, field))
        rejected = CounterMetricFamily(
            PREFIX + "rejected",
            "Calls refused, by reason: the error code (capacity_exceeded: the server was full), or a kind of"
            " capacity_exceeded counted on its own: queue_timeout, tool_limit, client_limit, threads.",
            labels=["reason"],
        )
        for field, reason in REJECTED:
            rejected.add_metric([reason], getattr(snapshot, field))
        yield rejected

    def _gauges(self, snapshot: MetricsSnapshot) -> Iterator[Metric]:
        for field, name, help_text in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, help_text, value=float(getattr(snapshot, field)))
        for key, name, help_text in LIMIT_GAUGES:
            value = snapshot.limits.get(key)
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, help_text, value=float(value))

    def _per_tool(self, snapshot: MetricsSnapshot) -> Iterator[Metric]:
        def add_calls(family: CounterMetricFamily, tool: str, stats: ToolMetrics) -> None:
            family.add_metric([tool], stats.calls)

        def add_ended(family: CounterMetricFamily, tool: str, stats: ToolMetrics) -> None:
            for field, state in _TOOL_STATES:
                family.add_metric([tool, state], getattr(stats, field))

        calls = CounterMetricFamily(PREFIX + "tool_calls", "Tool calls admitted, per tool.", labels=["tool"])
        ended = CounterMetricFamily(
            PREFIX + "tool_ended", "Tool calls ended, per tool and final state.", labels=["tool", "state"]
        )
        yield _per_tool_family(calls, add_calls, snapshot.tools)
        yield _per_tool_family(ended, add_ended, snapshot.tools)

    def _durations(self, histograms: dict[str, HistogramReading]) -> Metric:
        bounds = self._bounds

        def add(family: HistogramMetricFamily, tool: str, reading: HistogramReading) -> None:
            counts = [*reading.buckets, reading.count]
            family.add_metric([tool], list(zip(bounds, counts, strict=True)), sum_value=reading.total)

        family = HistogramMetricFamily(
            PREFIX + "duration_seconds",
            "Duration of finished sessions, per tool ('(none)': sessions opened by session_create).",
            labels=["tool"],
        )
        return _per_tool_family(family, add, histograms)


_Family = TypeVar("_Family", bound=Metric)
_Value = TypeVar("_Value")


def _per_tool_family(
    family: _Family, add: Callable[[_Family, str, _Value], None], per_tool: Mapping[str, _Value]
) -> _Family:
    """`family` (with no samples yet), whose samples `add` makes one tool at a time as the
    exposition reads them (see `_SamplesAsRead`)."""
    scratch = copy.copy(family)  # its name and label names, with a list of samples of its own
    scratch.samples = []
    family.samples = _SamplesAsRead(scratch, add, per_tool)  # type: ignore[assignment]  # only ever iterated
    return family


class _SamplesAsRead(Generic[_Family, _Value]):
    """The samples of a per-tool family, made as the exposition reads them: one tool's at a time
    in `scratch`, dropped once read. `prometheus_client` only iterates a family's `samples` (the
    encoders, and a `name[]` filter of the exporter), and each collection makes its own families,
    so one is never read by two threads at once.

    Made all at once, the samples of 1,025 tools (about 27,000, each with a dict of labels) all
    outlived the young generations of the garbage collector, and every second scrape or so set
    off a full collection: 200 ms holding the GIL on a server hosting 2,000 tools, which stalled
    its event loop, and so every call, though the scrape renders in a thread of its own. Made a
    tool at a time, they die young.
    """

    def __init__(
        self, scratch: _Family, add: Callable[[_Family, str, _Value], None], per_tool: Mapping[str, _Value]
    ) -> None:
        self._scratch = scratch
        self._add = add
        self._per_tool = per_tool

    def __iter__(self) -> Iterator[Sample]:
        samples = self._scratch.samples
        for tool, value in self._per_tool.items():
            self._add(self._scratch, tool, value)
            yield from samples
            samples.clear()


def _le(bound: float) -> str:
    return repr(float(bound))


def build_registry(manager: SessionManager, *, process: bool = True) -> CollectorRegistry:
    """A private registry with the sessions collector (and, by default, the process metrics)."""
    registry = CollectorRegistry(auto_describe=True)  # the process collector has no describe() for name[]
    registry.register(SessionsCollector(manager))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None, names: Collection[str] = ()) -> tuple[bytes, str]:
    """The exposition body and its content type, as the scraper's Accept header asks
    (Prometheus text format, or OpenMetrics); only the samples named in `names`, if any (a
    scrape's `name[]` parameters, as prometheus_client's own exporter reads them)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry.restricted_registry(names) if names else registry), content_type


class Exporter:
    """A loopback-only HTTP exporter for `/metrics` (for transports with no HTTP port of their own).

    Like `/mcp` on loopback, it answers only requests whose Host (and any Origin) names a loopback
    address (421 / 403 otherwise): a web page that rebinds its own name to 127.0.0.1 must not
    read the metrics through the user's browser.

    It handles at most `max_connections` connections at once, a thread each, and closes one that
    stays silent (or does not read its answer) for `timeout` seconds; a connection past the cap is
    closed at once, and logged at most once per `logs.REPORT_SECONDS`. Unbounded, connections
    that sent nothing held a thread and a descriptor each for ever: under an open-files limit of
    256, 248 of them used up the process's descriptors, and then every accept failed (EMFILE),
    the streamable HTTP port's too. A scraper opens one connection at a time.
    """

    HOST = "127.0.0.1"

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int,
        *,
        timeout: float = EXPORTER_TIMEOUT_SECONDS,
        max_connections: int = EXPORTER_MAX_CONNECTIONS,
    ) -> None:
        self.registry = registry
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self._server: _BoundedServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start serving in a daemon thread; False (logged) if the port cannot be bound."""
        try:
            app = _loopback_only(make_wsgi_app(self.registry))
            server = make_server(self.HOST, self.port, app, _BoundedServer, handler_class=_QuietHandler)
        except OSError as exc:
            logger.error(
                "Could not serve Prometheus metrics on %s port %s: %s; serving MCP without them",
                self.HOST,
                self.port,
                exc.strerror or exc,
            )
            return False
        assert isinstance(server, _BoundedServer)
        server.connection_timeout, server.max_connections = self.timeout, self.max_connections
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="prometheus-exporter", daemon=True)
        self._thread.start()
        logger.info("Serving Prometheus metrics at http://%s:%s/metrics", self.HOST, self.port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.refusals.close()
            self._server = None


class _BoundedServer(ThreadingWSGIServer):
    """`prometheus_client`'s threading server, handling at most `max_connections` connections at
    once (one more is closed as soon as it is accepted), each with a socket timeout of
    `connection_timeout` seconds; a connection's timeout or reset is not reported."""

    connection_timeout = EXPORTER_TIMEOUT_SECONDS
    max_connections = EXPORTER_MAX_CONNECTIONS
    #: The listen queue (socketserver's default is 5): a burst of connections past it waits for the
    #: client's SYN retry (a second, then three), though each one past the cap is closed at once.
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._open = 0
        self.refusals = EventReport(
            logger,
            logging.WARNING,
            lambda: (
                f"Prometheus exporter: closed a new connection at once: {self.max_connections} were open, its limit"
            ),
            lambda count: (
                f"Prometheus exporter: closed {count} more new connection(s) at once since the last report "
                f"({self.max_connections} open, its limit)"
            ),
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accepting thread: a thread for the connection, or its end at once past the cap."""
        with self._lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            self.shutdown_request(request)
            self.refusals.note()  # its count is told by the next one past the period, or at the stop
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr for any exception; a client's timeout or reset is no error."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        logger.error("The Prometheus exporter failed serving a connection", exc_info=True)


def _names_loopback(value: str) -> bool:
    """Whether a Host value (`name` or `name:port`, the name in any case, the port a number)
    names the loopback interface."""
    value = value.lower()
    if value.endswith("]") or ":" not in value:  # no port: `localhost`, `[::1]`
        return value in LOOPBACK_HOST_NAMES
    name, _, port = value.rpartition(":")
    return name in LOOPBACK_HOST_NAMES and port.isascii() and port.isdigit()


def _loopback_only(app: WSGIApplication) -> WSGIApplication:
    """`app` at `/metrics`, answering 421 to a Host and 403 to an Origin that is not loopback (as the
    SDK does for `/mcp`), and 404 to any other path."""

    def checked(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        host, origin = environ.get("HTTP_HOST", ""), environ.get("HTTP_ORIGIN")
        if not _names_loopback(host):
            status, body = "421 Misdirected Request", b"Invalid Host header"
        elif origin and not _names_loopback(origin.removeprefix("http://").removeprefix("https://")):
            status, body = "403 Forbidden", b"Invalid Origin header"
        elif environ.get("PATH_INFO") != "/metrics":
            status, body = "404 Not Found", b"Not Found: this exporter serves /metrics only"
        else:
            return app(environ, start_response)
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return checked


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (as `prometheus_client`'s own exporter); its server's
    `connection_timeout` on every read and write of the connection."""

    def setup(self) -> None:
        super().setup()
        if isinstance(self.server, _BoundedServer):
            self.connection.settimeout(self.server.connection_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        pass
