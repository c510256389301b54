"""The shared session space of cluster mode: sessions, slots and counters in Redis.

Tier: runtime core, used by `server.cluster`. Every change that replicas could race on is
one Lua script, run atomically by Redis: admission (expire what is overdue, check the caps,
register the session and count it), release, and the housekeeping that expires the sessions
of replicas that died. Deadlines and durations use the Redis server's clock (`TIME`), so
replicas need no synchronised clocks.

Keys, all under `[store] key_prefix` (P):
    P active    sorted set: id of every active session, scored by its deadline (ms)
    P s:<id>    hash: tool, client, replica, bytes, created, deadline, state (kept a while after it ends)
    P counts    hash: created, completed, error, timeout, cancelled, peak, metadata_bytes, rejected_*
    P tools     hash: active calls per tool
    P clients   hash: active sessions per client
    P replicas  sorted set: replica id scored by when it last reported (ms)
    P epoch     a token set once: a Redis that restarted empty has a new one
    P recovering  set for RECOVERY_SECONDS once a replica finds Redis empty: no admission then
    P waiting   hash: calls queued per replica (only replicas with queued calls are told of freed slots)
    P events    pub/sub channel: "freed" (a slot may be free), "ended <id> <state>" (released
                through a replica other than its own), "overdue <id> <replica>" (kept past its
                deadline for its live replica, which ends it if it no longer runs it)

Every Redis failure surfaces as `StoreUnavailable`, raised within about `[store] timeout_seconds`
(it bounds each connect and read, with one retry on a broken connection; the whole operation is
bounded by twice it): the caller answers `store_unavailable` at once.
A Redis at its maxmemory (noeviction) admits no session (`StoreFull`) but still takes ends,
releases and housekeeping: the call-path and housekeeping scripts write first what frees memory, or probe.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.config import StoreSettings
from server.store_url import safe_url

#: A session whose replica stopped answering is expired this long after its deadline: the
#: replica that owns a session ends it at its deadline itself, so Redis only steps in for one
#: that died (and never races a live replica's own timeout).
EXPIRY_GRACE_SECONDS = 1.0
#: A session past its deadline (+ the grace) is left to its replica while that replica reported
#: within this many seconds (it does at least once a second, see `server.cluster`): a live
#: replica ends its sessions itself, when their work stops. A call that holds its cancellation
#: off (a shield) still runs, so its slot stays taken in the cluster as in its replica.
OWNER_LIVE_SECONDS = 3.0
#: How long an ended session is remembered, to answer `already_released` with how it ended.
ENDED_TTL_SECONDS = 3600
#: A replica counts as live in the cluster totals if it reported within this many seconds.
REPLICA_LIVE_SECONDS = 5.0
#: At most this many overdue sessions are expired per script run (the rest on the next one).
PURGE_BATCH = 200
#: After Redis came back empty, admissions wait this long (refused "recovering") while the
#: replicas register their running sessions again: each notices within a second (its
#: housekeeping runs at least that often, see `server.cluster`), and the caps must count them.
RECOVERY_SECONDS = 2.0
#: The end (`end_later`) of an admission its replica never opened: the caller had left, or had
#: been told that the store failed. Redis frees its slot and takes it back out of `created`.
WITHDRAWN = "withdrawn"
#: How long the end of a session Redis never saw is remembered: long enough for an admission
#: that timed out on its way (and so was answered `store_unavailable`) to arrive and be refused.
TOMBSTONE_TTL_SECONDS = 120

_COMMON = (
    f"local PURGE_BATCH, TOMBSTONE_TTL = {PURGE_BATCH}, {TOMBSTONE_TTL_SECONDS}\n"
    f"local RECOVERY_MS = {int(RECOVERY_SECONDS * 1000)}\n"
    f"local OWNER_LIVE_MS = {int(OWNER_LIVE_SECONDS * 1000)}\n"
    + """
local P = ARGV[1]
local active, counts, tools, clients = P .. 'active', P .. 'counts', P .. 'tools', P .. 'clients'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function decr(hash, field)
  if field and field ~= '' then
    if redis.call('HINCRBY', hash, field, -1) <= 0 then redis.call('HDEL', hash, field) end
  end
end

-- End an active session: free its slot and count how it ended. False if it was not active.
-- 'withdrawn': an admission its replica never opened (its caller had left, or was told the
-- store failed): it is taken back out of 'created' rather than counted as an end, and its
-- record says 'cancelled'.
local function finish(id, state, ttl)
  redis.call('ZREM', active, id)
  local key = P .. 's:' .. id
  local f = redis.call('HMGET', key, 'tool', 'client', 'bytes', 'state')
  if f[4] ~= 'active' then return false end
  decr(tools, f[1])
  decr(clients, f[2])
  local bytes = tonumber(f[3]) or 0
  if bytes ~= 0 then redis.call('HINCRBY', counts, 'metadata_bytes', 0 - bytes) end
  if state == 'withdrawn' then
    redis.call('HINCRBY', counts, 'created', -1)
    state = 'cancelled'
  else
    redis.call('HINCRBY', counts, state, 1)
  end
  redis.call('HSET', key, 'state', state, 'ended', now)
  redis.call('EXPIRE', key, ttl)
  return true
end

-- Tell the replicas that a slot came free, if any has calls queued for one.
local function signal_freed()
  if redis.call('HLEN', P .. 'waiting') > 0 then redis.call('PUBLISH', P .. 'events', 'freed') end
end

-- How many calls this replica has queued (it is told of freed slots while any). The HDEL comes
-- first: a Redis at maxmemory lets it through, and every write after it (see `full` in _SYNC),
-- so that ends and housekeeping go on while Redis is full.
local function set_waiting(replica, n)
  redis.call('HDEL', P .. 'waiting', replica)
  if n > 0 then redis.call('HSET', P .. 'waiting', replica, n) end
end

-- Expire sessions overdue by more than the grace whose replica is silent (it died, or has been
-- cut off from Redis). A live replica's overdue session is still running (a call holding its
-- cancellation off): it is looked at again a grace from now, and its replica ends it. The
-- replica is told ("overdue <id> <replica>"), so that it ends one it no longer runs.
local function purge(grace, ttl, limit)
  local ids = redis.call('ZRANGEBYSCORE', active, '-inf', now - grace, 'LIMIT', 0, limit)
  local replicas = P .. 'replicas'
  local freed = 0
  for _, id in ipairs(ids) do
    local owner = redis.call('HGET', P .. 's:' .. id, 'replica')
    local seen = owner and redis.call('ZSCORE', replicas, owner)
    if seen and tonumber(seen) >= now - OWNER_LIVE_MS then
      redis.call('ZADD', active, 'XX', now, id)
      redis.call('PUBLISH', P .. 'events', 'overdue ' .. id .. ' ' .. owner)
    elseif finish(id, 'timeout', ttl) then
      freed = freed + 1
      -- Marked: its replica may only have been cut off from Redis (see the ends in _SYNC).
      redis.call('HSET', P .. 's:' .. id, 'purged', 1)
    end
  end
  if freed > 0 then signal_freed() end
  return freed
end

-- Register an active session; `age_ms` (default 0): how long it has run already.
local function register(id, timeout_ms, tool, client, bytes, replica, ttl, age_ms)
  local deadline = now + timeout_ms
  redis.call('ZADD', active, deadline, id)
  local key = P .. 's:' .. id
  redis.call('HSET', key, 'tool', tool, 'client', client, 'replica', replica, 'bytes', bytes,
    'created', now - (age_ms or 0), 'deadline', deadline, 'state', 'active')
  redis.call('PEXPIRE', key, timeout_ms + ttl * 1000)
  if tool ~= '' then redis.call('HINCRBY', tools, tool, 1) end
  if client ~= '' then redis.call('HINCRBY', clients, client, 1) end
  redis.call('HINCRBY', counts, 'created', 1)
  if bytes ~= 0 then redis.call('HINCRBY', counts, 'metadata_bytes', bytes) end
  local n = redis.call('ZCARD', active)
  if n > tonumber(redis.call('HGET', counts, 'peak') or '0') then redis.call('HSET', counts, 'peak', n) end
  return deadline
end
"""
)

# The one script of the call path: end sessions, then admit new ones, in one round trip.
# ARGV: prefix, grace_ms, ttl_s, replica, calls queued at the replica, number of ends, own (1:
# the ends are this replica's own sessions), refusals by the client share the replica decided
# itself (counted in rejected_client_limit), then per end: id, state; then per admission: id,
# timeout_ms, tool, client, bytes, max_total, tool_cap (0: none), client_cap (0: none), final
# (1: count a refusal, the caller will not queue).
# Returns {per end {state before, created, now}, per admission {verdict}, why Redis is full ('' if
# it is not; then every admission's verdict is "full", unless it had been admitted)}. An end of a session
# another replica owns is announced ("ended ..."), so that its owner ends its copy. A release of
# an id Redis lacks while it recovers is "recovering" or "lost" (see below), not "unknown".
_SYNC = (
    _COMMON
    + """
local grace, ttl, replica = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
-- ARGV[7]: '1' the replica's own ends; '0' a release; '2' a release that spares tool calls.
local ends, own, calls_too = tonumber(ARGV[6]), ARGV[7] == '1', ARGV[7] ~= '2'
-- A Redis at maxmemory (noeviction) refuses only a script's first write that may take memory;
-- every write after any other goes through. So admissions ask first, with a write that takes
-- none (the counter exists): refused, Redis is full ('full': none is admitted); the ends,
-- which free memory, are written all the same.
local full = ''
if #ARGV > 8 + 2 * ends then
  local probe = redis.pcall('HSETNX', counts, 'created', 0)
  if type(probe) == 'table' and probe.err then
    if not string.find(probe.err, 'OOM', 1, true) then return probe end
    full = probe.err
  end
end
set_waiting(replica, tonumber(ARGV[5]))
if ARGV[8] ~= '0' then redis.call('HINCRBY', counts, 'rejected_client_limit', tonumber(ARGV[8])) end
local released, admitted = {}, {}
local freed = false
-- 'lost': no epoch, Redis restarted empty and no replica has noticed yet. 'recovering': one
-- has, and the replicas are registering their running sessions again. Admitting now would not
-- count them.
local recovering = false
if redis.call('EXISTS', P .. 'epoch') == 0 then
  recovering = 'lost'
elseif redis.call('EXISTS', P .. 'recovering') == 1 then
  recovering = 'recovering'
end
for i = 9, 8 + 2 * ends, 2 do
  local id, state = ARGV[i], ARGV[i + 1]
  local shown = state == 'withdrawn' and 'cancelled' or state  -- as its record says it ended
  local key = P .. 's:' .. id
  local f = redis.call('HMGET', key, 'state', 'created', 'replica', 'purged', 'tool')
  local before = f[1] or 'unknown'
  if not calls_too and f[5] and f[5] ~= '' then
    before = 'call'  -- a tool call's session, running or ended: it ends with its call, never by a release
  elseif before == 'active' then
    finish(id, state, ttl)
    freed = true
    if f[3] ~= replica then redis.call('PUBLISH', P .. 'events', 'ended ' .. id .. ' ' .. shown) end
  elseif own and f[4] and f[3] == replica and before == 'timeout' and state ~= 'timeout' then
    -- Expired as overdue while its live replica could not reach Redis, which kept its end and
    -- writes it now: it ended otherwise, so count it as it ended (its slot is free already).
    redis.call('HINCRBY', counts, 'timeout', -1)
    redis.call('HINCRBY', counts, state == 'withdrawn' and 'created' or state, state == 'withdrawn' and -1 or 1)
    redis.call('HSET', key, 'state', shown)
    redis.call('HDEL', key, 'purged')
  elseif before == 'unknown' and own then
    -- One of ours that Redis has not seen: its admission may still be on its way (sent before
    -- a time-out, run late). Leave a mark so that it is not admitted then.
    redis.call('HSET', key, 'state', shown)
    redis.call('EXPIRE', key, TOMBSTONE_TTL)
  elseif before == 'unknown' and recovering then
    -- A release of an id Redis lacks while it is recovering: its replica may not have
    -- registered it again yet. Say so ('recovering' | 'lost'): the client is to retry.
    before = recovering
  end
  released[#released + 1] = {before, tonumber(f[2] or '0'), now}
end
if freed then signal_freed() end
if #ARGV > 8 + 2 * ends then purge(grace, ttl, PURGE_BATCH) end
for i = 9 + 2 * ends, #ARGV, 9 do
  local id, timeout_ms, tool, client = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local bytes, max_total = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local tool_cap, client_cap, final = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7]), ARGV[i + 8] == '1'
  local verdict = 'ok'
  if redis.call('EXISTS', P .. 's:' .. id) == 1 then
    verdict = 'again'  -- run twice (a retry after a lost reply): admitted once
  elseif full ~= '' then
    verdict = 'full'
  elseif recovering then
    verdict = recovering
  elseif client ~= '' and client_cap > 0 and tonumber(redis.call('HGET', clients, client) or '0') >= client_cap then
    verdict = 'client_limit'
  elseif redis.call('ZCARD', active) >= max_total then
    verdict = 'capacity'
  elseif tool ~= '' and tool_cap > 0 and tonumber(redis.call('HGET', tools, tool) or '0') >= tool_cap then
    verdict = 'tool_limit'
  end
  if verdict == 'again' then
    verdict = 'ok'
  elseif verdict == 'ok' then
    register(id, timeout_ms, tool, client, bytes, replica, ttl)
  elseif not recovering and verdict ~= 'full' and (final or verdict == 'client_limit') then
    redis.call('HINCRBY', counts, 'rejected_' .. verdict, 1)
  end
  admitted[#admitted + 1] = verdict
end
return {released, admitted, full}
"""
)

# ARGV: prefix, grace_ms, ttl_s, replica, live_ms, epoch, calls queued at the replica, the
# epoch the replica knew ('' if none). Expires
# overdue sessions, records the replica as live; returns {sessions expired, ms until the
# earliest deadline + grace (-1: none), the store's epoch}. The epoch is a token set once per
# store: a Redis that restarted empty has a new one, which tells each replica to register its
# sessions again.
_HOUSEKEEPING = (
    _COMMON
    + """
local grace, ttl, replica, live = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
set_waiting(replica, tonumber(ARGV[7]))
local freed = purge(grace, ttl, PURGE_BATCH)
local replicas = P .. 'replicas'
redis.call('ZADD', replicas, now, replica)
redis.call('ZREMRANGEBYSCORE', replicas, '-inf', now - 10 * live)
-- A replica that died with calls queued would be told of every freed slot forever: forget its
-- count once it is silent (a live one sets its count again with its next round trip).
for _, other in ipairs(redis.call('HKEYS', P .. 'waiting')) do
  local seen = tonumber(redis.call('ZSCORE', replicas, other))
  if seen == nil or seen < now - live then redis.call('HDEL', P .. 'waiting', other) end
end
local first = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
local wait = -1
if first[2] then wait = math.max(0, tonumber(first[2]) + grace - now) end
-- ARGV[8]: the epoch this replica knew ('' at its start). Finding none, it knows Redis lost its
-- data: admissions wait while the replicas register their sessions again.
if redis.call('SET', P .. 'epoch', ARGV[6], 'NX') and ARGV[8] ~= '' then
  redis.call('SET', P .. 'recovering', 1, 'PX', RECOVERY_MS)
end
return {freed, wait, redis.call('GET', P .. 'epoch')}
"""
)

# ARGV: prefix, ttl_s, replica, then (id, ms left, tool, client, bytes, ms since it began) per session this
# replica holds. Returns each one's state in Redis: "active"; an ended state (it was released
# through another replica, and the message was missed); or "restored" (Redis no longer had it,
# having restarted empty: it is registered again).
_RECONCILE = (
    _COMMON
    + """
local ttl, replica = tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 4, #ARGV, 6 do
  local id = ARGV[i]
  local state = redis.call('HGET', P .. 's:' .. id, 'state')
  if not state then
    -- With its age, so that a release through another replica reports its whole duration.
    register(id, tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4]), replica, ttl,
      tonumber(ARGV[i + 5]))
    state = 'restored'
  end
  out[#out + 1] = state
end
return out
"""
)

# ARGV: prefix, live_ms. One consistent reading of the cluster's counters.
_TOTALS = (
    _COMMON
    + """
local live = tonumber(ARGV[2])
return {
  redis.call('ZCARD', active),
  redis.call('HGETALL', counts),
  redis.call('HGETALL', tools),
  redis.call('ZCOUNT', P .. 'replicas', now - live, '+inf'),
}
"""
)


class StoreUnavailable(Exception):
    """Redis could not be reached, did not answer in time, or answered with an error (`refused`:
    a read-only replica, missing ACL rights, out of memory, a key of another type under the
    prefix, which retrying does not cure until the store is put right); the message says where and why."""

    def __init__(self, message: str, *, refused: bool = False, why: str = "") -> None:
        super().__init__(message)
        self.refused = refused
        #: What went wrong, without where or in doing what ("TimeoutError: ..."); else the message.
        self.why = why or message


class StoreFull(StoreUnavailable):
    """Redis is at its `maxmemory` (with `noeviction`) and admits no session: refused, as an
    out-of-memory error is. Session ends, releases and the housekeeping go on (they free memory)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, refused=True)


@dataclass(frozen=True, slots=True)
class Released:
    """What Redis knew of a session a release named."""

    #: "active" (this release ended it), an ended state ("completed", ...), "unknown", or, for
    #: an id Redis lacks while it recovers from a restart empty, "recovering" or "lost" (see `_SYNC`).
    before: str
    #: Seconds from its creation to now, on the Redis clock (0.0 when unknown).
    duration: float


@dataclass(frozen=True, slots=True)
class Totals:
    active_sessions: int
    counts: dict[str, int]
    tools: dict[str, int]
    replicas: int


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisStore:
    """The session space in Redis at `[store] url`, under `[store] key_prefix`."""

    def __init__(self, settings: StoreSettings, replica: str) -> None:
        self.settings = settings
        self.replica = replica
        self.prefix = settings.key_prefix
        self.channel = settings.key_prefix + "events"
        self.where = f"the session store at {safe_url(settings.url)} ([store] url)"
        timeout = settings.timeout_seconds
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry, on a broken connection only: a pooled connection to a Redis
            # that restarted fails once. A Redis that is down fails the retry at once too.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        self._sync = self.redis.register_script(_SYNC)
        self._housekeeping = self.redis.register_script(_HOUSEKEEPING)
        self._reconcile = self.redis.register_script(_RECONCILE)
        self._totals = self.redis.register_script(_TOTALS)
        self._grace_ms = int(EXPIRY_GRACE_SECONDS * 1000)
        #: How many calls this replica has queued; `on_orphan(session_id)`: a session admitted
        #: for a caller that was cancelled meanwhile (the owner withdraws it). Set by the manager.
        self.waiting: Callable[[], int] = lambda: 0
        self.on_orphan: Callable[[str], None] = lambda session_id: None
        self._admissions: list[tuple[tuple[Any, ...], asyncio.Future[str]]] = []
        self._admitting: asyncio.Task[None] | None = None
        self._ended: list[tuple[str, str]] = []
        #: Refusals by the client share decided at this replica, not yet counted in Redis.
        self._client_refusals = 0
        #: Ends sent in a round trip that has not come back yet (see `unwritten_ends`).
        self._ends_in_flight = 0
        #: Set while session ends wait to be written.
        self.ended_ready = anyio.Event()

    async def _call(self, what: str, operation: Any) -> Any:
        """Await `operation` within twice the store's timeout (the client bounds each connect and
        read by it, and retries a broken connection once); any failure becomes `StoreUnavailable`."""
        try:
            # The client bounds connect and each read; this bounds the whole operation too.
            with anyio.fail_after(self.settings.timeout_seconds * 2):
                return await operation
        except ResponseError as exc:
            why = _describe(exc)
            raise StoreUnavailable(f"{self.where} refused to {what}: {why}", refused=True, why=why) from None
        except (RedisError, OSError, TimeoutError) as exc:
            why = _describe(exc)
            raise StoreUnavailable(f"{self.where} failed to {what}: {why}", why=why) from None

    async def acquire(
        self,
        session_id: str,
        seconds: float,
        tool: str | None,
        client: str | None,
        metadata_bytes: int,
        max_total: int,
        tool_cap: int | None,
        client_cap: int,
        final: bool,
    ) -> str:
        """Admit and register a session for `seconds` if the cluster has room: "ok", else why
        not ("capacity" | "tool_limit" | "client_limit" | "recovering": Redis came back empty
        and the replicas are registering their sessions again). Raises `StoreFull` when Redis
        is at its maxmemory (the session is not registered), `StoreUnavailable` when it fails.

        One round trip carries every admission asked for while the previous one was on its
        way, and the session ends waiting to be written (`end_later`), written first. A caller
        cancelled while its request is on its way does not learn the verdict; an admitted
        session of such a caller is handed to `on_orphan`.
        """
        request = (
            session_id,
            max(1, math.ceil(seconds * 1000)),
            tool or "",
            client or "",
            metadata_bytes,
            max_total,
            tool_cap or 0,
            client_cap,
            1 if final else 0,
        )
        verdict: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._admissions.append((request, verdict))
        if self._admitting is None:
            self._admitting = asyncio.get_running_loop().create_task(self._admit_batches())
        return await verdict

    async def _admit_batches(self) -> None:
        try:
            while self._admissions:
                batch, self._admissions = self._admissions, []
                try:
                    _, rows, full = await self._run_sync(
                        "admit a session", self._take_ended(), [r for r, _ in batch], True
                    )
                except StoreUnavailable as exc:
                    # Those that asked while it was failing would wait for a whole round trip
                    # more: they are refused for the same reason, within the one timeout they
                    # waited. Calls that ask from now on try again.
                    waited, self._admissions = self._admissions, []
                    for _, verdict in batch + waited:
                        if not verdict.done():
                            verdict.set_exception(StoreUnavailable(str(exc), refused=exc.refused))
                    for request, _ in batch:
                        # Refused here, but Redis may still run the admission (a time-out, not a
                        # refusal): withdraw it there, or mark it so that it is never admitted.
                        # (The waiting ones were never sent: nothing to undo.)
                        self.end_later(request[0], WITHDRAWN)
                    continue
                for (request, verdict), answer in zip(batch, rows, strict=True):
                    text = _text(answer)
                    if verdict.done():
                        if text == "ok":
                            self.on_orphan(request[0])
                    elif text == "full":  # not registered: nothing to undo
                        reason = _describe(ResponseError(_text(full)))
                        verdict.set_exception(StoreFull(f"{self.where} refused to admit a session: {reason}"))
                    else:
                        verdict.set_result(text)
        finally:
            self._admitting = None

    def count_client_refusal(self) -> None:
        """Count in `rejected_client_limit`, with the next round trip, a refusal by the client share
        that this replica decided itself (the client's running and queued calls here)."""
        self._client_refusals += 1
        self.ended_ready.set()

    def end_later(self, session_id: str, state: str) -> None:
        """Write this session end with the next round trip (see `flush_ended`); in order, and
        kept until Redis has taken it."""
        self._ended.append((session_id, state))
        self.ended_ready.set()

    @property
    def pending_ends(self) -> int:
        """Session ends waiting to be written."""
        return len(self._ended)

    @property
    def unwritten_ends(self) -> int:
        """Session ends Redis has not taken yet: waiting, or on their way in a round trip that has
        not come back (with a hung Redis it may never)."""
        return len(self._ended) + self._ends_in_flight

    async def flush_ended(self) -> bool:
        """Write the session ends waiting to be written (raises `StoreUnavailable`; they stay).
        Whether Redis was asked at all: False when another round trip (an admission's) had
        taken them already."""
        wrote = False
        while self._ended or self._client_refusals:
            await self._run_sync("release a session", self._take_ended(), [], True)
            wrote = True
        self.ended_ready = anyio.Event()
        return wrote

    def _take_ended(self) -> list[tuple[str, str]]:
        ended, self._ended = self._ended[:1000], self._ended[1000:]
        return ended

    async def release(self, ended: Sequence[tuple[str, str]], tool_calls: bool = True) -> list[Released]:
        """End each (session id, state) now if it is still active; say what each was before.
        With `tool_calls=False` a tool call's session, running or ended, is left as it is and
        is said to be "call" (its tool is not named: the call may be another client's)."""
        rows, _, _ = await self._run_sync("release a session", list(ended), [], False, tool_calls)
        return [
            Released(_text(before), max(0, int(now) - int(created)) / 1000 if created else 0.0)
            for before, created, now in rows
        ]

    async def _run_sync(
        self,
        what: str,
        ended: list[tuple[str, str]],
        admissions: list[tuple[Any, ...]],
        requeue: bool,
        tool_calls: bool = True,
    ) -> tuple[list[Any], list[Any], Any]:
        """One run of the call-path script: what each end found, each admission's verdict, and
        why Redis is full ('' unless it is). On failure, with `requeue`, the ends go back to the
        front of the queue (written again later: ending a session twice changes nothing)."""
        args: list[Any] = [
            self.prefix,
            self._grace_ms,
            ENDED_TTL_SECONDS,
            self.replica,
            self.waiting(),
            len(ended),
            1 if requeue else 0 if tool_calls else 2,  # 1: the outbox holds this replica's own sessions
            self._client_refusals,
        ]
        refusals, self._client_refusals = self._client_refusals, 0
        for pair in ended:
            args += pair
        for request in admissions:
            args += request
        self._ends_in_flight += len(ended)
        try:
            released, admitted, full = await self._call(what, self._sync(args=args))
        except BaseException:
            self._client_refusals += refusals  # (counted twice if Redis ran it after a time-out)
            if requeue and ended:
                self._ended[:0] = ended
                self.ended_ready.set()
            raise
        finally:
            self._ends_in_flight -= len(ended)
        return released, admitted, full

    async def housekeeping(self, known_epoch: str | None = None) -> tuple[float | None, str]:
        """Expire sessions whose replica died; mark this replica live. Returns the seconds until
        the next session could need expiring (None: no active session) and the store's epoch
        (it changes when Redis lost its data). With the `known_epoch` the replica saw before,
        finding Redis empty holds admissions for `RECOVERY_SECONDS` (see `_SYNC`)."""
        live_ms = int(REPLICA_LIVE_SECONDS * 1000)
        epoch = secrets.token_hex(8)
        args = (
            self.prefix,
            self._grace_ms,
            ENDED_TTL_SECONDS,
            self.replica,
            live_ms,
            epoch,
            self.waiting(),
            known_epoch or "",
        )
        _, wait_ms, epoch = await self._call("expire overdue sessions", self._housekeeping(args=args))
        return (None if int(wait_ms) < 0 else int(wait_ms) / 1000), _text(epoch)

    async def reconcile(self, sessions: Sequence[tuple[str, float, str | None, str | None, int, float]]) -> list[str]:
        """Compare this replica's (id, seconds left, tool, client, bytes, seconds since it began)
        sessions with Redis: per session "active", the state another replica ended it with, or
        "restored" (Redis had lost it and has it again, with the age it had)."""
        if not sessions:
            return []
        args: list[Any] = [self.prefix, ENDED_TTL_SECONDS, self.replica]
        for session_id, left, tool, client, size, age in sessions:
            args += (session_id, max(1, math.ceil(left * 1000)), tool or "", client or "", size, int(age * 1000))
        return [_text(state) for state in await self._call("reconcile sessions", self._reconcile(args=args))]

    async def totals(self) -> Totals:
        """The cluster's counters, read atomically."""
        args = (self.prefix, int(REPLICA_LIVE_SECONDS * 1000))
        active, counts, tools, replicas = await self._call("read the cluster totals", self._totals(args=args))
        return Totals(int(active), _pairs(counts), _pairs(tools), int(replicas))

    async def eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy` (from `INFO memory`: managed Redis often disables CONFIG),
        or None when it cannot be read (INFO refused by an ACL, or renamed away)."""
        try:
            info = await self._call("read its memory settings", self.redis.info("memory"))
        except StoreUnavailable:
            return None
        policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
        return _text(policy) if policy else None

    async def leave(self) -> None:
        """Stop counting this replica as live (a clean stop): a session it could not end is then
        expired at its deadline (+ the grace), without waiting for it to fall silent. Its count of
        queued calls goes too."""

        async def leave() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.prefix + "replicas", self.replica)
                pipe.hdel(self.prefix + "waiting", self.replica)
                await pipe.execute()

        await self._call("leave the cluster", leave())

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except (RedisError, OSError):  # closing a connection to a Redis that is gone
            pass


#: What `check_reachable` runs: a write under the prefix, from a Lua script, undone at once.
_PROBE = "redis.call('SET', KEYS[1], '1', 'PX', 1000) return redis.call('DEL', KEYS[1])"


def check_reachable(settings: StoreSettings) -> str | None:
    """None if Redis at `settings.url` answers within the store's timeout and lets this server
    do what it needs (run Lua scripts that write under `[store] key_prefix`); else why not (a
    sentence naming the URL, password hidden). For startup, before anything is served: a Redis
    that answers PING but refuses those (a read-only replica, an ACL user without scripting or
    writes) would otherwise fail the first session store call, after the server had started."""
    import redis
    import redis.retry

    timeout = settings.timeout_seconds
    client = redis.Redis.from_url(
        settings.url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    where = f"the session store at {safe_url(settings.url)} ([store] url)"
    try:
        try:
            client.ping()
        except (RedisError, OSError) as exc:
            if isinstance(exc, redis.AuthenticationError):
                return f"cannot log in to {where}: {_describe(exc)}; {_login_advice(settings.url)}"
            if isinstance(exc, redis.ResponseError):  # it answered, with a refusal
                hint = ""
                if "DB index" in str(exc):
                    hint = (
                        "; the database number at the end of [store] url (redis://HOST:PORT/DB) must be one this "
                        "Redis has: 0 up to its `databases` setting (16 by default) minus 1"
                    )
                return f"cannot use {where}: {_describe(exc)}{hint}"
            return f"cannot reach {where}: {_describe(exc)}{_tls_hint(settings.url, exc, timeout)}"
        try:
            client.eval(_PROBE, 1, f"{settings.key_prefix}probe:{secrets.token_hex(4)}")
        except (RedisError, OSError) as exc:
            return (
                f"cannot use {where}: {_describe(exc)}; this server runs Lua scripts (EVAL, EVALSHA) that "
                f"write keys under [store] key_prefix {settings.key_prefix!r}, so it needs a primary (not a "
                "read-only replica) and, with ACLs, a user allowed scripting and writes on those keys"
            )
    finally:
        client.close()
    return None


def _tls_hint(url: str, exc: BaseException, timeout_seconds: float) -> str:
    """A hint when the failure looks like TLS spoken to a plain Redis (`rediss://`: a time-out
    although the port takes connections, as a plain Redis waits for a line that a TLS greeting
    never ends; or a TLS error other than a certificate's) or plain text to a TLS port
    (`redis://`: the connection reset or closed after it opened); else "". redis-py's own words
    read as if the host could not be reached."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if url.startswith("rediss://"):
        certificate = any(isinstance(e, ssl.SSLCertVerificationError) for e in chain)
        timeout = any(isinstance(e, TimeoutError | RedisTimeoutError) for e in chain)
        if (timeout and _opens(url, timeout_seconds)) or (
            any(isinstance(e, ssl.SSLError) for e in chain) and not certificate
        ):
            return "; that port may not speak TLS (rediss:// is TLS: a Redis without TLS there needs redis://)"
    elif url.startswith("redis://"):
        cut = any(isinstance(e, ConnectionResetError | ssl.SSLError) for e in chain)
        if cut or "Connection closed by server" in str(chain[0]):
            return "; that port may speak only TLS (redis:// is plain text: a Redis with TLS there needs rediss://)"
    return ""


def _opens(url: str, timeout_seconds: float) -> bool:
    """Whether a TCP connection to the URL's host and port opens within `timeout_seconds`."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 6379), timeout=timeout_seconds):
            return True
    except (OSError, ValueError):
        return False


def _login_advice(url: str) -> str:
    """What to do when Redis refuses this server's login (the URL's user name and password)."""
    parts = urlsplit(url)
    if not parts.password and "password" not in parse_qs(parts.query):
        return (
            "Redis asks for a password and [store] url gives none: write it into the URL, "
            "redis://:PASSWORD@HOST:PORT/DB (redis://USER:PASSWORD@... for an ACL user; "
            "unix:///PATH?password=PASSWORD for a socket; `/ ? # @` in it percent-encoded), or give the "
            "whole URL in the environment variable MCP_SESSIONS_STORE__URL to keep the password out of the file"
        )
    return "check the user name and password in [store] url (`/ ? # @` in the password percent-encoded)"


def _describe(exc: BaseException) -> str:
    """`exc` as the end of a clause: callers go on with "; ..." (redis-py's texts end with a full stop)."""
    text = str(exc).strip().rstrip(".").rstrip()
    if isinstance(exc, TimeoutError) and not text:
        return "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
