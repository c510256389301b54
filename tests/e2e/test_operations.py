"""Operations on real processes: `/metrics` scraped and parsed after a known workload,
`/readyz` flipping during a shutdown with a call in flight, SIGHUP raising and lowering the
cap (and rejecting an invalid file), JSON log lines, and the loopback exporter on stdio.

Every HTTP request goes to 127.0.0.1 with a real client; every wait is a bounded loop of round
trips (a scrape, a call), never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp_types import CallToolResult
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.e2e.conftest import (
    HOST,
    ServerProcess,
    free_port,
    metrics,
    metrics_until,
    render_toml,
    server_config,
    start_server,
)
from tests.fixtures.e2e_tools import TAKEN_OVER
from tests.helpers import code_of, text_of

EXIT_MARGIN = 8.0
TOKEN_ENV = "E2E_OPS_ADMIN_TOKEN"
TOKEN = "ops-token-never-logged"
SECRET = "metadata-never-logged"

Samples = dict[str, list[Sample]]


def base_of(server: ServerProcess) -> str:
    assert server.url is not None, "not an HTTP server"
    return server.url.removesuffix("/mcp")


async def scrape(base: str) -> Samples:
    """GET /metrics and parse it with prometheus_client's own parser."""
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.get(base + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


async def scrape_until(base: str, predicate: Callable[[Samples], bool]) -> Samples:
    with anyio.fail_after(10):
        while not predicate(samples := await scrape(base)):
            pass
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample called `name` (e.g. `mcp_sessions_created_total`) with exactly these labels."""
    found = [s.value for family in samples.values() for s in family if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def counter(samples: Samples, name: str, **labels: str) -> int:
    return int(value(samples, f"mcp_sessions_{name}_total", **labels))


def gauge(samples: Samples, name: str) -> float:
    return value(samples, f"mcp_sessions_{name}")


async def call_all(client: Client, calls: list[tuple[str, dict[str, Any]]]) -> list[CallToolResult]:
    """Make the calls concurrently; their results in order."""
    results: list[CallToolResult | None] = [None] * len(calls)

    async def one(index: int, tool: str, arguments: dict[str, Any]) -> None:
        results[index] = await client.call_tool(tool, arguments)

    async with anyio.create_task_group() as tg:
        for index, (tool, arguments) in enumerate(calls):
            tg.start_soon(one, index, tool, arguments)
    return [result for result in results if result is not None]


# -- /metrics -----------------------------------------------------------------------------


async def test_metrics_scraped_after_a_known_workload_are_the_numbers_session_metrics_reports(
    tmp_path: Path,
) -> None:
    config = server_config(limits={"max_concurrent_sessions": 2, "max_metadata_bytes": 64})
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        base = base_of(server)
        async with server.client() as client:
            for text in ("a", "b", "c"):
                assert text_of(await client.call_tool("echo", {"text": text})) == text
            assert (await client.call_tool("fail", {"message": "no"})).is_error
            assert code_of(await client.call_tool("hang_async", {})) == "timeout"
            held = [(await client.call_tool("session_create", {})).structured_content or {} for _ in range(2)]
            assert code_of(await client.call_tool("echo", {"text": "full"})) == "capacity_exceeded"
            too_big = await client.call_tool("session_create", {"metadata": {"blob": "x" * 100}})
            assert code_of(too_big) == "metadata_too_large"
            for session in held:
                await client.call_tool("session_release", {"session_id": session["session_id"]})
            snapshot = await metrics(client)
            samples = await scrape(base)

    # The same numbers as session_metrics, and the ones the workload implies.
    assert counter(samples, "created") == snapshot["total_sessions_created"] == 7
    assert counter(samples, "completed") == snapshot["total_sessions_completed"] == 5
    assert counter(samples, "error") == snapshot["total_sessions_error"] == 1
    assert counter(samples, "timeout") == snapshot["total_sessions_timeout"] == 1
    assert counter(samples, "cancelled") == snapshot["total_sessions_cancelled"] == 0
    assert counter(samples, "rejected", reason="capacity_exceeded") == snapshot["sessions_rejected_capacity"] == 1
    assert counter(samples, "rejected", reason="metadata_too_large") == 1
    assert counter(samples, "rejected", reason="shutting_down") == 0
    assert gauge(samples, "active") == snapshot["active_sessions"] == 0
    assert gauge(samples, "peak_concurrent") == snapshot["peak_concurrent_sessions"] == 2
    assert gauge(samples, "max_concurrent") == 2
    assert gauge(samples, "abandoned_threads") == 0 and gauge(samples, "shutting_down") == 0
    assert counter(samples, "tool_calls", tool="echo") == snapshot["tools"]["echo"]["calls"] == 3
    assert counter(samples, "tool_ended", tool="hang_async", state="timeout") == 1

    histogram = "mcp_sessions_duration_seconds"
    counts = {
        tool: value(samples, histogram + "_count", tool=tool) for tool in ("echo", "fail", "hang_async", "(none)")
    }
    assert counts == {"echo": 3, "fail": 1, "hang_async": 1, "(none)": 2}
    # hang_async ran into its 0.5 s deadline: never in a bucket at or below 0.5 s.
    assert value(samples, histogram + "_bucket", tool="hang_async", le="0.5") == 0
    assert value(samples, histogram + "_bucket", tool="hang_async", le="+Inf") == 1
    assert value(samples, histogram + "_sum", tool="hang_async") >= 0.5
    buckets = [s for s in samples[histogram] if s.name == histogram + "_bucket" and s.labels["tool"] == "echo"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
    assert "process_resident_memory_bytes" in {s.name for family in samples.values() for s in family}


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(shared_http_server: ServerProcess) -> None:
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.get(
            base_of(shared_http_server) + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "mcp_sessions_created_total" in response.text


async def test_metrics_are_gzipped_when_the_scraper_accepts_it(shared_http_server: ServerProcess) -> None:
    # Prometheus asks for gzip; with a thousand tools the text is well over a megabyte.
    url = base_of(shared_http_server) + "/metrics"
    async with httpx2.AsyncClient(timeout=5) as http:
        gzipped = await http.get(url, headers={"Accept-Encoding": "gzip"})
        plain = await http.get(url, headers={"Accept-Encoding": "identity"})
    assert gzipped.status_code == plain.status_code == 200
    assert gzipped.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert gzipped.headers["vary"] == plain.headers["vary"] == "Accept-Encoding"
    assert "mcp_sessions_created_total" in gzipped.text  # decoded by the client
    assert int(gzipped.headers["content-length"]) < len(plain.content)


async def test_a_scrape_naming_samples_gets_those_of_every_collector_and_no_others(
    shared_http_server: ServerProcess,
) -> None:
    # prometheus_client's `name[]` filter, as its own exporter reads it: the sessions families,
    # the connection guard's and the process collector's alike.
    names = {
        "mcp_sessions_active",
        "mcp_sessions_created_total",
        "mcp_sessions_http_connections_refused_total",
        "process_open_fds",
    }
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.get(base_of(shared_http_server) + "/metrics", params={"name[]": sorted(names)})
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    assert {sample.name for family in families for sample in family.samples} == names


# -- health and readiness -----------------------------------------------------------------


async def test_readyz_turns_503_when_a_shutdown_begins_while_a_call_still_finishes(tmp_path: Path) -> None:
    config = server_config(shutdown={"timeout_seconds": 20})
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        base = base_of(server)
        async with httpx2.AsyncClient(timeout=5) as http:
            assert (await http.get(base + "/healthz")).status_code == 200
            ready = await http.get(base + "/readyz")
            assert (ready.status_code, ready.text) == (200, "ready\n")
            results: dict[str, CallToolResult] = {}
            seen: list[int] = []
            async with server.client() as client:
                # The SDK's client lists the tools after the first answer of a tool it has not
                # seen listed (to check the result against its output schema). Here that answer
                # is the server's last before it exits: list them now, or that follow-up request
                # races the exit (and fails to connect when it loses).
                await client.list_tools()

                async def slow_call() -> None:
                    results["slow"] = await client.call_tool("sleep_async", {"seconds": 2})

                with anyio.fail_after(15):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(slow_call)
                        await scrape_until(base, lambda s: gauge(s, "active") == 1)
                        server.send_signal(signal.SIGTERM)
                        while (status := (await http.get(base + "/readyz")).status_code) == 200:
                            pass
                        seen.append(status)
                        in_flight = "slow" not in results
                        draining = await http.get(base + "/readyz")
                        alive = await http.get(base + "/healthz")
                        during = await scrape(base)
            assert seen == [503] and in_flight, "readiness must flip while the call is still running"
            assert draining.text == "not ready: shutting down\n"
            assert alive.status_code == 200
            assert gauge(during, "shutting_down") == 1
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert text_of(results["slow"]) == "slept 2s"  # the drain let it finish


# -- reload -------------------------------------------------------------------------------


async def reload(
    server: ServerProcess, config: dict[str, Any], reloads: int, failures: int = 0, base: str | None = None
) -> Samples:
    """Rewrite the config file, send SIGHUP, and wait (bounded) until the reload is counted."""
    server.config_path.write_text(render_toml(config), encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    return await scrape_until(
        base or base_of(server),
        lambda s: (counter(s, "config_reloads"), counter(s, "config_reload_failures")) == (reloads, failures),
    )


async def test_sighup_raises_and_lowers_the_cap_and_an_invalid_file_keeps_the_old_limits(tmp_path: Path) -> None:
    def config(cap: int) -> dict[str, Any]:
        return server_config(limits={"max_concurrent_sessions": cap})

    async with start_server(tmp_path, config(1), transport="streamable-http") as server:
        async with server.client() as client:
            held = (await client.call_tool("session_create", {})).structured_content or {}
            assert code_of(await client.call_tool("echo", {"text": "over"})) == "capacity_exceeded"

            # Raise the cap: two more concurrent sessions fit at once, a fourth does not.
            samples = await reload(server, config(3), reloads=1)
            assert gauge(samples, "max_concurrent") == 3
            more = await call_all(client, [("session_create", {}), ("session_create", {})])
            assert [r.is_error for r in more] == [False, False]
            assert code_of(await client.call_tool("echo", {"text": "over"})) == "capacity_exceeded"
            for session in [held, *(r.structured_content or {} for r in more)]:
                await client.call_tool("session_release", {"session_id": session["session_id"]})

            # Lower the cap below the calls running: they all finish; new work is refused until they have.
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    running: list[CallToolResult] = []

                    async def three_calls() -> None:
                        running.extend(await call_all(client, [("sleep_async", {"seconds": 4})] * 3))

                    tg.start_soon(three_calls)
                    await metrics_until(client, lambda m: m["active_sessions"] == 3)
                    samples = await reload(server, config(1), reloads=2)
                    assert gauge(samples, "max_concurrent") == 1 and gauge(samples, "active") == 3
                    refused = await client.call_tool("echo", {"text": "while lowered"})
            assert code_of(refused) == "capacity_exceeded"
            assert [text_of(r) for r in running] == ["slept 4s"] * 3
            assert text_of(await client.call_tool("echo", {"text": "fits again"})) == "fits again"

            # An invalid file: rejected, counted, and the limits in force stay.
            bad = {**config(5), "limits": {"max_concurrent_sessions": 0, "max_concurent_sessions": 5}}
            samples = await reload(server, bad, reloads=2, failures=1)
            assert gauge(samples, "max_concurrent") == 1
            one = (await client.call_tool("session_create", {})).structured_content or {}
            assert code_of(await client.call_tool("session_create", {})) == "capacity_exceeded"
            await client.call_tool("session_release", {"session_id": one["session_id"]})
            after = await metrics(client)
        assert after["config_reloads"] == 2 and after["config_reload_failures"] == 1
        assert after["total_sessions_cancelled"] == 0 and after["total_sessions_timeout"] == 0

        # A restart-only key is reported, the rest of the file still applies.
        renamed = {**config(4), "server": {**config(4)["server"], "name": "renamed"}}
        samples = await reload(server, renamed, reloads=3, failures=1)
        assert gauge(samples, "max_concurrent") == 4

    path = server.config_path
    assert "Config reloaded from" in server.stderr and "limits.max_concurrent_sessions 1 -> 3" in server.stderr
    assert f"{path}: limits.max_concurrent_sessions: must be between 1 and 1000000 (got 0)" in server.stderr
    assert (
        f"{path}: limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?" in server.stderr
    )
    assert "ignored until restart: server.name" in server.stderr


async def test_sighup_with_the_config_path_turned_into_a_fifo_a_symlink_loop_or_deep_nesting_is_a_rejected_reload(
    tmp_path: Path,
) -> None:
    # Reading a FIFO waited for a writer on the event loop (even SIGTERM went unheard), and a
    # symlink loop's OSError escaped the reload and killed the server with its calls in flight.
    # Each is now a rejected reload: counted, the config in force kept, the calls served. Every
    # wait here is bounded (a blocked server fails `scrape_until`; the process is killed after).
    config = server_config(limits={"max_concurrent_sessions": 2})
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        base = base_of(server)
        path = server.config_path
        async with server.client() as client, anyio.create_task_group() as tg:
            in_flight: list[CallToolResult] = []

            async def slow_call() -> None:
                in_flight.append(await client.call_tool("sleep_async", {"seconds": 2}))

            tg.start_soon(slow_call)
            await metrics_until(client, lambda m: m["active_sessions"] == 1)

            path.unlink()
            os.mkfifo(path)
            server.send_signal(signal.SIGHUP)
            samples = await scrape_until(base, lambda s: counter(s, "config_reload_failures") == 1)
            assert gauge(samples, "max_concurrent") == 2
            assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"

            path.unlink()
            path.symlink_to(path)
            server.send_signal(signal.SIGHUP)
            samples = await scrape_until(base, lambda s: counter(s, "config_reload_failures") == 2)
            assert counter(samples, "config_reloads") == 0 and gauge(samples, "max_concurrent") == 2

            # A small file nesting deeper than the TOML reader recurses (its RecursionError ended the
            # server, exit 1, no drain, the call in flight lost).
            path.unlink()
            path.write_text("x = " + "{a=" * 1000 + "1" + "}" * 1000 + "\n", encoding="utf-8")
            server.send_signal(signal.SIGHUP)
            samples = await scrape_until(base, lambda s: counter(s, "config_reload_failures") == 3)
            assert counter(samples, "config_reloads") == 0 and gauge(samples, "max_concurrent") == 2
            assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"
        assert [text_of(result) for result in in_flight] == ["slept 2s"]

        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert f"{path}: is a named pipe (FIFO), not a regular file" in server.stderr
    assert f"{path}: cannot read the config file: Too many levels of symbolic links" in server.stderr
    assert f"{path}: invalid TOML: arrays or inline tables nest too deeply to be read" in server.stderr
    assert "Traceback" not in server.stderr


async def test_sighup_keeps_a_changed_store_section_until_restart_and_says_so(tmp_path: Path) -> None:
    # The store is opened once at startup: a reload cannot move it, so a changed [store] must be
    # reported as ignored (a warning), never as applied, while the rest of the file applies.
    config = {**server_config(limits={"max_concurrent_sessions": 1}), "store": {"key_prefix": "before:"}}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        changed = {
            **server_config(limits={"max_concurrent_sessions": 2}),
            "store": {"key_prefix": "after:", "timeout_seconds": 2.0, "url": "redis://ops:hunter2@127.0.0.1:6379/0"},
        }
        samples = await reload(server, changed, reloads=1)
        assert gauge(samples, "max_concurrent") == 2
        applied = await server.wait_stderr("Config reloaded from")  # the reload's last line
        warning = next((line for line in server.stderr_lines if "ignored until restart:" in line), "(none)")
        async with server.client() as client:
            in_force = await metrics(client)
    assert "WARNING" in warning, warning
    assert "store.key_prefix (in force 'before:', file 'after:')" in warning, warning
    assert "store.timeout_seconds (in force 1.0, file 2.0)" in warning, warning
    assert "file 'redis://ops:***@127.0.0.1:6379/0'" in warning and "hunter2" not in server.stderr, warning
    assert "limits.max_concurrent_sessions 1 -> 2" in applied and "store." not in applied, applied
    assert in_force["limits"]["max_concurrent_sessions"] == 2


async def test_sighup_reloads_over_stdio_and_the_loopback_exporter_serves_metrics(tmp_path: Path) -> None:
    port = free_port()
    config = {**server_config(limits={"max_concurrent_sessions": 1}), "metrics": {"prometheus_port": port}}
    async with start_server(tmp_path, config) as server:
        await server.initialize()
        base = f"http://{HOST}:{port}"
        assert text_of(await server.call("echo", {"text": "hi"})) == "hi"
        samples = await scrape(base)
        assert counter(samples, "created") == 1 and gauge(samples, "max_concurrent") == 1
        await server.wait_stderr(f"Serving Prometheus metrics at http://{HOST}:{port}/metrics")

        # The new limits apply, and so does the new log format (from the reload's own report on).
        config["limits"] = {"max_concurrent_sessions": 2}
        config["logging"] = {"format": "json"}
        samples = await reload(server, config, reloads=1, base=base)
        assert gauge(samples, "max_concurrent") == 2
        report = json.loads(await server.wait_stderr('"message": "Config reloaded from'))
        assert "limits.max_concurrent_sessions 1 -> 2" in report["message"]
        assert text_of(await server.call("echo", {"text": "json"})) == "json"
        ended = json.loads(await server.wait_stderr('"state": "completed"'))
        assert ended["tool"] == "echo" and ended["level"] == "info"
        await server.close_stdin()
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert server.stray_stdout == []


async def test_sighup_applies_logging_again_after_a_tool_replaced_its_handler(tmp_path: Path) -> None:
    # A library setting logging up on its first use (basicConfig(force=True)) turned the JSON log
    # into its own text for good: a reload called the standalone server "the host" and left it.
    config = {**server_config(), "logging": {"format": "json", "level": "info"}}
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        async with server.client() as client:
            assert text_of(await client.call_tool("take_over_logging", {})) == "taken over"
            assert text_of(await client.call_tool("echo", {"text": "before"})) == "before"
            await server.wait_stderr(TAKEN_OVER + " INFO:server.sessions.ends:")

            await reload(server, config, reloads=1)
            restored = await server.wait_stderr("[logging] applied again")
            assert json.loads(restored)["level"] == "info", restored
            assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"
            ended = json.loads(await server.wait_stderr('"state": "completed"'))
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert ended["tool"] == "echo" and ended["level"] == "info", ended
    assert "left to the host" not in server.stderr, server.stderr


async def test_a_reload_still_reading_when_the_server_stops_is_not_taken_for_stuck_tool_work(tmp_path: Path) -> None:
    # The file is read in a thread: one still reading at the exit was counted as a tool's thread
    # ("Exiting with 1 thread(s) still running tool work past the shutdown") and forced the exit.
    config = server_config()
    async with start_server(tmp_path, config, transport="streamable-http") as server:
        slow = "".join(f"unknown_{i} = {i}\n" for i in range(60_000))  # seconds of checking
        server.config_path.write_text(slow + render_toml(config), encoding="utf-8")
        server.send_signal(signal.SIGHUP)
        await server.wait_stderr("Received SIGHUP: reloading the config")
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0
    assert "still running tool work" not in server.stderr, server.stderr
    assert "Traceback" not in server.stderr


async def test_sighups_during_the_exit_do_not_end_the_process_with_their_default_action(tmp_path: Path) -> None:
    # Once serving had stopped, SIGHUP's default action was back (the process ends, status 129)
    # for the rest of the exit: a reload asked for then turned a clean shutdown into a kill.
    async with start_server(tmp_path, server_config(), transport="streamable-http") as server:
        # Signalled through a pidfd: `Popen.send_signal` reaps the process if it has exited, which the
        # event loop's child watcher then reports as status 255; a pidfd is never another process.
        pidfd = os.pidfd_open(server.process.pid)
        try:
            server.send_signal(signal.SIGTERM)
            with anyio.fail_after(EXIT_MARGIN):
                while server.process.returncode is None:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGHUP)
                    except ProcessLookupError:  # it has exited
                        break
                    await anyio.sleep(0.002)  # a storm: a signal every few milliseconds until the process is gone
        finally:
            os.close(pidfd)
        assert await server.wait_exit(within=EXIT_MARGIN) == 0


# -- logs ---------------------------------------------------------------------------------


async def test_json_logs_have_one_object_per_line_with_session_ends_and_refusals_and_no_secrets(
    tmp_path: Path,
) -> None:
    config = {
        **server_config(limits={"max_concurrent_sessions": 1}, shutdown={"admin_token_env": TOKEN_ENV}),
        "logging": {"format": "json", "level": "info"},
    }
    async with start_server(tmp_path, config, transport="streamable-http", env={TOKEN_ENV: TOKEN}) as server:
        async with server.client() as client:
            assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"
            assert code_of(await client.call_tool("hang_async", {})) == "timeout"
            created = await client.call_tool("session_create", {"metadata": {"note": SECRET}})
            session = created.structured_content or {}
            assert code_of(await client.call_tool("echo", {"text": "full"})) == "capacity_exceeded"
            await client.call_tool("session_release", {"session_id": session["session_id"]})
            assert code_of(await client.call_tool("server_shutdown", {"token": TOKEN + "-wrong"})) == "unauthorized"
            await client.call_tool("server_shutdown", {"token": TOKEN, "timeout_seconds": 5})
        assert await server.wait_exit(within=EXIT_MARGIN) == 0

    records = [json.loads(line) for line in server.stderr_lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= record.keys() for record in records)
    ends = {record.get("tool", "(none)"): record for record in records if "state" in record}
    assert ends["echo"]["state"] == "completed" and ends["echo"]["level"] == "info"
    assert ends["echo"]["session_id"].startswith("s") and ends["echo"]["duration_seconds"] >= 0
    assert ends["hang_async"]["state"] == "timeout" and "deadline of 0.5s" in ends["hang_async"]["reason"]
    assert ends["(none)"]["session_id"] == session["session_id"] and ends["(none)"]["state"] == "completed"
    refusals = {record["code"]: record for record in records if "code" in record}
    assert refusals["capacity_exceeded"]["level"] == "warning" and refusals["capacity_exceeded"]["tool"] == "echo"
    assert refusals["unauthorized"]["level"] == "warning"
    assert SECRET not in server.stderr and TOKEN not in server.stderr
