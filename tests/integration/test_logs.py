"""Log lines through the SDK's in-memory Client: one INFO line per session end with its fields,
one WARNING line per refusal, never the metadata; nothing formatted below the level in force."""

from __future__ import annotations

import logging

import pytest
from mcp import Client

from tests.helpers import build, code_of, settings

SECRET = "metadata-contents-never-logged"


def session_ends(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.sessions.ends" and hasattr(r, "state")]


async def test_each_session_end_is_one_info_line_and_each_refusal_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build(settings(max_concurrent_sessions=1, max_metadata_bytes=64))
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="server.sessions.ends")  # off by default for embedding hosts
    async with Client(app) as client:
        await client.call_tool("echo", {"text": "hi"})
        await client.call_tool("boom", {"message": "broken"})
        created = (await client.call_tool("session_create", {"metadata": {"note": SECRET}})).structured_content or {}
        assert code_of(await client.call_tool("echo", {"text": "full"})) == "capacity_exceeded"
        await client.call_tool("session_release", {"session_id": created["session_id"]})
        too_big = await client.call_tool("session_create", {"metadata": {"note": SECRET * 10}})
        assert code_of(too_big) == "metadata_too_large"

    ends = {(r.tool, r.state): r for r in session_ends(caplog)}  # type: ignore[attr-defined]
    assert set(ends) == {("echo", "completed"), ("boom", "error"), (None, "completed")}
    echo = ends[("echo", "completed")]
    assert echo.levelno == logging.INFO and echo.duration_seconds >= 0  # type: ignore[attr-defined]
    assert echo.getMessage().startswith(f"Session {echo.session_id} ended completed after ")  # type: ignore[attr-defined]
    assert "boom" in ends[("boom", "error")].reason  # type: ignore[attr-defined]
    untooled = ends[(None, "completed")]
    assert untooled.session_id == created["session_id"] and "(no tool)" in untooled.getMessage()  # type: ignore[attr-defined]

    refusals = {r.code: r for r in caplog.records if r.name == "server.refusals"}  # type: ignore[attr-defined]
    assert set(refusals) == {"capacity_exceeded", "metadata_too_large"}
    assert all(r.levelno == logging.WARNING for r in refusals.values())
    assert refusals["capacity_exceeded"].getMessage().startswith("Refused echo (capacity_exceeded): ")
    assert refusals["metadata_too_large"].tool == "session_create"  # type: ignore[attr-defined]
    assert SECRET not in caplog.text


async def test_below_info_no_session_end_line_is_made(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    caplog.set_level(logging.WARNING)
    async with Client(app) as client:
        for _ in range(3):
            await client.call_tool("echo", {"text": "quiet"})
    assert session_ends(caplog) == []


async def test_an_embedding_host_at_info_gets_no_session_end_lines_until_it_asks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MCPServer puts the root logger at INFO by itself; a line per call is the host's choice.
    app, _ = build()
    caplog.set_level(logging.INFO)
    async with Client(app) as client:
        await client.call_tool("echo", {"text": "quiet"})
        assert session_ends(caplog) == []
        logging.getLogger("server.sessions.ends").setLevel(logging.INFO)
        try:
            await client.call_tool("echo", {"text": "now logged"})
        finally:
            logging.getLogger("server.sessions.ends").setLevel(logging.WARNING)
    assert [r.state for r in session_ends(caplog)] == ["completed"]  # type: ignore[attr-defined]
