"""Prometheus exposition of the manager's metrics, read at scrape time.

Tier: operations. One source of truth: `SessionsCollector` turns `manager.metrics()` (the same
snapshot `session_metrics` returns) and the manager's duration histograms into Prometheus
families on every scrape; nothing here counts anything itself. Each server gets its own
`CollectorRegistry` (never the library's global one), so two servers in one process do not mix.

Counters, gauges and the rejected-by-reason counter are driven by the tables below: a snapshot
field becomes a sample by adding a row, and a row whose field the snapshot lacks is skipped.

Example:
    ```python
    registry = build_registry(sessions.manager)
    body, content_type = render(registry, request.headers.get("accept"))
    ```
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.config import LOOPBACK_HOST_NAMES
from server.metrics import HistogramReading, MetricsSnapshot
from server.sessions import SessionManager

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication

logger = logging.getLogger(__name__)

PREFIX = "mcp_sessions_"
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
    ("shutdown_rejected_unauthorized", "shutdown_rejected_unauthorized", "server_shutdown calls refused."),
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
    ("uptime_seconds", "uptime_seconds", "Seconds since the session manager started."),
)

#: Gauges from `limits` (the limits in force; they change on a config reload).
LIMIT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("max_concurrent_sessions", "max_concurrent", "limits.max_concurrent_sessions in force."),
    ("default_timeout_seconds", "default_timeout_seconds", "limits.default_timeout_seconds in force."),
)

#: Snapshot fields deliberately not exported one to one: rates and percentiles are computed
#: from the counters and the histogram in PromQL; `tools` and `limits` are exported above.
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
        return []  # collected only at scrape time; nothing to check at registration

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
        calls = CounterMetricFamily(PREFIX + "tool_calls", "Tool calls admitted, per tool.", labels=["tool"])
        ended = CounterMetricFamily(
            PREFIX + "tool_ended", "Tool calls ended, per tool and final state.", labels=["tool", "state"]
        )
        for tool, stats in snapshot.tools.items():
            calls.add_metric([tool], stats.calls)
            for field, state in _TOOL_STATES:
                ended.add_metric([tool, state], getattr(stats, field))
        yield calls
        yield ended

    def _durations(self, histograms: dict[str, HistogramReading]) -> Metric:
        family = HistogramMetricFamily(
            PREFIX + "duration_seconds",
            "Duration of finished sessions, per tool ('(none)': sessions opened by session_create).",
            labels=["tool"],
        )
        for tool, reading in histograms.items():
            counts = [*reading.buckets, reading.count]
            family.add_metric([tool], list(zip(self._bounds, counts, strict=True)), sum_value=reading.total)
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


def build_registry(manager: SessionManager, *, process: bool = True) -> CollectorRegistry:
    """A private registry with the sessions collector (and, by default, the process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SessionsCollector(manager))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition body and its content type, as the scraper's Accept header asks
    (Prometheus text format, or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class Exporter:
    """A loopback-only HTTP exporter for `/metrics` (for transports with no HTTP port of their own).

    Like `/mcp` on loopback, it answers only requests whose Host (and any Origin) names a loopback
    address (421 / 403 otherwise): a web page that rebinds its own name to 127.0.0.1 must not
    read the metrics through the user's browser.
    """

    HOST = "127.0.0.1"

    def __init__(self, registry: CollectorRegistry, port: int) -> None:
        self.registry = registry
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start serving in a daemon thread; False (logged) if the port cannot be bound."""
        try:
            app = _loopback_only(make_wsgi_app(self.registry))
            self._server = make_server(self.HOST, self.port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            logger.error(
                "Could not serve Prometheus metrics on %s port %s: %s; serving MCP without them",
                self.HOST,
                self.port,
                exc.strerror or exc,
            )
            return False
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus-exporter", daemon=True)
        self._thread.start()
        logger.info("Serving Prometheus metrics at http://%s:%s/metrics", self.HOST, self.port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _names_loopback(value: str) -> bool:
    """Whether a Host value (`name` or `name:port`) names the loopback interface."""
    return any(value == name or value.startswith(name + ":") for name in LOOPBACK_HOST_NAMES)


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
    """No access log line per scrape (as `prometheus_client`'s own exporter)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
