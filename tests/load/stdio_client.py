"""A stdio MCP client as a process of its own, for the fault test that kills it mid-call.

Run as `python -m tests.load.stdio_client CONFIG`: it launches the server (`python -m server
--config CONFIG`; the server's stderr is this process's stderr), starts a `tools/call` of
`sleep_async` for an hour (CALLS of them, one if not given: `python -m tests.load.stdio_client
CONFIG CALLS`), asks `session_metrics` until those calls are active sessions, writes
`ready PID` (the server's) on stdout, and then waits for stdin to close. The set-up is bounded:
past SETUP_SECONDS the server is killed and the client exits with an error. The test kills it with SIGKILL there, so
the server loses its client with the call still running, as when an assistant crashes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import IO, Any

#: Bound on the whole set-up (start the server, get the calls admitted).
SETUP_SECONDS = 30.0


def send(pipe: IO[bytes], message: dict[str, Any]) -> None:
    pipe.write((json.dumps(message) + "\n").encode())
    pipe.flush()


def response(pipe: IO[bytes], request_id: int) -> dict[str, Any]:
    """Read lines until the response to `request_id` (bounded by the watchdog in `main`)."""
    for line in pipe:
        message: dict[str, Any] = json.loads(line)
        if message.get("id") == request_id:
            return message
    raise SystemExit(
        f"the server closed stdout before answering request {request_id} (or was killed after {SETUP_SECONDS}s)"
    )


def set_up(server: subprocess.Popen[bytes], calls: int) -> None:
    """Initialize, start the calls, and return once they are all active sessions."""
    assert server.stdin is not None and server.stdout is not None
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "doomed", "version": "0"}}
    send(server.stdin, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
    response(server.stdout, 1)
    send(server.stdin, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    call = {"name": "sleep_async", "arguments": {"seconds": 3600}}
    for call_id in range(2, 2 + calls):
        send(server.stdin, {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": call})
    request_id = 2 + calls
    while True:  # each round trip is one request; no sleeping
        params = {"name": "session_metrics", "arguments": {}}
        send(server.stdin, {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
        metrics = response(server.stdout, request_id)["result"]["structuredContent"]
        if metrics["active_sessions"] == calls:
            return
        request_id += 1


def main(config: str, calls: int) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", config], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    # Every read of the set-up waits for the server: killing it at the bound ends the read at EOF.
    watchdog = threading.Timer(SETUP_SECONDS, server.kill)
    watchdog.start()
    try:
        set_up(server, calls)
    except BaseException:
        server.kill()
        raise
    finally:
        watchdog.cancel()
    sys.stdout.write(f"ready {server.pid}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until killed


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
