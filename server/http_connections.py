"""Bounds on the standalone HTTP server's connections: how many are open at once, and how long a
client may take to send a request.

Tier: application wiring. `server.app.serve_http` gives uvicorn `guard.protocol_class(...)` as its
HTTP protocol, registers `ConnectionsCollector(guard)` with the `/metrics` registry, and calls
`raise_open_files_limit()` before it starts.

The session limits bound calls; nothing in uvicorn (0.54) bounds connections. It caps neither how
many are open nor how long a client may take to send a request (`limit_concurrency` answers 503
only once a request has arrived, and counts the idle connection meanwhile). A client that opened
connections and sent nothing, or sent a request's headers and never its body, held one file
descriptor each, for ever. Once the process's open-files limit was reached, every accept failed:
nobody was served, `/healthz` included, and Python 3.11's accept loop logged megabytes a second (on
EMFILE it logs, and schedules one more retry for each failed accept of its backlog).

`ConnectionGuard` wraps uvicorn's protocol (composition: every `asyncio.Protocol` callback is
forwarded) and

- counts the connections open. Past `max_connections`, up to `PROBE_LANE` more are read as far as
  their request's headers: a `GET` (or `HEAD`) of `/healthz`, `/readyz` or `/metrics` is served (so
  that a liveness probe does not restart a server whose connections a client holds), anything
  else is answered `503 Service Unavailable` with `Connection: close`. With the lane full, a new
  connection takes the place of the oldest one still sending its headers (answered 503), so that
  silent connections cannot keep the probes out. A refused connection is closed at once, so its
  descriptor is back before the next accept: the accept
  loop does not meet EMFILE as long as `max_connections` leaves the reserve free
  (`default_max_connections` does);
- closes (`408 Request Timeout`, or without a word once a response has started) a connection
  whose client has owed a request for `request_timeout` seconds: from the connection's start, or
  from the first byte of a later request, until uvicorn has the whole request, its body included.
  Time the server spends answering does not count, nor time its reading is paused (a pipelined
  request waits for the answer before it; a body the application has not read yet). Idle between
  requests on a kept-alive connection is uvicorn's: it closes one idle for 5 s after a response.
  "The whole request" is read from uvicorn's protocol (`cycle.more_body`, in both its h11 and its
  httptools protocols); a connection without that attribute is refused at once, loudly, rather
  than timed by a guess.

Refusals and timeouts are logged at most once per `logs.REPORT_SECONDS` (with how many since the
last line), never per connection: the condition they report is a flood (`logs.EventReport`).

At the exit, `flush` waits for what the connections' transports still hold to be written: an
answer larger than the sockets' buffers is handed whole to uvicorn, which writes it as its client
reads, and a process that exits before then drops the rest (what the kernel holds still goes
out). A connection still writing at a deadline is closed at once (`abort`) and counted.
Progress is seen without polling: the transport's write-buffer limits are set just below what it
holds, so that asyncio calls `resume_writing` as soon as its client has read something.

Example:
    ```python
    guard = ConnectionGuard(max_connections=1000, request_timeout=10.0)
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

import anyio
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.logs import EventReport

logger = logging.getLogger(__name__)

#: `default_max_connections`: at most this many, the SDK's default cap on client sessions.
DEFAULT_MAX_CONNECTIONS = 10_000
#: Descriptors kept out of the connections' share of the open-files limit: this share of it, at
#: least `MIN_RESERVE`. A fifth of them is the accept burst (`accept_burst`, at most
#: `MAX_ACCEPT_BURST`); up to three bursts are in flight at once (accepted, not yet counted or
#: closed), and `PROBE_LANE` connections past the cap; the rest is for everything else: the
#: listening socket, the event loop, the store's connections, log files, the tool modules' files.
RESERVE_SHARE = 0.1
MIN_RESERVE = 64
#: uvicorn's default listen backlog, which asyncio also takes as the accept burst.
MAX_ACCEPT_BURST = 2048
#: Below this open-files limit the server warns at start: there is no room to serve HTTP safely.
MIN_FILES_LIMIT = 256
#: The soft limit `raise_open_files_limit` sets where the hard one is unlimited (Linux's default
#: `fs.nr_open`, the most a process may have).
INFINITE_FILES_LIMIT = 1 << 20
#: Connections past `max_connections` read as far as their request's headers, to serve the probes.
PROBE_LANE = 8
#: What those may ask for (a `GET` or `HEAD`, any query): the operational endpoints.
PROBE_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})
#: How long one of those may take to send its headers (at most `request_timeout`), and how much.
PROBE_SECONDS = 1.0
MAX_PROBE_HEAD = 8192
#: The end of a request's headers: an empty line (h11 also accepts bare LF line ends).
_HEAD_END = re.compile(rb"\r?\n\r?\n")

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
    one's refused connections are closed. So the burst is a fifth of the reserve (and of what a
    very low limit leaves), which keeps the accept loop off EMFILE while the guard refuses.
    """
    return max(1, min(MAX_ACCEPT_BURST, reserve(files_limit) // 5, (files_limit - 32) // 5))


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
    """A warning if `max_connections` (set in the config) leaves too little room under the
    open-files limit, else None."""
    if max_connections <= files_limit - reserve(files_limit):
        return None
    return (
        f"server.http_max_connections = {max_connections} leaves too little room under this process's "
        f"open-files limit ({files_limit}): once connections use up the descriptors, every new "
        f"connection fails, /healthz included. Raise the limit (ulimit -n, LimitNOFILE=) or lower "
        f"the key to at most {default_max_connections(files_limit)}"
    )


def files_limit_too_low(files_limit: int) -> str | None:
    """A warning if the open-files limit leaves no room to serve HTTP connections, else None."""
    if files_limit >= MIN_FILES_LIMIT:
        return None
    return (
        f"this process's open-files limit ({files_limit}, the hard limit too) leaves room for "
        f"{default_max_connections(files_limit)} HTTP connection(s) at once: raise it to at least "
        f"{MIN_FILES_LIMIT} (ulimit -n, LimitNOFILE=)"
    )


class ConnectionGuard:
    """The HTTP connections open, within `max_connections` (and `PROBE_LANE` more for the probes),
    each given `request_timeout` seconds to send each request. One per server; used on the event
    loop's thread only."""

    def __init__(self, max_connections: int, request_timeout: float) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be more than 0, got {request_timeout}")
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        #: Connections open now within `max_connections` (`_OPEN`); and those past it, in the
        #: lane: whose headers are being read (`_PROBE`), or probes being served (`_SERVED`),
        #: which stay counted here until they close.
        self.open = 0
        self.probing = 0
        #: The connections past the cap still being read (uvicorn knows nothing of them).
        self._lane: set[_GuardedProtocol] = set()
        #: The connections uvicorn's protocol has (`_OPEN`, and `_SERVED` probes).
        self._served: set[_GuardedProtocol] = set()
        self._lane_closed = False
        #: Connections answered 503 because `max_connections` were open, and closed for not
        #: sending a request in time, since the start.
        self.refused = 0
        self.timed_out = 0
        self._refusals = EventReport(
            logger,
            logging.WARNING,
            lambda: (
                f"Refusing new HTTP connections (503): {self.open} are open, the most "
                f"server.http_max_connections allows (up to {PROBE_LANE} more are read for a probe of /healthz, "
                "/readyz or /metrics, which is served)"
            ),
            lambda count: (
                f"Refused {count} more HTTP connection(s) since the last report "
                f"(server.http_max_connections = {self.max_connections})"
            ),
        )
        self._timeouts = EventReport(
            logger,
            logging.INFO,
            lambda: (
                f"Closed an HTTP connection whose client did not send its request in time "
                f"(server.http_request_timeout_seconds = {self.request_timeout:g}; at most {PROBE_SECONDS:g} s "
                "for one past the connection cap)"
            ),
            lambda count: (
                f"Closed {count} more HTTP connection(s) whose request did not come in time since the last report"
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

    def close_lane(self) -> None:
        """Close the connections past the cap whose headers are still being read: uvicorn's
        shutdown, which closes its own connections, does not know them (and from Python 3.12 the
        server's close waits for every connection it accepted)."""
        self._lane_closed = True  # and none joins it from now on: past the cap, refused at once
        for connection in list(self._lane):
            connection.close()

    async def flush(self, deadline: float) -> int:
        """Wait until every connection has written what its transport holds (answers on their way
        to clients slow to read them): one still writing at loop time `deadline` is closed at once,
        what it held dropped. How many were cut."""
        cut = 0

        async def flush_one(connection: _GuardedProtocol) -> None:
            nonlocal cut
            if not await connection.flush(deadline):
                cut += 1

        async with anyio.create_task_group() as tg:
            for connection in [connection for connection in self._served if connection.holding()]:
                tg.start_soon(flush_one, connection)
        return cut

    def close(self) -> None:
        """Report the refusals and timeouts not yet reported; from now on each is reported as it
        comes (the server has stopped)."""
        self.close_lane()
        self._refusals.close()
        self._timeouts.close()

    def _admit(self) -> str | None:
        """`_OPEN` (served), `_PROBE` (past the cap: its headers are read first, and it stays in
        the lane, counted in `probing`, until it closes) or None (refused)."""
        if self.open < self.max_connections:
            self.open += 1
            return _OPEN
        if self._lane_closed:
            return None
        if self.probing >= PROBE_LANE:
            # The lane is full: its oldest connection still sending headers gives its place up.
            # Silent connections would otherwise keep every place, and the probes out.
            oldest = min(self._lane, key=_GuardedProtocol.since, default=None)
            if oldest is None:
                return None  # every place holds a probe being answered
            oldest.evict()
        self.probing += 1
        return _PROBE

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        self.refused += 1
        _answer(transport, _REFUSED)  # the 503 fits the socket's buffer: closed once written
        self._report(self._refusals)

    def _time_out(self, transport: asyncio.BaseTransport, answer: bool) -> None:
        self.timed_out += 1
        _answer(transport, _TIMED_OUT if answer else b"")
        self._report(self._timeouts)

    def _report(self, report: EventReport) -> None:
        due = report.note()
        if due is not None:  # a count begins: told at the period's end (flushing a closed one does nothing)
            asyncio.get_running_loop().call_later(due, report.flush)


def _answer(transport: asyncio.BaseTransport, response: bytes) -> None:
    if response and isinstance(transport, asyncio.WriteTransport):
        transport.write(response)
    transport.close()


_OPEN = "open"  # counted in `open`; uvicorn's protocol has it
_PROBE = "probe"  # past the cap, in the lane: its headers are being read
_SERVED = "served"  # past the cap, in the lane: a probe, which uvicorn's protocol answers, once
_CLOSED = "closed"
_SERVING = (_OPEN, _SERVED)


class _GuardedProtocol(asyncio.Protocol):
    """uvicorn's protocol for one connection, counted by a `ConnectionGuard` and timed while its
    client owes a request."""

    _guard: ClassVar[ConnectionGuard]
    _inner_class: ClassVar[Callable[..., asyncio.Protocol]]

    def __init__(self, **kwargs: Any) -> None:
        self._inner = self._inner_class(**kwargs)
        if not hasattr(self._inner, "cycle"):
            # uvicorn's protocols keep their request in `cycle`; without it no request could be
            # seen whole, and every connection would time out. Refused loudly instead.
            raise RuntimeError(f"{type(self._inner).__name__} has no `cycle`: the HTTP connection guard cannot time it")
        self._state: str | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._loop = asyncio.get_running_loop()
        #: Loop time since which the client has owed a request (None: it owes none now).
        self._owed_since: float | None = None
        #: The inner protocol's request last seen whole (`cycle.more_body` False).
        self._whole: object = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = bytearray()  # past the cap: the bytes so far, until the headers' end
        #: While `flush` waits: set when the transport has written some of what it held.
        self._moved: asyncio.Event | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        guard = self._guard
        self._state = guard._admit()
        if self._state is None:
            guard._refuse(transport)
            self._state = _CLOSED
            return  # uvicorn's protocol never sees it
        self._owed_since = self._loop.time()  # the first request, from now
        self._arm(self._owed_since + self._limit())
        if self._state == _OPEN:
            guard._served.add(self)
            self._inner.connection_made(transport)
        else:
            guard._lane.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state == _PROBE:
            self._read_probe(data)
            return
        if self._state != _OPEN:
            return  # closed, or a probe's: bytes after its headers are not read (it gets one answer)
        if self._owed_since is None:
            self._owed_since = self._loop.time()  # the first byte of a request
        self._inner.data_received(data)
        self._note_whole()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._state in _SERVING else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._leave() in _SERVING:
            self._inner.connection_lost(exc)
        if self._moved is not None:
            self._moved.set()

    def pause_writing(self) -> None:
        if self._state in _SERVING:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._state in _SERVING:
            self._inner.resume_writing()
        if self._moved is not None:
            self._moved.set()

    def close(self) -> None:
        """Close a connection past the cap whose headers are still being read (the server stops)."""
        if self._state == _PROBE and self._transport is not None:
            self._transport.close()

    def holding(self) -> bool:
        """Whether this connection's transport holds bytes not yet written to its socket."""
        transport = self._transport
        return isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() > 0

    async def flush(self, deadline: float) -> bool:
        """Wait until the transport has written what it holds (False: cut, see `ConnectionGuard.flush`)."""
        transport = self._transport
        if not isinstance(transport, asyncio.WriteTransport):
            return True
        try:
            while self._state in _SERVING and (held := transport.get_write_buffer_size()) > 0:
                self._moved = moved = asyncio.Event()
                # `resume_writing` (forwarded to uvicorn's protocol, paused meanwhile) once a byte is written.
                transport.set_write_buffer_limits(high=held - 1, low=held - 1)
                with anyio.move_on_after(deadline - self._loop.time()):
                    await moved.wait()
                if not moved.is_set():
                    transport.abort()
                    return False
        finally:
            self._moved = None
        transport.set_write_buffer_limits()  # asyncio's defaults again
        return True

    def since(self) -> float:
        """When this lane connection was accepted (since when it has owed its headers)."""
        assert self._owed_since is not None
        return self._owed_since

    def evict(self) -> None:
        """Give up this lane place at once to a newer connection (refused: 503 and closed)."""
        self._leave()
        self._refuse_probe()

    def _leave(self) -> str | None:
        """Give this connection's place back to the guard, and stop its clock; the state it had."""
        state, self._state = self._state, _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        guard = self._guard
        guard._served.discard(self)
        if state in (_PROBE, _SERVED):
            guard.probing -= 1
            guard._lane.discard(self)
        elif state == _OPEN:
            guard.open -= 1
        return state

    # -- the request clock -----------------------------------------------------------------

    def _limit(self) -> float:
        timeout = self._guard.request_timeout
        return min(timeout, PROBE_SECONDS) if self._state == _PROBE else timeout

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._tick)

    def _note_whole(self) -> None:
        """Stop the clock if uvicorn's protocol has a new request whole; start it for a new one
        that is not (one it took from bytes it held, after the answer before it)."""
        cycle = getattr(self._inner, "cycle", None)
        if cycle is None or cycle is self._whole:
            return
        if getattr(cycle, "more_body", False):
            if self._owed_since is None:
                self._owed_since = self._loop.time()
            return
        self._whole = cycle
        self._owed_since = None

    def _tick(self) -> None:
        self._timer = None
        transport = self._transport
        if self._state not in (_OPEN, _PROBE, _SERVED) or transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._state in _SERVING:
            self._note_whole()
            reading = getattr(transport, "is_reading", None)
            if self._owed_since is not None and reading is not None and not reading():
                self._owed_since = now  # the server holds the reading off: its time, not the client's
        if self._owed_since is None:
            self._arm(now + self._limit())  # watching for a request taken from held bytes
            return
        due = self._owed_since + self._limit()
        if now < due:
            self._arm(due)
            return
        cycle = getattr(self._inner, "cycle", None)
        if getattr(cycle, "more_body", False) and getattr(cycle, "response_complete", False):
            # Answered before its body was read (a 405 or a 413): the body's end is the client's
            # to send or not, and uvicorn (0.54) forgets the connection's idle timeout once it
            # reads on. Closed as an idle connection is, without a 408, not counted as a timeout.
            transport.close()
            return
        # No 408 in the middle of an answer (a request's body the application did not wait for).
        answering = getattr(cycle, "response_started", False) and not getattr(cycle, "response_complete", True)
        self._guard._time_out(transport, answer=not answering)

    # -- past the cap: serve the probes ----------------------------------------------------

    def _read_probe(self, data: bytes) -> None:
        assert self._transport is not None
        self._head += data
        end = _HEAD_END.search(self._head)
        if end is None:
            if len(self._head) > MAX_PROBE_HEAD:
                self._refuse_probe()
            return
        request_line = bytes(self._head[: self._head.find(b"\n")]).strip()
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD") or path not in PROBE_PATHS:
            self._refuse_probe()
            return
        # A probe: one request answered, then the connection closed (it keeps its place in the
        # lane until then). Bytes after its headers are dropped: no second request rides on it.
        head = bytes(self._head[: end.start()]) + b"\r\nconnection: close\r\n\r\n"
        self._head = bytearray()
        self._state = _SERVED
        self._guard._lane.discard(self)
        self._guard._served.add(self)
        self._inner.connection_made(self._transport)
        self._inner.data_received(head)
        self._note_whole()

    def _refuse_probe(self) -> None:
        assert self._transport is not None
        self._head = bytearray()
        self._guard._refuse(self._transport)  # closed: `connection_lost` gives the lane's place back (unless evicted)


class ConnectionsCollector(Collector):
    """The guard's figures for `/metrics`: connections open, the cap, refused and timed out.

    Read from the thread `/metrics` renders in, while the loop's thread changes them: each is a
    plain count, read whole; `open` and `probing` are read one after the other, a few
    microseconds apart, so their sum may be one off for a connection that opened or closed between.
    """

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def describe(self) -> list[Metric]:
        """Its families without samples (for the registry's clash check and `name[]` filter)."""
        return [kind(name, text) for kind, name, text, _ in _GUARD_FAMILIES]

    def collect(self) -> Iterator[Metric]:
        guard = self._guard
        for kind, name, text, read in _GUARD_FAMILIES:
            yield kind(name, text, value=read(guard))


_GUARD_FAMILIES: tuple[
    tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[ConnectionGuard], float]], ...
] = (
    (
        GaugeMetricFamily,
        "mcp_sessions_http_connections",
        "HTTP connections open now (those past the cap read for a probe included).",
        lambda guard: guard.open + guard.probing,
    ),
    (
        GaugeMetricFamily,
        "mcp_sessions_http_max_connections",
        "server.http_max_connections in force.",
        lambda guard: guard.max_connections,
    ),
    (
        CounterMetricFamily,
        "mcp_sessions_http_connections_refused",
        "HTTP connections refused (503) because server.http_max_connections were open.",
        lambda guard: guard.refused,
    ),
    (
        CounterMetricFamily,
        "mcp_sessions_http_request_timeouts",
        "HTTP connections closed (408) for not sending a request within server.http_request_timeout_seconds.",
        lambda guard: guard.timed_out,
    ),
)
