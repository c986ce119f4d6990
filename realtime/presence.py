"""Presence: who is subscribed to a stream now, per tenant, with join/leave events.

Three layers:

- `PresenceCounts` (pure): a gateway process counts its own connections per
  (tenant, stream, client). Only the first connection of a client on a stream and the last
  one to go reach Redis, so a client with several connections is one entry.
- `PresenceStore`: the Lua scripts. Per stream, a sorted set holds one member per
  (gateway process, client) scored by when it expires, on the Redis clock (gateway clocks
  never matter); a hash counts each client's gateway members, another holds its name. A
  client joins when its count becomes 1 and leaves when it returns to 0; both are announced
  on the stream's channel in the same script, as events without a seq (`"\\n" EVENT`: they
  are not in the log, so only live subscribers get them).
- `PresenceTracker`: one per gateway process. It refreshes its members' expiry every
  PRESENCE_REFRESH_S and sweeps expired members of every stream every SWEEP_INTERVAL_S, so
  the entries of a gateway that died without cleaning up leave (with a leave event) at most
  PRESENCE_TTL_S + SWEEP_INTERVAL_S after its last refresh. A `presence` query prunes
  expired members first, so it never lists a ghost even before a sweep.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aredis

from project.conf import conf
from streams import keys
from streams.events import dumps, utc_now_iso

logger = logging.getLogger(__name__)

# (tenant, stream, client)
EntryKey = tuple[str, str, str]

# Members swept per script call: a dead gateway's thousands of entries leave in slices, so
# no single script holds Redis for long.
SWEEP_BATCH = 1000
# Streams taken from the index per sweep round.
DUE_BATCH = 100
# Clients refreshed per script call (over one or many streams), and script calls per
# pipeline round trip.
REFRESH_BATCH = 500
PIPELINE_CHUNK = 100

# Shared head of the per-stream scripts.
# KEYS: members (zset), counts (hash), names (hash), index (zset)
# ARGV: channel, index_member, stream_json, event_id_prefix, ts_json, announce_max, then
# the script's own.
_COMMON = """
local members, counts, names, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, index_member, stream_json = ARGV[1], ARGV[2], ARGV[3]
local id_prefix, ts_json, announce_max = ARGV[4], ARGV[5], tonumber(ARGV[6])

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local announced = 0
-- An event without a seq: an empty head before the newline tells gateways so.
-- Not on a stream with more than announce_max present clients: every subscriber gets
-- every join, so a crowd joining would cost the square of its size in frames.
local function announce(kind, client, name)
  announced = announced + 1
  if redis.call('HLEN', counts) > announce_max then return end
  local client_json = cjson.encode(client)
  local name_json = 'null'
  if name and name ~= '' then name_json = cjson.encode(name) end
  redis.call('PUBLISH', channel, '\\n{"type":"event","stream":' .. stream_json
    .. ',"id":"' .. id_prefix .. string.format('%08x', announced)
    .. '","kind":"' .. kind .. '","from":' .. cjson.encode('client:' .. client)
    .. ',"cause":{"client":' .. client_json .. ',"message":null,"prev":null}'
    .. ',"ts":' .. ts_json
    .. ',"data":{"client":' .. client_json .. ',"name":' .. name_json .. '}}')
end

-- One gateway's member goes; the client leaves when it was its last.
local function drop(member)
  if redis.call('ZREM', members, member) == 0 then return end
  local client = string.sub(member, string.find(member, ' ', 1, true) + 1)
  if redis.call('HINCRBY', counts, client, -1) <= 0 then
    local name = redis.call('HGET', names, client)
    redis.call('HDEL', counts, client)
    redis.call('HDEL', names, client)
    announce('leave', client, name)
  end
end

local function sweep(limit)
  local expired = redis.call('ZRANGEBYSCORE', members, '-inf', string.format('%d', now_ms()),
    'LIMIT', 0, limit)
  for _, member in ipairs(expired) do drop(member) end
  return #expired
end

-- The index says when the stream next needs a sweep: its earliest expiry.
local function reindex()
  local first = redis.call('ZRANGE', members, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', index, index_member)
  else
    redis.call('ZADD', index, first[2], index_member)
  end
end
"""

# ARGV[7..]: gateway_id, ttl_ms, client, name. Returns 1 when the client joined.
JOIN = (
    _COMMON
    + """
local client, name = ARGV[9], ARGV[10]
local expiry = string.format('%d', now_ms() + tonumber(ARGV[8]))
if redis.call('ZADD', members, expiry, ARGV[7] .. ' ' .. client) == 1 then
  if redis.call('HINCRBY', counts, client, 1) == 1 then
    redis.call('HSET', names, client, name)
    announce('join', client, name)
  end
end
reindex()
return announced
"""
)

# ARGV[7..]: gateway_id, client. Returns 1 when the client left.
LEAVE = (
    _COMMON
    + """
drop(ARGV[7] .. ' ' .. ARGV[8])
reindex()
return announced
"""
)

# KEYS: the index, then each stream's members. ARGV: gateway_id, ttl_ms, then per stream
# its index member, how many clients follow, and those clients. Extends this gateway's
# members of many streams in one call; never creates one (a refresh racing a leave must
# not bring the entry back). Returns, per stream, the clients that had no member (swept
# while this gateway could not refresh): the tracker joins them again.
REFRESH = """
local index = KEYS[1]
local gateway, ttl_ms = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local expiry = string.format('%d',
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl_ms)
local missing = {}
local arg = 3
for k = 2, #KEYS do
  local members = KEYS[k]
  local index_member, count = ARGV[arg], tonumber(ARGV[arg + 1])
  arg = arg + 2
  local absent = {}
  for i = arg, arg + count - 1 do
    local member = gateway .. ' ' .. ARGV[i]
    if redis.call('ZSCORE', members, member) then
      redis.call('ZADD', members, expiry, member)
    else
      absent[#absent + 1] = ARGV[i]
    end
  end
  arg = arg + count
  local first = redis.call('ZRANGE', members, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', index, index_member)
  else
    redis.call('ZADD', index, first[2], index_member)
  end
  missing[#missing + 1] = absent
end
return missing
"""

# ARGV[7]: limit. Removes up to `limit` expired members; returns how many it removed.
SWEEP = (
    _COMMON
    + """
local removed = sweep(tonumber(ARGV[7]))
reindex()
return removed
"""
)

# Every expired member goes first, so a ghost is never listed. Returns [client, name, ...].
QUERY = (
    _COMMON
    + """
while sweep(1000) == 1000 do end
reindex()
return redis.call('HGETALL', names)
"""
)

# KEYS: index. ARGV: limit. The streams whose earliest presence entry has expired.
DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now),
  'LIMIT', 0, ARGV[1])
"""


class PresenceCounts:
    """A gateway process's local connections per (tenant, stream, client). Pure logic.

    A connection is counted once per entry however often it subscribes, and forgetting a
    connection it never added is a no-op, so callers need not track what they reported."""

    def __init__(self) -> None:
        self._holders: dict[EntryKey, set[str]] = {}
        self._names: dict[EntryKey, str] = {}
        self._by_connection: dict[str, set[EntryKey]] = {}

    def add(self, key: EntryKey, connection: str, name: str) -> bool:
        """Count `connection` in the entry; True when it is the entry's first (join)."""
        holders = self._holders.get(key)
        first = holders is None
        if holders is None:
            holders = self._holders[key] = set()
            self._names[key] = name
        holders.add(connection)
        self._by_connection.setdefault(connection, set()).add(key)
        return first

    def remove(self, key: EntryKey, connection: str) -> bool:
        """Stop counting `connection`; True when the entry has no connection left (leave)."""
        holders = self._holders.get(key)
        if holders is None or connection not in holders:
            return False
        holders.discard(connection)
        keys_of = self._by_connection.get(connection)
        if keys_of is not None:
            keys_of.discard(key)
            if not keys_of:
                del self._by_connection[connection]
        if holders:
            return False
        del self._holders[key]
        del self._names[key]
        return True

    def remove_connection(self, connection: str) -> list[EntryKey]:
        """Forget a connection everywhere; returns the entries it was the last one of."""
        emptied = []
        for key in list(self._by_connection.get(connection, ())):
            if self.remove(key, connection):
                emptied.append(key)
        return emptied

    def holds(self, key: EntryKey) -> bool:
        return key in self._holders

    def name(self, key: EntryKey) -> str:
        return self._names.get(key, "")

    def connections(self, key: EntryKey) -> int:
        return len(self._holders.get(key, ()))

    def by_stream(self) -> dict[tuple[str, str], list[str]]:
        """Every entry, grouped by (tenant, stream): what a refresh extends."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for tenant, stream, client in self._holders:
            grouped.setdefault((tenant, stream), []).append(client)
        return grouped

    def __len__(self) -> int:
        return len(self._holders)


def _index_member(tenant: str, stream: str) -> str:
    # A tenant slug never holds ':', so the first ':' splits it from the stream again.
    return f"{tenant}:{stream}"


class PresenceStore:
    """The presence scripts, on behalf of one gateway process (`gateway_id`)."""

    def __init__(self, client: aredis.Redis, gateway_id: str, ttl_s: float) -> None:
        self.client = client
        self.gateway_id = gateway_id
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._join = client.register_script(JOIN)
        self._leave = client.register_script(LEAVE)
        self._refresh = client.register_script(REFRESH)
        self._sweep = client.register_script(SWEEP)
        self._query = client.register_script(QUERY)
        self._due = client.register_script(DUE)

    @staticmethod
    def _keys(tenant: str, stream: str) -> list[str]:
        return [
            keys.presence_members(tenant, stream),
            keys.presence_counts(tenant, stream),
            keys.presence_names(tenant, stream),
            keys.PRESENCE_INDEX,
        ]

    @staticmethod
    def _common(tenant: str, stream: str) -> list[Any]:
        return [
            keys.stream_channel(tenant, stream),
            _index_member(tenant, stream),
            dumps(stream),
            # Event ids are 32 hex digits like every other event's: 24 random, 8 counted.
            secrets.token_hex(12),
            dumps(utc_now_iso()),
            conf().presence_announce_max,
        ]

    async def join(self, tenant: str, stream: str, client: str, name: str) -> bool:
        """Add or extend this gateway's member; True when the client joined (announced)."""
        args = [*self._common(tenant, stream), self.gateway_id, self.ttl_ms, client, name]
        return bool(await self._join(keys=self._keys(tenant, stream), args=args))

    async def leave(self, tenant: str, stream: str, client: str) -> bool:
        """Remove this gateway's member; True when the client left (announced)."""
        args = [*self._common(tenant, stream), self.gateway_id, client]
        return bool(await self._leave(keys=self._keys(tenant, stream), args=args))

    async def refresh(self, streams: Iterable[tuple[str, str, list[str]]]) -> list[EntryKey]:
        """Extend this gateway's members of each (tenant, stream, clients); returns the
        entries that had no member any more (swept as ghosts while refreshes failed).

        One script call covers many streams (up to REFRESH_BATCH clients in all), so a
        gateway whose sockets each follow a stream of their own pays per batch, not per
        stream, in round trips and in its own CPU."""
        calls: list[list[tuple[str, str, list[str]]]] = []
        call: list[tuple[str, str, list[str]]] = []
        size = 0
        for tenant, stream, clients in streams:
            for start in range(0, len(clients), REFRESH_BATCH):
                part = clients[start : start + REFRESH_BATCH]
                if call and size + len(part) > REFRESH_BATCH:
                    calls.append(call)
                    call, size = [], 0
                call.append((tenant, stream, part))
                size += len(part)
        if call:
            calls.append(call)
        missing: list[EntryKey] = []
        for start in range(0, len(calls), PIPELINE_CHUNK):
            chunk = calls[start : start + PIPELINE_CHUNK]
            async with self.client.pipeline(transaction=False) as pipe:
                for streams_of_call in chunk:
                    script_keys = [keys.PRESENCE_INDEX]
                    args: list[Any] = [self.gateway_id, self.ttl_ms]
                    for tenant, stream, clients in streams_of_call:
                        script_keys.append(keys.presence_members(tenant, stream))
                        args += [_index_member(tenant, stream), len(clients), *clients]
                    await self._refresh(keys=script_keys, args=args, client=pipe)
                results = await pipe.execute()
            for streams_of_call, per_stream in zip(chunk, results, strict=True):
                for (tenant, stream, _), absent in zip(streams_of_call, per_stream, strict=True):
                    missing.extend((tenant, stream, client.decode()) for client in absent)
        return missing

    async def sweep_stream(self, tenant: str, stream: str, limit: int = SWEEP_BATCH) -> int:
        """Remove up to `limit` expired members of one stream; returns how many."""
        args = [*self._common(tenant, stream), limit]
        return int(await self._sweep(keys=self._keys(tenant, stream), args=args))

    async def sweep(self, max_rounds: int = 100) -> dict[tuple[str, str], int]:
        """Sweep every stream with an expired member (any gateway's); returns the ghosts
        removed per (tenant, stream)."""
        removed: dict[tuple[str, str], int] = {}
        for _ in range(max_rounds):
            due = await self._due(keys=[keys.PRESENCE_INDEX], args=[DUE_BATCH])
            if not due:
                break
            for member in due:
                tenant, _, stream = member.decode().partition(":")
                count = await self.sweep_stream(tenant, stream)
                if count:
                    removed[(tenant, stream)] = removed.get((tenant, stream), 0) + count
            if len(due) < DUE_BATCH:
                break
        return removed

    async def clients(self, tenant: str, stream: str) -> list[dict[str, str | None]]:
        """The clients present on the stream now, expired members pruned first."""
        flat = await self._query(keys=self._keys(tenant, stream), args=self._common(tenant, stream))
        present = [
            {"client": flat[i].decode(), "name": flat[i + 1].decode() or None}
            for i in range(0, len(flat), 2)
        ]
        present.sort(key=lambda entry: entry["client"] or "")
        return present


class PresenceTracker:
    """A gateway process's presence: local counts, their Redis entries, refresh and sweep."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        config = conf()
        self.ttl_s: float = config.presence_ttl_s
        self.refresh_s: float = config.presence_refresh_s
        self.sweep_s: float = config.sweep_interval_s
        # Random per process: a restarted gateway never extends its predecessor's members,
        # which therefore expire as the ghosts they are.
        self.gateway_id = secrets.token_hex(8)
        self._client_factory = client_factory
        self._store: PresenceStore | None = None
        self.counts = PresenceCounts()
        # The last Redis operation of each entry: the next one waits for it, so a leave can
        # never overtake the join it undoes (two connections of one client, say).
        self._pending: dict[EntryKey, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        if self.refresh_s >= self.ttl_s:
            logger.warning(
                "PRESENCE_REFRESH_S (%s) is not below PRESENCE_TTL_S (%s): live clients "
                "will flap out of presence",
                self.refresh_s,
                self.ttl_s,
            )

    @property
    def store(self) -> PresenceStore:
        if self._store is None:
            self._store = PresenceStore(self._client_factory(), self.gateway_id, self.ttl_s)
        return self._store

    async def join(self, tenant: str, stream: str, client: str, name: str, conn: str) -> None:
        """Count a connection subscribed to a stream; returns once the client is present
        in Redis (so a `presence` query answered after `subscribed` lists it)."""
        self._ensure_running()
        key = (tenant, stream, client)
        if self.counts.add(key, conn, name):
            task: asyncio.Task[None] | None = self._chain_join(key)
        else:
            task = self._pending.get(key)  # the join still on its way, if any
        if task is not None:
            await asyncio.shield(task)

    async def leave(self, tenant: str, stream: str, client: str, conn: str) -> None:
        """A connection is no longer subscribed; the client leaves with its last one."""
        key = (tenant, stream, client)
        if self.counts.remove(key, conn):
            await asyncio.shield(self._chain_leave(key))

    async def leave_connection(self, conn: str) -> None:
        """A connection closed: it leaves every stream it was present on."""
        tasks = [self._chain_leave(key) for key in self.counts.remove_connection(conn)]
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    async def clients(self, tenant: str, stream: str) -> list[dict[str, str | None]]:
        return await self.store.clients(tenant, stream)

    def _chain_join(self, key: EntryKey) -> asyncio.Task[None]:
        tenant, stream, client = key
        name = self.counts.name(key)
        return self._chain(key, "join", lambda: self.store.join(tenant, stream, client, name))

    def _chain_leave(self, key: EntryKey) -> asyncio.Task[None]:
        tenant, stream, client = key
        return self._chain(key, "leave", lambda: self.store.leave(tenant, stream, client))

    def _chain(
        self, key: EntryKey, what: str, operation: Callable[[], Awaitable[bool]]
    ) -> asyncio.Task[None]:
        previous = self._pending.get(key)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                announced = await operation()
            except Exception:
                # Not fatal: a lost join is redone by the next refresh; a lost leave leaves
                # a ghost that expires like a dead gateway's.
                logger.warning(
                    "presence %s failed tenant=%s stream=%s client=%s",
                    what,
                    *key,
                    exc_info=True,
                )
                return
            if announced:
                logger.debug("presence %s tenant=%s stream=%s client=%s", what, *key)

        task = asyncio.get_running_loop().create_task(run())
        self._pending[key] = task
        task.add_done_callback(lambda done: self._forget_pending(key, done))
        return task

    def _forget_pending(self, key: EntryKey, task: asyncio.Task[None]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]

    def _ensure_running(self) -> None:
        if self._loops and not any(loop.done() for loop in self._loops):
            return
        for loop in self._loops:
            loop.cancel()
        create = asyncio.get_running_loop().create_task
        self._loops = [create(self._refresh_forever()), create(self._sweep_forever())]

    async def refresh(self) -> None:
        """Extend every local entry; join again any that was swept meanwhile."""
        grouped = self.counts.by_stream()
        if not grouped:
            return
        streams = [(tenant, stream, clients) for (tenant, stream), clients in grouped.items()]
        for key in await self.store.refresh(streams):
            # A join still pending will create the member; a key no longer held has left.
            if self.counts.holds(key) and key not in self._pending:
                logger.warning(
                    "presence entry was swept while alive; joining again "
                    "tenant=%s stream=%s client=%s",
                    *key,
                )
                self._chain_join(key)

    async def sweep(self) -> None:
        removed = await self.store.sweep()
        for (tenant, stream), count in removed.items():
            logger.info(
                "presence swept %s expired entries tenant=%s stream=%s", count, tenant, stream
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.warning("presence refresh failed; trying again", exc_info=True)

    async def _sweep_forever(self) -> None:
        while True:
            # Jitter below the interval keeps gateways out of step without stretching the
            # bound a ghost can live for.
            await asyncio.sleep(self.sweep_s * random.uniform(0.5, 1.0))
            try:
                await self.sweep()
            except Exception:
                logger.warning("presence sweep failed; trying again", exc_info=True)


_tracker: PresenceTracker | None = None


def get_tracker() -> PresenceTracker:
    global _tracker
    if _tracker is None:
        from streams.redis_clients import async_client

        _tracker = PresenceTracker(async_client)
    return _tracker
