"""Presence: who is subscribed to a stream now, per tenant, with join/leave events.

Three layers:

- `PresenceCounts` (pure): a gateway process counts its own connections per
  (tenant, stream, client). Only the first connection of a client on a stream and the last
  one to go reach Redis, so a client with several connections is one entry.
- `PresenceStore`: the Lua scripts (streams/lua/presence_*.lua). Per stream, a sorted set
  holds one member per (gateway process, client) scored by when it expires, on the Redis
  clock (gateway clocks never matter); a hash counts each client's gateway members, another
  holds its name. A client joins when its count becomes 1 and leaves when it returns to 0;
  both are announced on the stream's channel in the same script, as events without a seq
  (`"\\n" EVENT`: they are not in the log, so only live subscribers get them).
- `PresenceTracker`: one per gateway process. It refreshes its members' expiry every
  PRESENCE_REFRESH_S and sweeps expired members of every stream every SWEEP_INTERVAL_S, so
  the entries of a gateway that died without cleaning up leave (with a leave event) at most
  PRESENCE_TTL_S + SWEEP_INTERVAL_S after its last refresh. A `presence` query prunes
  expired members first, so it never lists a ghost even before a sweep.

Leaving: an `unsubscribe`, or a close the client asked for (code 1000), removes the member
at once. A connection that ends otherwise (cut, going away, a gateway restarting) lingers:
its members are kept for PRESENCE_LEAVE_GRACE_S and then expire like a ghost's, so a client
back within the grace (on any gateway) neither left nor joined. That is what keeps a
reconnect storm or a rolling restart from costing every stream a leave and a join for each
of its clients (each fanned out to the stream's others). Lingers are batched: those made
while one is in flight share the next call, one script call per tenant.
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
from streams import keys, registry, scripts
from streams.batches import Batches
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


def refresh_calls(
    streams: Iterable[tuple[str, str, list[str]]],
) -> list[list[tuple[str, str, list[str]]]]:
    """(tenant, stream, clients) grouped into PRESENCE_REFRESH calls: each of one tenant
    (one slot), with up to REFRESH_BATCH clients (a stream with more is split over calls)."""
    by_tenant: dict[str, list[tuple[str, str, list[str]]]] = {}
    for entry in streams:
        by_tenant.setdefault(entry[0], []).append(entry)
    calls: list[list[tuple[str, str, list[str]]]] = []
    for entries in by_tenant.values():
        call: list[tuple[str, str, list[str]]] = []
        size = 0
        for tenant, stream, clients in entries:
            for start in range(0, len(clients), REFRESH_BATCH):
                part = clients[start : start + REFRESH_BATCH]
                if call and size + len(part) > REFRESH_BATCH:
                    calls.append(call)
                    call, size = [], 0
                call.append((tenant, stream, part))
                size += len(part)
        if call:
            calls.append(call)
    return calls


def _per_stream(streams: list[tuple[str, str, list[str]]]) -> list[Any]:
    """The per-stream ARGV tail of a multi-stream script: stream, client count, clients."""
    per_stream: list[Any] = []
    for _, stream, clients in streams:
        per_stream += [stream, len(clients), *clients]
    return per_stream


class PresenceStore:
    """The presence scripts, on behalf of one gateway process (`gateway_id`)."""

    def __init__(self, client: aredis.Redis, gateway_id: str, ttl_s: float) -> None:
        self.client = client
        self.gateway_id = gateway_id
        self.ttl_ms = max(1, round(ttl_s * 1000))
        # Joins, which a reconnect storm's resumed subscriptions make by the thousand, and
        # leaves, which a mass close makes by the ten thousand (a script call each held a
        # pool place of its own: a gateway closing 12,500 sockets at once waited past
        # REDIS_POOL_WAIT_S for places and left thousands of members to expire as ghosts).
        self._joins: Batches[scripts.PresenceJoin, bool] = Batches(self._pipelined)
        self._leaves: Batches[scripts.PresenceLeave, bool] = Batches(self._pipelined)

    @staticmethod
    def _stream(tenant: str, stream: str) -> scripts.PresenceStream:
        """What every per-stream presence script takes first."""
        return scripts.PresenceStream(
            members=keys.presence_members(tenant, stream),
            counts=keys.presence_counts(tenant, stream),
            names=keys.presence_names(tenant, stream),
            index=keys.presence_due(tenant),
            lingering=keys.presence_lingering(tenant, stream),
            channel=keys.stream_channel(tenant, stream),
            index_member=stream,
            stream_json=dumps(stream),
            # Event ids are 32 hex digits like every other event's: 24 random, 8 counted.
            id_prefix=secrets.token_hex(12),
            ts_json=dumps(utc_now_iso()),
            announce_max=conf().presence_announce_max,
        )

    async def join(self, tenant: str, stream: str, client: str, name: str) -> bool:
        """Add or extend this gateway's member; True when the client joined (announced)."""
        # Listed before its first entry: the sweep finds the tenant's due index from there.
        await registry.register_async(self.client, tenant)
        call = scripts.PresenceJoin(
            stream=self._stream(tenant, stream),
            gateway=self.gateway_id,
            ttl_ms=self.ttl_ms,
            client=client,
            name=name,
        )
        return await self._joins.submit(call)

    async def leave(self, tenant: str, stream: str, client: str) -> bool:
        """Remove this gateway's member; True when the client left (announced)."""
        call = scripts.PresenceLeave(
            stream=self._stream(tenant, stream), gateway=self.gateway_id, client=client
        )
        return await self._leaves.submit(call)

    async def _pipelined(
        self, calls: list[scripts.PresenceJoin] | list[scripts.PresenceLeave]
    ) -> list[bool | BaseException]:
        """The joins (or leaves) that arrived together, in one pipeline: each True when it
        is announced."""
        results = await scripts.run_pipelined_async(self.client, calls)
        return [r if isinstance(r, BaseException) else bool(r) for r in results]

    async def refresh(self, streams: Iterable[tuple[str, str, list[str]]]) -> list[EntryKey]:
        """Extend this gateway's members of each (tenant, stream, clients); returns the
        entries that had no member any more (swept as ghosts while refreshes failed).

        One script call covers many streams of one tenant (up to REFRESH_BATCH clients in
        all: the tenant's keys share a slot in a Redis Cluster), so a gateway whose sockets
        each follow a stream of their own pays per batch, not per stream, in round trips
        and in its own CPU."""
        missing: list[EntryKey] = []
        calls = refresh_calls(streams)
        if calls:
            # The registry is in another slot (another node, maybe one that failed over
            # and lost a recent write): listing the tenants again costs one command.
            await self.client.sadd(keys.TENANTS, *sorted({call[0][0] for call in calls}))
        for start in range(0, len(calls), PIPELINE_CHUNK):
            chunk = calls[start : start + PIPELINE_CHUNK]
            refreshes = [self._refresh(streams_of_call) for streams_of_call in chunk]
            results = await scripts.run_pipelined_async(self.client, refreshes)
            for streams_of_call, per_stream in zip(chunk, results, strict=True):
                if isinstance(per_stream, BaseException):
                    raise per_stream
                for (tenant, stream, _), absent in zip(streams_of_call, per_stream, strict=True):
                    missing.extend((tenant, stream, client) for client in absent)
        return missing

    async def linger(self, streams: Iterable[tuple[str, str, list[str]]], grace_s: float) -> int:
        """Keep this gateway's members of each (tenant, stream, clients) for at most `grace_s`
        more, after which they expire and the sweep announces their leave unless the client
        joined again; returns how many are kept (one already removed is not brought back)."""
        grace_ms = max(1, round(grace_s * 1000))
        calls = [
            scripts.PresenceLinger(
                index=keys.presence_due(call[0][0]),
                stream_keys=[
                    key
                    for tenant, stream, _ in call
                    for key in (
                        keys.presence_members(tenant, stream),
                        keys.presence_lingering(tenant, stream),
                    )
                ],
                gateway=self.gateway_id,
                grace_ms=grace_ms,
                per_stream=_per_stream(call),
            )
            for call in refresh_calls(streams)
        ]
        kept = 0
        for start in range(0, len(calls), PIPELINE_CHUNK):
            results = await scripts.run_pipelined_async(
                self.client, calls[start : start + PIPELINE_CHUNK]
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                kept += result
        return kept

    def _refresh(self, streams: list[tuple[str, str, list[str]]]) -> scripts.PresenceRefresh:
        """One PRESENCE_REFRESH call for these (tenant, stream, clients)."""
        return scripts.PresenceRefresh(
            index=keys.presence_due(streams[0][0]),
            stream_members=[keys.presence_members(tenant, stream) for tenant, stream, _ in streams],
            gateway=self.gateway_id,
            ttl_ms=self.ttl_ms,
            per_stream=_per_stream(streams),
        )

    async def sweep_stream(self, tenant: str, stream: str, limit: int = SWEEP_BATCH) -> int:
        """Remove up to `limit` expired members of one stream; returns how many."""
        return await scripts.PresenceSweep(
            stream=self._stream(tenant, stream), limit=limit
        ).run_async(self.client)

    async def sweep(self, max_rounds: int = 100) -> dict[tuple[str, str], int]:
        """Sweep every stream with an expired member (any gateway's), tenant by tenant from
        the registry; returns the ghosts removed per (tenant, stream)."""
        removed: dict[tuple[str, str], int] = {}
        async for raw in self.client.sscan_iter(keys.TENANTS, count=DUE_BATCH):
            tenant = raw.decode() if isinstance(raw, bytes) else raw
            index = keys.presence_due(tenant)
            for _ in range(max_rounds):
                due = await scripts.PresenceDue(index=index, limit=DUE_BATCH).run_async(self.client)
                for stream in due:
                    count = await self.sweep_stream(tenant, stream)
                    if count:
                        removed[(tenant, stream)] = removed.get((tenant, stream), 0) + count
                if len(due) < DUE_BATCH:
                    break
        return removed

    async def clients(self, tenant: str, stream: str) -> list[dict[str, str | None]]:
        """The clients present on the stream now, expired members pruned first."""
        flat = await scripts.PresenceQuery(stream=self._stream(tenant, stream)).run_async(
            self.client
        )
        present = [{"client": flat[i], "name": flat[i + 1] or None} for i in range(0, len(flat), 2)]
        present.sort(key=lambda entry: entry["client"] or "")
        return present


class PresenceTracker:
    """A gateway process's presence: local counts, their Redis entries, refresh and sweep."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        config = conf()
        self.ttl_s: float = config.presence_ttl_s
        self.refresh_s: float = config.presence_refresh_s
        self.sweep_s: float = config.sweep_interval_s
        self.leave_grace_s: float = config.presence_leave_grace_s
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
        # Lingers made while one is in flight share the next call: a storm's thousands of
        # cut sockets cost a few calls per tenant instead of one each.
        self._lingers: Batches[EntryKey, None] = Batches(self._linger_batch)
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

    async def leave_connection(self, conn: str, linger: bool = False) -> None:
        """A connection closed: it leaves every stream it was present on, at once, or
        (`linger`: it ended without a goodbye) after the leave grace unless it comes back."""
        emptied = self.counts.remove_connection(conn)
        if linger and self.leave_grace_s > 0:
            tasks = [self._chain_linger(key) for key in emptied]
        else:
            tasks = [self._chain_leave(key) for key in emptied]
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

    def _chain_linger(self, key: EntryKey) -> asyncio.Task[None]:
        return self._chain(key, "linger", lambda: self._linger(key))

    async def _linger(self, key: EntryKey) -> bool:
        """Put the entry in the next linger call and wait for that call (chained like a
        leave, so a join of the same entry that follows runs after it and finds the member
        kept: the client neither left nor joined)."""
        await self._lingers.submit(key)
        return False  # announces nothing: a leave, if any, comes from the sweep

    async def _linger_batch(self, batch: list[EntryKey]) -> list[None]:
        grouped: dict[tuple[str, str], list[str]] = {}
        for tenant, stream, client in batch:
            grouped.setdefault((tenant, stream), []).append(client)
        try:
            await self.store.linger(
                [(tenant, stream, clients) for (tenant, stream), clients in grouped.items()],
                self.leave_grace_s,
            )
        except Exception:
            # Not fatal: the members stay until their TTL and then leave like a ghost's.
            # Logged once for the batch, not once per entry.
            logger.warning("presence linger failed for %s entries", len(batch), exc_info=True)
        return [None] * len(batch)

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
