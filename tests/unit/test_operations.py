"""Operations without a process: the histogram read at Prometheus bounds, the collector against
the snapshot it reads, config reload applied to a live extension, JSON log records."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server import SessionsExtension, SessionState
from server.cli import main
from server.config import ConfigError, LimitsSettings, Settings
from server.config_loader import load_settings
from server.errors import LISTED_NAMES, QUOTE_CHARS, ErrorCode, SessionError, list_names, shorten
from server.logs import JsonFormatter, TextFormatter
from server.manager_state import MAX_TRACKED_TOOLS, NO_TOOL
from server.metrics import DurationStats, MetricsSnapshot, edge_index
from server.prometheus import COUNTERS, DERIVED, GAUGES, REJECTED, Exporter, SessionsCollector, build_registry, render
from server.reload import ConfigReloader
from server.sessions import SessionManager

MIN, GROWTH = 1e-6, 1.02


def scrape(manager: SessionManager) -> dict[str, list[Sample]]:
    body, content_type = render(build_registry(manager, process=False), None)
    assert content_type.startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def value(samples: dict[str, list[Sample]], family: str, sample: str | None = None, **labels: str) -> float:
    wanted = sample or family
    found = [s.value for s in samples[family] if s.name == wanted and s.labels == labels]
    assert len(found) == 1, (family, wanted, labels, samples.get(family))
    return found[0]


# -- the histogram at fixed bounds --------------------------------------------------------


def test_edge_index_is_the_last_bucket_whose_upper_edge_is_within_the_bound() -> None:
    rng = random.Random(6)
    for bound in [MIN, 1e-3, 0.5, 1.0, 300.0, *(10 ** rng.uniform(-6, 3) for _ in range(2000))]:
        index = edge_index(bound)
        assert MIN * GROWTH**index <= bound < MIN * GROWTH ** (index + 1), bound
    assert edge_index(MIN / 2) == -1


def test_cumulative_counts_are_exact_for_durations_away_from_the_bounds() -> None:
    stats = DurationStats()
    durations = [0.0003, 0.003, 0.003, 0.03, 0.3, 0.3, 0.3, 3.0, 400.0]
    for seconds in durations:
        stats.add(seconds)
    bounds = [0.001, 0.01, 0.1, 1.0, 10.0]

    assert stats.cumulative(bounds) == [sum(d <= b for d in durations) for b in bounds] == [1, 3, 4, 7, 8]
    assert stats.reading(bounds).count == 9 and math.isclose(stats.reading(bounds).total, sum(durations))


def test_a_duration_within_its_bucket_of_a_bound_counts_under_the_next_bound_never_a_lower_one() -> None:
    stats = DurationStats()
    stats.add(0.4999)  # its bucket's upper edge is above 0.5
    stats.add(0.5001)

    assert stats.cumulative([0.25, 0.5, 1.0]) == [0, 0, 2]
    assert DurationStats().cumulative([0.5, 1.0]) == [0, 0]


def test_a_duration_just_under_a_bound_counts_under_that_bound() -> None:
    stats = DurationStats()
    stats.add(0.099)  # 1 % under the bound, in a bucket wholly below it

    assert stats.cumulative([0.1, 0.25]) == [1, 1]


# -- the collector ------------------------------------------------------------------------


async def test_the_exposition_carries_the_numbers_of_the_snapshot() -> None:
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=3, max_metadata_bytes=16))
    async with manager.running():
        done = [await manager.create(tool="echo") for _ in range(2)]
        for session in done:
            await manager.release(session.id)
        failed = await manager.create(tool="fail")
        await manager.release(failed.id, "error", "ValueError: no")
        kept = await manager.create(metadata={"k": "v"})  # no tool: session_create's kind
        await manager.create(tool="echo", expire=False)
        for _ in range(2):
            with pytest.raises(SessionError):
                await manager.create(metadata={"long": "x" * 20})
        await manager.create(tool="echo", expire=False)
        with pytest.raises(SessionError):
            await manager.create(tool="echo")
        await manager.release(kept.id)
        manager.shutdown_refused()
        manager.config_reloaded(ok=True)
        manager.config_reloaded(ok=False)
        manager.config_reloaded(ok=False)

        snapshot = manager.metrics()
        samples = scrape(manager)

    assert value(samples, "mcp_sessions_created", "mcp_sessions_created_total") == snapshot.total_sessions_created == 6
    assert value(samples, "mcp_sessions_completed", "mcp_sessions_completed_total") == 3
    assert value(samples, "mcp_sessions_error", "mcp_sessions_error_total") == 1
    assert value(samples, "mcp_sessions_rejected", "mcp_sessions_rejected_total", reason="capacity_exceeded") == 1
    assert value(samples, "mcp_sessions_rejected", "mcp_sessions_rejected_total", reason="metadata_too_large") == 2
    assert value(samples, "mcp_sessions_rejected", "mcp_sessions_rejected_total", reason="shutting_down") == 0
    assert value(samples, "mcp_sessions_config_reloads", "mcp_sessions_config_reloads_total") == 1
    assert value(samples, "mcp_sessions_config_reload_failures", "mcp_sessions_config_reload_failures_total") == 2
    assert (
        value(
            samples, "mcp_sessions_shutdown_rejected_unauthorized", "mcp_sessions_shutdown_rejected_unauthorized_total"
        )
        == 1
    )
    assert value(samples, "mcp_sessions_active") == snapshot.active_sessions == 2
    assert value(samples, "mcp_sessions_peak_concurrent") == 3
    assert value(samples, "mcp_sessions_max_concurrent") == 3
    assert value(samples, "mcp_sessions_shutting_down") == 0
    assert value(samples, "mcp_sessions_tool_calls", "mcp_sessions_tool_calls_total", tool="echo") == 4
    assert value(samples, "mcp_sessions_tool_ended", "mcp_sessions_tool_ended_total", tool="fail", state="error") == 1
    histogram = "mcp_sessions_duration_seconds"
    assert value(samples, histogram, histogram + "_count", tool="echo") == 2
    assert value(samples, histogram, histogram + "_bucket", tool="echo", le="+Inf") == 2
    assert value(samples, histogram, histogram + "_count", tool="fail") == 1
    assert value(samples, histogram, histogram + "_count", tool=NO_TOOL) == 1
    assert (snapshot.config_reloads, snapshot.config_reload_failures) == (1, 2)
    # What the registry knows of the collector (its clash check, a scrape's name[] filter)
    # is every family it yields, of the same type.
    collector = SessionsCollector(manager)
    described = {(family.name, family.type) for family in collector.describe()}
    assert {(family.name, family.type) for family in collector.collect()} <= described


async def test_a_scrape_holds_the_samples_of_one_tool_at_a_time_not_of_every_tool() -> None:
    # Held all at once, 1,025 tools' samples (about 27,000, and a dict of labels each) outlived
    # the young generations of the garbage collector, and a scrape set off a full collection
    # every second time or so: 200 ms with the GIL held on a server hosting 2,000 tools.
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=10))
    for index in range(MAX_TRACKED_TOOLS + 10):
        manager.end(await manager.create(tool=f"t{index:04d}"), SessionState.COMPLETED)
    registry = build_registry(manager, process=False)
    samples = peak = 0
    gc.collect()
    gc.disable()  # the count of objects the collector tracks then only moves with their allocation and release
    try:
        start = gc.get_count()[0]
        for family in registry.collect():
            for _ in family.samples:
                samples += 1
                peak = max(peak, gc.get_count()[0] - start)
    finally:
        gc.enable()

    assert samples > 26 * MAX_TRACKED_TOOLS  # per tool: 21 of the histogram, 1 call count, 4 end counts
    assert peak < samples / 3, (peak, samples)  # all at once: nearly two per sample, it and its labels


def test_every_snapshot_field_is_exported_or_deliberately_derived() -> None:
    exported = {row[0] for row in COUNTERS} | {row[0] for row in GAUGES} | {row[0] for row in REJECTED}
    missing = set(MetricsSnapshot.model_fields) - exported - DERIVED
    assert not missing, f"add a row to server/prometheus.py for {sorted(missing)}"


def test_the_readme_names_every_reason_label_of_the_rejected_counter() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    [row] = [line for line in readme.splitlines() if line.startswith("| `mcp_sessions_rejected_total{reason}`")]
    missing = [reason for _, reason in REJECTED if f"`{reason}`" not in row]
    assert not missing, f"the README's Prometheus table lacks the reason labels {missing}"


def test_the_rejected_counter_help_does_not_call_every_reason_an_error_code() -> None:
    # Some reasons are error codes, the rest kinds of capacity_exceeded with their own counter:
    # the help text a scrape shows must name those, not call them all "the error code".
    codes = {code.value for code in ErrorCode}
    kinds = [reason for _, reason in REJECTED if reason not in codes]
    assert kinds == ["queue_timeout", "client_limit", "tool_limit", "threads"]
    body, _ = render(build_registry(SessionManager(LimitsSettings()), process=False), None)
    [help_text] = [
        f.documentation for f in text_string_to_metric_families(body.decode()) if f.name == "mcp_sessions_rejected"
    ]
    assert "(the error code)" not in help_text, help_text
    assert all(kind in help_text for kind in kinds), help_text


def test_the_exporter_serves_metrics_on_loopback_until_stopped() -> None:
    manager = SessionManager()
    manager.config_reloaded(ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter(build_registry(manager, process=False), port)
    assert exporter.start() is True
    try:
        response = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        elsewhere = [httpx2.get(f"http://127.0.0.1:{port}{path}", timeout=5) for path in ("/", "/healthz", "/metricsx")]
    finally:
        exporter.stop()
    assert response.status_code == 200
    assert "mcp_sessions_config_reloads_total 1.0" in response.text
    # It serves /metrics only: a probe of another path must not read as a healthy endpoint.
    assert [r.status_code for r in elsewhere] == [404] * 3
    assert all("mcp_sessions" not in r.text for r in elsewhere)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_the_exporter_serves_the_samples_a_scrape_names() -> None:
    manager = SessionManager()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter(build_registry(manager), port)
    assert exporter.start() is True
    names = ["mcp_sessions_active", "mcp_sessions_rejected_total", "process_open_fds"]
    try:
        response = httpx2.get(f"http://127.0.0.1:{port}/metrics", params={"name[]": names}, timeout=5)
    finally:
        exporter.stop()
    assert response.status_code == 200
    families = text_string_to_metric_families(response.text)
    assert sorted({sample.name for family in families for sample in family.samples}) == sorted(names)


def test_the_exporter_reads_host_names_in_any_case_and_only_a_number_as_their_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter(build_registry(SessionManager(), process=False), port)
    assert exporter.start() is True
    hosts = [f"LOCALHOST:{port}", "Localhost", f"127.0.0.1:{port}", "localhost:evil", "127.0.0.1:", "localhost:80x"]
    try:
        answers = [
            httpx2.get(f"http://127.0.0.1:{port}/metrics", headers={"Host": host}, timeout=5).status_code
            for host in hosts
        ]
    finally:
        exporter.stop()
    assert answers == [200, 200, 200, 421, 421, 421]


def exporter_threads() -> int:
    """Threads the exporter runs now, one per connection it handles (socketserver names them)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def test_the_exporter_handles_a_few_connections_at_once_and_closes_a_silent_one_after_its_timeout() -> None:
    # Silent connections held a thread and a descriptor each, for ever: with an open-files limit of
    # 256, 248 of them used up the process's descriptors. Past its cap a new one is closed at once;
    # one that sends nothing is closed after the timeout; then it serves again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter(build_registry(SessionManager(), process=False), port, timeout=3.0, max_connections=2)
    assert exporter.start() is True
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        # Accepted in order: the first two are held, each later one closed at once (end of file).
        for past in silent[2:]:
            assert past.recv(1) == b""
        assert exporter_threads() == 2
        for held in silent[:2]:
            held.setblocking(False)
            with pytest.raises(BlockingIOError):  # still open: nothing to read, and no end of file
                held.recv(1)
            held.setblocking(True)
            held.settimeout(10)
        for held in silent[:2]:
            assert held.recv(1) == b""  # closed by the exporter, its timeout past
        response = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        for sock in silent:
            sock.close()
        exporter.stop()
    assert response.status_code == 200 and "mcp_sessions_created_total" in response.text


def test_an_exporter_port_in_use_is_reported_and_nothing_is_served(caplog: pytest.LogCaptureFixture) -> None:
    registry = build_registry(SessionManager(), process=False)
    exporters_before = [t for t in threading.enumerate() if t.name == "prometheus-exporter"]
    with socket.socket() as taken, caplog.at_level(logging.ERROR, logger="server.prometheus"):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = Exporter(registry, port)
        assert busy.start() is False
        assert [t for t in threading.enumerate() if t.name == "prometheus-exporter"] == exporters_before
    busy.stop()  # nothing started: a no-op
    [line] = [r.getMessage() for r in caplog.records if r.name == "server.prometheus"]
    assert line.startswith(f"Could not serve Prometheus metrics on 127.0.0.1 port {port}: ")
    assert line.endswith("; serving MCP without them")


# -- reload -------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


async def test_a_valid_reload_applies_new_limits_and_tool_deadlines_to_new_work(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 1\n")
    sessions = SessionsExtension(load_settings(path))
    reloader = ConfigReloader(sessions, path)
    async with sessions.manager.running():
        held = await sessions.manager.create(tool="t")
        write(path, "[limits]\nmax_concurrent_sessions = 2\n[tools.t]\ntimeout_seconds = 7\n")

        assert reloader.reload() is True
        second = await sessions.manager.create(tool="t")
        assert sessions.config.timeout_for("t") == 7.0
        write(path, "[limits]\nmax_concurrent_sessions = 1\n")
        assert reloader.reload() is True
        # Lowering the cap ends nobody; new work waits until enough have ended.
        assert held.state is SessionState.ACTIVE and second.state is SessionState.ACTIVE
        with pytest.raises(SessionError) as refused:
            await sessions.manager.create(tool="t")
        assert refused.value.code is ErrorCode.CAPACITY_EXCEEDED
        await sessions.manager.release(held.id)
        await sessions.manager.release(second.id)
        await sessions.manager.create(tool="t")
    metrics = sessions.manager.metrics()
    assert (metrics.config_reloads, metrics.config_reload_failures) == (2, 0)
    assert metrics.limits["max_concurrent_sessions"] == 1


def test_an_invalid_reload_keeps_the_config_in_force_and_says_why_like_startup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    before = sessions.config
    write(path, "[limits]\nmax_concurrent_sessions = 0\nmax_concurent = 3\n")
    with pytest.raises(ConfigError) as at_startup:
        load_settings(path)

    with caplog.at_level(logging.ERROR, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is False

    assert sessions.config is before and sessions.manager.limits.max_concurrent_sessions == 4
    [record] = [r for r in caplog.records if r.name == "server.reload"]
    for problem in at_startup.value.problems:
        assert problem in record.getMessage()
    assert sessions.manager.metrics().config_reload_failures == 1


def test_a_reload_keeps_the_keys_bound_at_startup_and_reports_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "c.toml", '[server]\nname = "one"\nport = 9001\n')
    sessions = SessionsExtension(load_settings(path, {"server": {"port": 9100}}))
    write(
        path,
        '[server]\nname = "two"\nport = 9002\n[metrics]\nprometheus_port = 9300\n[shutdown]\ntimeout_seconds = 3\n',
    )

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path, {"server": {"port": 9100}}).reload() is True

    assert sessions.config.server.name == "one" and sessions.config.server.port == 9100
    assert sessions.config.metrics.prometheus_port == 0
    assert sessions.config.shutdown.timeout_seconds == 3.0
    text = caplog.text
    assert "ignored until restart: metrics.prometheus_port (in force 0, file 9300), server.name" in text
    assert "server.port" not in text  # the command line still wins: nothing to ignore
    assert "shutdown.timeout_seconds 30.0 -> 3.0" in text


async def test_a_reload_during_a_shutdown_says_the_drain_under_way_keeps_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator shortening a stuck drain by a reload was told "shutdown.timeout_seconds 8.0 -> 1.0"
    # and nothing else, while the drain went on to its old deadline.
    path = write(tmp_path / "c.toml", "[shutdown]\ntimeout_seconds = 8\n")
    sessions = SessionsExtension(load_settings(path))
    reloader = ConfigReloader(sessions, path)
    async with sessions.manager.running(), anyio.create_task_group() as tg:
        held = await sessions.manager.create(tool="t")
        tg.start_soon(sessions.manager.shutdown, 8.0)
        await sessions.manager.wait_shutting_down()
        write(path, "[shutdown]\ntimeout_seconds = 1\n")
        with caplog.at_level(logging.INFO, logger="server.reload"):
            assert reloader.reload() is True
        await sessions.manager.release(held.id)

    assert (
        "shutdown.timeout_seconds 8.0 -> 1.0 (the shutdown under way keeps the drain deadline it began with)"
        in caplog.text
    )


def test_a_reload_that_adds_tool_modules_says_to_check_the_config_before_the_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The new module is imported only by the restart, where one that cannot be imported stops
    # the server from starting: the reload says how to find out first.
    path = write(tmp_path / "c.toml", "[limits]\nmax_queued = 1\n")
    sessions = SessionsExtension(load_settings(path))
    write(path, '[server]\ntool_modules = ["no_such_module_here"]\n')

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True

    assert sessions.config.server.tool_modules == ()
    assert f"before restarting, check the new config with: mcp-session-manager --config {path} --check-config" in (
        caplog.text
    )


def test_a_reload_that_changes_nothing_names_the_environment_variables_that_override_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator edits the file, but a variable set at startup overrides that key: the reload
    # changes nothing, and the log line must say where to look rather than only "nothing changed".
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS", "7")
    monkeypatch.setenv("MCP_SESSIONS_ADMIN_TOKEN", "secret")  # sets no key: not named as an override
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    write(path, "[limits]\nmax_concurrent_sessions = 9\n")

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True

    assert sessions.config.limits.max_concurrent_sessions == 7
    assert (
        "nothing changed (overridden, so the file's value is not in force: "
        "limits.max_concurrent_sessions by environment variable MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS)\n"
        in caplog.text
    )


def test_a_reload_that_changes_nothing_does_not_blame_an_override_for_a_value_validation_rewrote(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The file says "INFO" and the settings in force hold "info": nothing overrides it.
    path = write(tmp_path / "c.toml", '[logging]\nlevel = "INFO"\n')
    sessions = SessionsExtension(load_settings(path))

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True

    line = next(r.getMessage() for r in caplog.records if "nothing changed" in r.getMessage())
    assert line.endswith("nothing changed"), line


def test_a_reload_that_changes_nothing_names_the_command_line_option_that_overrides_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edit is to server.host, which --host overrides; an unrelated variable is not blamed.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_QUEUED", "3")
    flags = {"server": {"host": "127.0.0.1"}}
    path = write(tmp_path / "c.toml", '[server]\nhost = "127.0.0.1"\n')
    sessions = SessionsExtension(load_settings(path, flags))
    write(path, '[server]\nhost = "localhost"\n')

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path, flags).reload() is True

    assert sessions.config.server.host == "127.0.0.1"
    line = next(r.getMessage() for r in caplog.records if "nothing changed" in r.getMessage())
    expected = "overridden, so the file's value is not in force: server.host by command line option --host"
    assert line.endswith(f"nothing changed ({expected})"), line


def test_a_reload_warns_of_a_bad_file_value_an_override_hides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Valid as overridden, so it applies; the file would fail once the variable is gone.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_QUEUED", "3")
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    write(path, "[limits]\nmax_concurrent_sessions = 5\nmax_queued = -1\n")

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True

    assert (sessions.config.limits.max_concurrent_sessions, sessions.config.limits.max_queued) == (5, 3)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"Config reload: {path}: limits.max_queued: must be between 0 and 1000000 (got -1); not in effect while"
        " environment variable MCP_SESSIONS_LIMITS__MAX_QUEUED sets it"
    ]


def test_a_reload_does_not_blame_the_environment_when_it_cannot_be_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edit was to a key bound at startup (reported as ignored until restart), or there is no
    # file at all: the variables set are not why nothing changed, and naming them would mislead,
    # even where one overrides a key the file sets.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_QUEUED", "3")
    path = write(tmp_path / "c.toml", '[server]\nname = "one"\n[limits]\nmax_queued = 5\n')
    sessions = SessionsExtension(load_settings(path))
    write(path, '[server]\nname = "two"\n[limits]\nmax_queued = 5\n')
    without_file = SessionsExtension(load_settings(None))

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True
        assert ConfigReloader(without_file, None).reload() is True

    assert "ignored until restart: server.name" in caplog.text
    assert "--check-config" not in caplog.text, "only new tool modules need checking before the restart"
    assert caplog.text.count("nothing changed") == 2
    assert "overridden" not in caplog.text and "MCP_SESSIONS_LIMITS__MAX_QUEUED" not in caplog.text


def test_a_reload_in_an_embedding_host_names_the_overrides_though_the_file_has_a_logging_table_left_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's [logging] differs from the file's at every reload: taken for an edit reported as
    # ignored, it hid the note of the key the variable overrides, for as long as the file had one.
    monkeypatch.setenv("MCP_SESSIONS_LIMITS__MAX_QUEUED", "4")
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 10\n")
    sessions = SessionsExtension(load_settings(path))
    write(path, '[limits]\nmax_concurrent_sessions = 10\nmax_queued = 9\n[logging]\nlevel = "warning"\n')

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path, manage_logging=False).reload() is True

    assert sessions.config.limits.max_queued == 4
    assert "[logging] left to the host" in caplog.text
    line = next(r.getMessage() for r in caplog.records if "nothing changed" in r.getMessage())
    assert line.endswith(
        "nothing changed (overridden, so the file's value is not in force: "
        "limits.max_queued by environment variable MCP_SESSIONS_LIMITS__MAX_QUEUED)"
    ), line


def test_a_reload_applies_a_setting_that_cannot_take_effect_and_warns_about_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    write(path, "[limits]\nmax_concurrent_sessions = 4\n[tools.echo]\nmax_concurrent = 9\n")

    with caplog.at_level(logging.INFO, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is True

    assert sessions.manager.tool_caps == {"echo": 9}
    assert (
        "Config reload: tools.echo.max_concurrent (9) is above limits.max_concurrent_sessions (4): "
        "the server-wide cap is reached first" in caplog.text
    )


def _replace_with_a_file_above(path: Path) -> None:
    # The config's directory becomes a file: reading the path fails with ENOTDIR.
    for child in path.parent.iterdir():
        child.unlink()
    path.parent.rmdir()
    path.parent.write_text("", encoding="utf-8")


def _replace_with_a_symlink_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path)


def _replace_with_a_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.timeout(10)  # reading a FIFO waits for a writer: fail, do not hang
@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        (_replace_with_a_file_above, "cannot read the config file: Not a directory;"),
        (_replace_with_a_symlink_loop, "cannot read the config file: Too many levels of symbolic links;"),
        (_replace_with_a_fifo, "is a named pipe (FIFO), not a regular file"),
    ],
    ids=["not-a-directory", "symlink-loop", "fifo"],
)
def test_a_reload_from_a_path_that_cannot_be_read_is_rejected_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, replace: Callable[[Path], None], reason: str
) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf" / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    before = sessions.config
    replace(path)

    with caplog.at_level(logging.ERROR, logger="server.reload"):
        assert ConfigReloader(sessions, path).reload() is False

    assert sessions.config is before and sessions.manager.limits.max_concurrent_sessions == 4
    assert sessions.manager.metrics().config_reload_failures == 1
    [record] = [r for r in caplog.records if r.name == "server.reload"]
    assert f"rejected; the config in force is unchanged. invalid configuration: {path}: {reason}" in (
        record.getMessage()
    )


def test_a_reload_rechecks_tool_tables_like_startup(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "")
    sessions = SessionsExtension(load_settings(path))
    hosted = {"echo"}

    def check(settings: object) -> None:
        unknown = [name for name in getattr(settings, "tools", {}) if name not in hosted]
        if unknown:
            raise ConfigError([f"tools.{name}: no hosted tool has this name" for name in unknown])

    write(path, "[tools.ecoh]\ntimeout_seconds = 1\n")
    assert ConfigReloader(sessions, path, check=check).reload() is False
    assert sessions.config.tools == {}


# -- logs ---------------------------------------------------------------------------------


def test_json_log_records_carry_the_structured_fields_on_one_line() -> None:
    record = logging.LogRecord("server.sessions", logging.INFO, __file__, 1, "Session %s ended\nok", ("s1",), None)
    record.__dict__.update({"session_id": "s1", "tool": "echo", "state": "completed", "duration_seconds": 0.5})
    line = JsonFormatter().format(record)

    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "Session s1 ended\nok" and data["level"] == "info"
    assert (data["session_id"], data["tool"], data["state"], data["duration_seconds"]) == (
        "s1",
        "echo",
        "completed",
        0.5,
    )
    assert "reason" not in data  # unset fields are left out


#: A client's text with what Unicode-aware readers take for line breaks (U+2028, NEL) or what a
#: terminal or viewer acts on (CSI, a right-to-left override, ESC).
UNICODE_FORGERY = "x\u2028FORGED-LS\x85FORGED-NEL\x9b31mCSI\u202eRLO\x1b[31mESC\nFORGED-NL"


def test_a_json_log_record_stays_one_line_for_unicode_aware_readers_and_keeps_the_text() -> None:
    record = logging.LogRecord("server.refusals", logging.WARNING, __file__, 1, "Refused %s", (UNICODE_FORGERY,), None)
    record.__dict__["session_id"] = UNICODE_FORGERY
    line = JsonFormatter().format(record)

    assert line.splitlines() == [line], "str.splitlines sees one line"
    assert not any(ch in line for ch in "\u2028\x85\x9b\u202e\x1b\n")
    data = json.loads(line)
    assert data["message"] == f"Refused {UNICODE_FORGERY}" and data["session_id"] == UNICODE_FORGERY


def test_a_text_log_line_escapes_bidirectional_overrides_too() -> None:
    record = logging.LogRecord("server.refusals", logging.WARNING, __file__, 1, "Refused %s", (UNICODE_FORGERY,), None)
    line = TextFormatter().format(record)

    assert line.splitlines() == [line]
    assert line.endswith("Refused x\\u2028FORGED-LS\\x85FORGED-NEL\\x9b31mCSI\\u202eRLO\\x1b[31mESC\\nFORGED-NL")


class _ReloadLines(logging.Handler):
    """The messages of `server.reload`, and an event set at each reload's outcome."""

    OUTCOMES = ("Config reloaded from", "the config in force is unchanged")

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.outcome = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if any(text in self.messages[-1] for text in self.OUTCOMES):
            self.outcome.set()

    async def next_outcome(self) -> None:
        with anyio.fail_after(10):
            await self.outcome.wait()
        self.outcome = anyio.Event()


async def test_a_reload_failing_unexpectedly_is_rejected_and_the_watch_goes_on_then_gives_sighup_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A failure nobody foresaw in reading the file (a defect, a recursion) escaped the watch into
    # the serving task group and ended the server. It is a rejected reload now; the next SIGHUP
    # reloads; and once the watch ends, SIGHUP's handler is the one it found (not the default
    # action, which would end the process).
    path = write(tmp_path / "c.toml", "[limits]\nmax_concurrent_sessions = 4\n")
    sessions = SessionsExtension(load_settings(path))
    checks: list[Settings] = []

    def check(settings: Settings) -> None:
        checks.append(settings)
        if len(checks) == 1:
            raise RuntimeError("a defect in a check")

    def before(signum: int, frame: object) -> None:
        pass

    lines = _ReloadLines()
    logger = logging.getLogger("server.reload")
    logger.addHandler(lines)
    previous = signal.signal(signal.SIGHUP, before)
    try:
        with caplog.at_level(logging.INFO, logger="server.reload"):  # (the success line is INFO)
            async with anyio.create_task_group() as tg:
                await tg.start(ConfigReloader(sessions, path, check=check).watch_sighup)
                write(path, "[limits]\nmax_concurrent_sessions = 5\n")
                os.kill(os.getpid(), signal.SIGHUP)
                await lines.next_outcome()
                os.kill(os.getpid(), signal.SIGHUP)
                await lines.next_outcome()
                tg.cancel_scope.cancel()
        assert signal.getsignal(signal.SIGHUP) is before
    finally:
        signal.signal(signal.SIGHUP, previous)
        logger.removeHandler(lines)
    failed = [m for m in lines.messages if "failed; the config in force is unchanged" in m]
    assert failed == [f"Config reload from {path} failed; the config in force is unchanged"], lines.messages
    assert sessions.manager.limits.max_concurrent_sessions == 5
    metrics = sessions.manager.metrics()
    assert (metrics.config_reloads, metrics.config_reload_failures) == (1, 1)


def test_the_command_line_gives_sighup_back_when_it_returns_without_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # While starting, the CLI holds SIGHUP (a reload asked for then is remembered). A start that
    # ends there (a bad config) must leave the process's SIGHUP as it found it: not swallowed.
    def before(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGHUP, before)
    try:
        assert main(["--config", str(tmp_path / "missing.toml")]) == 2
        assert signal.getsignal(signal.SIGHUP) is before
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "config file not found" in capsys.readouterr().err


def test_a_scrape_from_another_thread_reads_counters_and_histograms_at_one_moment() -> None:
    # The stdio exporter scrapes from its own thread while calls end on the event loop: each
    # scrape's finished counts must equal its histogram's count (both read under one lock).
    manager = SessionManager(LimitsSettings(max_concurrent_sessions=10))
    manager.end(manager.create_nowait(tool="echo"), SessionState.COMPLETED)  # the histogram has its label
    stop = threading.Event()
    ended = 0

    def churn() -> None:
        nonlocal ended
        while not stop.is_set() and ended < 2_000_000:  # bounded in count as well as by `stop`
            session = manager.create_nowait(tool="echo")
            manager.end(session, SessionState.COMPLETED)
            ended += 1

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    skewed: list[tuple[float, float]] = []
    try:
        for _ in range(300):
            samples = scrape(manager)
            finished = value(samples, "mcp_sessions_completed", "mcp_sessions_completed_total")
            histogram = "mcp_sessions_duration_seconds"
            counted = value(samples, histogram, histogram + "_count", tool="echo")
            if finished != counted:
                skewed.append((finished, counted))
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert ended > 0 and skewed == []


# -- what a message quotes and lists --------------------------------------------------------


def test_a_quote_of_exactly_the_limit_is_whole_and_one_character_more_is_cut() -> None:
    assert shorten("x" * QUOTE_CHARS) == "x" * QUOTE_CHARS
    assert shorten("x" * (QUOTE_CHARS + 1)) == "x" * QUOTE_CHARS + "…"


def test_a_list_of_exactly_the_limit_names_them_all_and_one_more_is_counted() -> None:
    names = [f"t{n}" for n in range(LISTED_NAMES + 1)]
    assert list_names(names[:-1]) == ", ".join(names[:-1])
    assert list_names(names) == f"{', '.join(names[:-1])}, ... and 1 more of {LISTED_NAMES + 1}"
