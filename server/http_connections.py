"""Bounds on the standalone HTTP server's connections: how many are open at once, and how long a
new one may take to send its first request's headers.

Tier: application wiring. `server.app.serve_http` gives uvicorn `guard.protocol_class(...)` as its
HTTP protocol, registers `ConnectionsCollector(guard)` with the `/metrics` registry, and calls
`raise_open_files_limit()` before it starts.

The session limits bound calls; nothing in uvicorn (0.54) bounds connections. It caps neither how
many are open nor how long a client may take to send a request's headers (`limit_concurrency`
answers 503 only once a request has arrived, and counts the idle connection meanwhile). A client
that opened connections and sent nothing held one file descriptor each, for ever. Once the
process's open-files limit was reached, every accept failed: nobody was served, `/healthz`
included, and Python 3.11's accept loop logged megabytes a second (on EMFILE it logs, and schedules
one more retry for each failed accept of its backlog).

`ConnectionGuard` wraps uvicorn's protocol (composition: every `asyncio.Protocol` callback is
forwarded) and

- counts the connections open. One accepted past `max_connections` is answered
  `503 Service Unavailable` with `Connection: close` and closed at once, so its descriptor is back
  before the next accept: the accept loop never meets EMFILE as long as `max_connections` leaves
  room under the open-files limit (`default_max_connections` does);
- closes (`408 Request Timeout`) a connection that has not sent its first request's headers (up
  to the blank line that ends them) within `header_timeout` seconds. Later requests on a
  keep-alive connection are uvicorn's: it closes a connection idle for 5 s after a response.

Both are logged at most once per `REPORT_SECONDS` (with how many since the last line), never per
connection: the condition they report is a flood.

Example:
    ```python
    guard = ConnectionGuard(max_connections=1000, header_timeout=10.0)
    config = uvicorn.Config(app, http=guard.protocol_class(AutoHTTPProtocol), ws="none")
    ```
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Rate of the log lines on refused and timed-out connections: one per this many seconds at most.
REPORT_SECONDS = 10.0
#: `default_max_connections`: at most this many, the SDK's default cap on client sessions.
DEFAULT_MAX_CONNECTIONS = 10_000
#: Descriptors kept out of the connections' share of the open-files limit: this share of it, at
#: least `MIN_RESERVE`. A quarter of them is the accept burst (`accept_burst`, at most
#: `MAX_ACCEPT_BURST`); up to three bursts are in flight at once (accepted, not yet counted or
#: closed); the rest is for everything else: the listening socket, the event loop, the store's
#: connections, log files, the tool modules' own files.
RESERVE_SHARE = 0.1
MIN_RESERVE = 64
#: uvicorn's default listen backlog, which asyncio also takes as the accept burst.
MAX_ACCEPT_BURST = 2048
#: The soft limit `raise_open_files_limit` sets where the hard one is unlimited (Linux's default
#: `fs.nr_open`, the most a process may have).
INFINITE_FILES_LIMIT = 1 << 20
#: The end of a request's headers: an empty line (h11 also accepts bare LF line ends).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: Bytes of a chunk kept to find a head end split across two reads.
_TAIL = 3

_REFUSED_BODY = b"The server has too many connections open; retry later.\n"
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go's runtime does at start); the limit
    now in force. Each HTTP connection holds a descriptor, and the usual soft limit (1024) is far
    below what a server needs; the hard limit is the administrator's. Left as it is where it
    cannot be raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return INFINITE_FILES_LIMIT
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    if hard == resource.RLIM_INFINITY:
        hard = INFINITE_FILES_LIMIT
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        logger.debug("Could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return soft
    logger.debug("Raised the open-files limit from %d to %d", soft, hard)
    return hard


def reserve(files_limit: int) -> int:
    """Descriptors not given to connections under an open-files limit of `files_limit`."""
    return max(MIN_RESERVE, int(files_limit * RESERVE_SHARE))


def accept_burst(files_limit: int) -> int:
    """The listen backlog to give uvicorn under an open-files limit of `files_limit`.

    asyncio (3.11, 3.12) accepts up to `backlog` connections each time the listening socket is
    ready, before any of them reaches its protocol (and so the guard): each burst holds that many
    descriptors the count does not see yet, and up to three bursts are in flight before the first
    one's refused connections are closed. So the burst is a quarter of the reserve, which keeps
    the accept loop off EMFILE while the guard refuses past `max_connections`.
    """
    return max(1, min(MAX_ACCEPT_BURST, reserve(files_limit) // 4))


def lengthen_listen_queue(sockets: Iterable[Any], backlog: int = MAX_ACCEPT_BURST) -> None:
    """Give the kernel's queue of connections waiting to be accepted `backlog` places again.

    asyncio takes the one `backlog` both for `listen()` and for the accept burst, and a short
    accept burst (`accept_burst`) would make the kernel's queue as short: at 16 places, of 150
    connects made one at a time, up to 7 waited a second for their SYN to be sent again.
    A second `listen()` on a listening socket only sets its queue's length (Linux, BSD).
    """
    for listening in sockets:
        with socket.socket(fileno=os.dup(listening.fileno())) as same:
            same.listen(backlog)


def default_max_connections(files_limit: int) -> int:
    """Connections to allow under an open-files limit of `files_limit`: what is left after the
    reserve, at most `DEFAULT_MAX_CONNECTIONS`, at least 1."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, files_limit - reserve(files_limit)))


def over_files_limit(max_connections: int, files_limit: int) -> str | None:
    """A warning if `max_connections` leaves too little room under the open-files limit, else None."""
    if max_connections <= files_limit - reserve(files_limit):
        return None
    return (
        f"server.http_max_connections = {max_connections} leaves too little room under this process's "
        f"open-files limit ({files_limit}): once connections use up the descriptors, every new "
        f"connection fails, /healthz included. Raise the limit (ulimit -n, LimitNOFILE=) or lower "
        f"the key to at most {default_max_connections(files_limit)}"
    )


class _Reporter:
    """One log line per `REPORT_SECONDS` at most about a repeated event: the first at once, then,
    while it goes on, how many more there were."""

    def __init__(self, level: int, first: Callable[[], str], more: Callable[[int], str]) -> None:
        self._level = level
        self._first = first
        self._more = more
        self._unreported = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._unreported += 1
            return
        logger.log(self._level, "%s", self._first())
        self._timer = loop.call_later(REPORT_SECONDS, self._report, loop)

    def _report(self, loop: asyncio.AbstractEventLoop) -> None:
        count, self._unreported = self._unreported, 0
        if count == 0:
            self._timer = None  # quiet for a whole period: the next one is reported at once
            return
        logger.log(self._level, "%s", self._more(count))
        self._timer = loop.call_later(REPORT_SECONDS, self._report, loop)

    def close(self) -> None:
        """Report what is left unreported, and stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count, self._unreported = self._unreported, 0
        if count:
            logger.log(self._level, "%s", self._more(count))


class ConnectionGuard:
    """The HTTP connections open, within `max_connections`, each given `header_timeout` seconds to
    send its first request's headers. One per server; used on the event loop's thread only."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if not header_timeout > 0:
            raise ValueError(f"header_timeout must be more than 0, got {header_timeout}")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: Connections open now (accepted and not refused).
        self.open = 0
        #: Connections refused because `max_connections` were open, and closed for sending no
        #: request headers in time, since the start.
        self.refused = 0
        self.timed_out = 0
        self._refusals = _Reporter(
            logging.WARNING,
            lambda: (
                f"Refusing new HTTP connections (503): {self.open} are open, the most "
                f"server.http_max_connections allows"
            ),
            lambda count: (
                f"Refused {count} more HTTP connection(s) since the last report "
                f"({self.open} open, server.http_max_connections = {self.max_connections})"
            ),
        )
        self._timeouts = _Reporter(
            logging.INFO,
            lambda: (
                f"Closed an HTTP connection that sent no request headers within "
                f"server.http_header_timeout_seconds = {self.header_timeout:g}"
            ),
            lambda count: (
                f"Closed {count} more HTTP connection(s) that sent no request headers in time since the last report"
            ),
        )

    def protocol_class(self, inner: Callable[..., asyncio.Protocol]) -> type[asyncio.Protocol]:
        """A protocol class for uvicorn (`uvicorn.Config(http=...)`) whose instances wrap one of
        `inner(**kwargs)` each, within this guard's bounds."""
        guard = self

        class Guarded(_GuardedProtocol):
            _guard = guard
            _inner_class = inner

        return Guarded

    def close(self) -> None:
        """Report the refusals and timeouts not yet reported, and stop the report timers (the
        server has stopped)."""
        self._refusals.close()
        self._timeouts.close()

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        if self.open < self.max_connections:
            self.open += 1
            return True
        self.refused += 1
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_REFUSED)
        transport.close()  # after the 503 is written: it fits the socket's buffer
        self._refusals.note(asyncio.get_running_loop())
        return False

    def _time_out(self, transport: asyncio.BaseTransport) -> None:
        if transport.is_closing():
            return
        self.timed_out += 1
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_TIMED_OUT)
        transport.close()
        self._timeouts.note(asyncio.get_running_loop())


class _GuardedProtocol(asyncio.Protocol):
    """uvicorn's protocol for one connection, counted by a `ConnectionGuard` and timed until its
    first request's headers have arrived."""

    _guard: ClassVar[ConnectionGuard]
    _inner_class: ClassVar[Callable[..., asyncio.Protocol]]

    def __init__(self, **kwargs: Any) -> None:
        self._inner = self._inner_class(**kwargs)
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if not guard._admit(transport):
            return  # closed; uvicorn's protocol never sees it
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(guard.header_timeout, guard._time_out, transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._head_timer is not None:
            seen = self._tail + data
            if _HEAD_END.search(seen):
                self._head_timer.cancel()
                self._head_timer = None
                self._tail = b""
            else:
                self._tail = seen[-_TAIL:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._guard.open -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


class ConnectionsCollector(Collector):
    """The guard's figures for `/metrics`: connections open, the cap, refused and timed out."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        guard = self._guard
        yield GaugeMetricFamily("mcp_sessions_http_connections", "HTTP connections open now.", value=guard.open)
        yield GaugeMetricFamily(
            "mcp_sessions_http_max_connections", "server.http_max_connections in force.", value=guard.max_connections
        )
        yield CounterMetricFamily(
            "mcp_sessions_http_connections_refused",
            "HTTP connections refused (503) because server.http_max_connections were open.",
            value=guard.refused,
        )
        yield CounterMetricFamily(
            "mcp_sessions_http_header_timeouts",
            "HTTP connections closed (408) for sending no request headers within server.http_header_timeout_seconds.",
            value=guard.timed_out,
        )
