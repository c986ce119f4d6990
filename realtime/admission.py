"""Flow control at the gateway: every bound is answered at once, nothing waits in a queue.

- **Message rates.** Each `send` and `publish` draws one token from its client's bucket and
  its tenant's bucket together (`streams/buckets.py`, all or nothing); short, it is
  refused with `rate_limited` and the buckets' honest wait. A `receipt` (a Redis write
  too) pays into a bucket of its own per client (`client_receipts_per_s`,
  `client_receipt_burst`). The rate check comes before
  the message's dedupe lookup: a repeated id also costs a token, and a rate-limited repeat
  gets its duplicate `ack` once it is tried again after `retry_after_ms`.
- **Runs in flight per connection, queued runs per tenant.** Counted in Redis by
  `ACCEPT_SEND` (check and count in the same script that accepts) and uncounted by
  `CLAIM_STEP` (a run's first claim) and `FINALIZE_RUN` (its reply.done): see
  `streams/lua/`. Past either bound a `send` is refused (`rate_limited`,
  `overloaded`) with a hint: the shorter of `LIMIT_RETRY_CAP_MS` and the time until the
  earliest deadline among the runs counted, by which one of them is certain to end.
- **Connections per tenant and per client id**, across every gateway process:
  `ConnectionRegistry`. Per tenant and per client a hash holds each gateway process's
  count of open connections; each process renews one lease (a sorted set of gateway ids
  scored by when their lease ends, on the Redis clock) every `PRESENCE_REFRESH_S`. The
  admission script sums the counts of every gateway not known dead (it is passed the
  leases as last read, at most VIEW_MAX_AGE_S ago: the lease set is in a slot of its
  own), so a dead gateway's connections stop counting about `PRESENCE_TTL_S` after its
  last renewal, and the next renewal of any gateway removes them. Admission is one
  script; past a bound the socket is closed with 4029.
- **Token budgets per tenant**, per UTC day and month (streams/usage.py): checked by
  `ACCEPT_SEND` against the counters the workers add each model call's usage to. A spent
  budget refuses every `send` with `budget_exhausted` until the period resets; runs
  already accepted finish.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ClusterError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from project.conf import conf
from realtime.protocol import ProtocolError
from streams import keys, scripts
from streams.batches import Batches
from streams.buckets import NEVER, AsyncBuckets, Bucket, retry_after_ms
from streams.redis_clients import as_text
from streams.usage import DAY, Exhausted, iso
from tenants.config import TenantConfig

logger = logging.getLogger(__name__)

# The longest hint a refusal for runs in flight or queued runs gives: the server cannot
# know when a run ends, only that it ends by its deadline.
LIMIT_RETRY_CAP_MS = 1000
# The hint when a limit is 0 (the tenant allows no such thing): ask an operator.
NEVER_RETRY_MS = 60_000


def message_buckets(tenant: TenantConfig, client: str) -> list[Bucket]:
    """The buckets a client's `send` or `publish` pays one token into, together."""
    return [
        Bucket(
            keys.rate_client(tenant.slug, client), tenant.client_messages_per_s, tenant.client_burst
        ),
        Bucket(keys.rate_tenant(tenant.slug), tenant.tenant_messages_per_s, tenant.tenant_burst),
    ]


def receipt_buckets(tenant: TenantConfig, client: str) -> list[Bucket]:
    """The bucket a client's `receipt` pays into: its own, so reading many streams never
    eats into what the client may send."""
    return [
        Bucket(
            keys.rate_receipts(tenant.slug, client),
            tenant.client_receipts_per_s,
            tenant.client_receipt_burst,
        )
    ]


# The simulated backend's options that stall or fail a run (workers/backends.py): a run
# that stalls holds a worker process every tenant shares, so a tenant gets them only when
# the deployment (SWITCHBOARD_FAULT_INJECTION) or its own settings allow them.
FAULT_OPTIONS = ("fail", "latency_ms", "chunk_delay_ms")


def run_options(options: dict[str, Any], tenant: TenantConfig) -> dict[str, Any]:
    """A send's options as its run keeps them: without FAULT_OPTIONS unless allowed."""
    if tenant.fault_injection or conf().fault_injection:
        return options
    if not any(name in options for name in FAULT_OPTIONS):
        return options
    return {name: value for name, value in options.items() if name not in FAULT_OPTIONS}


def subscription_refusal(
    tenant: TenantConfig, subscribed: int, stream: str, frame_id: str | None = None
) -> ProtocolError | None:
    """The error for one subscription more than the tenant's per-connection cap, or None
    while `subscribed` (the connection's count) leaves room."""
    cap = tenant.max_subscriptions_per_connection
    if subscribed < cap:
        return None
    return ProtocolError(
        "rate_limited",
        f"this connection is subscribed to {subscribed} streams, the most the tenant allows "
        f"({cap}); unsubscribe from one first",
        frame_id,
        retry_after_ms=NEVER_RETRY_MS,
        stream=stream,
    )


def budget_refusal(spent: Exhausted, frame_id: str | None) -> ProtocolError:
    """The error for a send while the tenant's token budget for the period is spent: when
    it resets, as a wait (`retry_after_ms`) and a moment (`resets_at`, UTC)."""
    now = datetime.now(UTC)
    return ProtocolError(
        "budget_exhausted",
        f"the tenant has used its {'daily' if spent.period == DAY else 'monthly'} budget of "
        f"{spent.budget} tokens; it resets at resets_at",
        frame_id,
        retry_after_ms=spent.retry_after_ms(now),
        period=spent.period,
        resets_at=iso(spent.resets_at),
    )


def limit_retry_ms(wait_ms: int) -> int:
    """The retry hint of a refusal for runs in flight or queued (see the module doc)."""
    if wait_ms < 0:
        return NEVER_RETRY_MS
    return min(LIMIT_RETRY_CAP_MS, retry_after_ms(wait_ms))


class RateLimiter:
    """Message rates, paid for in Redis (one script round trip per message)."""

    def __init__(self, client: aredis.Redis) -> None:
        self.buckets = AsyncBuckets(client)

    async def wait_ms(self, tenant: TenantConfig, client: str, receipt: bool = False) -> int:
        """0 when the message (or receipt) may go; else the `retry_after_ms` to answer with."""
        buckets = receipt_buckets(tenant, client) if receipt else message_buckets(tenant, client)
        wait = await self.buckets.take(buckets)
        if wait == 0:
            return 0
        return NEVER_RETRY_MS if wait == NEVER else retry_after_ms(wait)


# Redis out of reach: a single Redis down, or a Redis Cluster between a master's death and
# its replica's promotion (CLUSTERDOWN, TRYAGAIN, a write that reached a master just
# demoted to replica).
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError, ReadOnlyError)
# The same, and no cluster node answering at all, which redis-py's cluster client raises as
# its general RedisClusterException (also its refusal of a command: a bug, so a frame's
# handler leaves that out and answers `internal`).
UNAVAILABLE = (*REDIS_AWAY, RedisClusterException)
REFUSALS = {1: "too many connections for the tenant", 2: "too many connections for the client"}
# Dead gateways looked at, and counts removed per pipeline, per renewal.
REAP_GATEWAYS = 10
REAP_BATCH = 1000
# An admission reads the lease set again when what it knows of it is older than this, so a
# dead gateway's counts stop counting at most this long after its lease lapsed.
VIEW_MAX_AGE_S = 1.0
# Gateway ids found with a count and no lease at all (dead and reaped), remembered so the
# admissions that meet their counts drop them.
GONE_MAX = 1000


class ConnectionRegistry:
    """A gateway process's open connections as the tenants' connection limits count them.

    Per tenant and per client id a hash holds each gateway process's count: an admission
    adds one (one script, which first sums the counts of gateways not known dead), a
    release takes it away. Liveness is per process, not per connection: the process renews
    one lease every PRESENCE_REFRESH_S (one command whatever it holds), and reads everyone's
    with it. The lease set is in a slot of its own (in a Redis Cluster, the counts are in
    their tenant's), so admissions are passed what the process last read of it, read again
    when older than VIEW_MAX_AGE_S: the counts of a process whose lease lapsed stop counting
    that long after, and are removed by the next renewal of any gateway. A lease that lapsed
    is never renewed: its process goes on under a new lease id and writes its counts again
    under it, so a reaper, which is not atomic with anything, can never remove a live count.
    An idle connection costs nothing per interval."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        config = conf()
        self.ttl_ms = max(1, round(config.presence_ttl_s * 1000))
        self.refresh_s: float = config.presence_refresh_s
        # Random per process: a restarted gateway never renews its predecessor's lease.
        self.gateway_id = secrets.token_hex(8)
        # The id its counts and lease are under: the gateway id, then a new one each time
        # its lease is found lapsed.
        self.lease_id = self.gateway_id
        self._leased = False  # the lease of lease_id was created
        self._lease_lock: asyncio.Lock | None = None
        self._view: scripts.GatewayLeases | None = None
        self._view_at = 0.0  # loop time of the read
        self._gone: dict[str, None] = {}
        self._client_factory = client_factory
        self._client: aredis.Redis | None = None
        # member -> (tenant hash, client hash) of every connection admitted here and open.
        self.members: dict[str, tuple[str, str]] = {}
        # Those connections per hash, kept with `members`: a release asks for two hashes'
        # counts, which must not cost a walk over every open connection (a reconnect storm
        # releases thousands at once).
        self._held: dict[str, int] = {}
        self._releases: Batches[scripts.ReleaseConnection, Any] = Batches(self._release_batch)
        # Counts Redis may have wrong (a release that failed): written whole next renewal.
        self._unsure: set[str] = set()
        self._changes = 0  # admissions and releases so far: a write-back racing one retries
        self._loop_task: asyncio.Task[None] | None = None
        # Admissions waiting for the next pipeline, and the task sending them.
        self._waiting: list[tuple[scripts.AdmitConnection, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    @property
    def client(self) -> aredis.Redis:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    @property
    def held_key(self) -> str:
        return keys.gateway_connection_keys(self.lease_id)

    def member(self, connection_id: str) -> str:
        return f"{self.gateway_id} {connection_id}"

    def run_slot(self, connection_id: str) -> str:
        """The connection's name in its runs-in-flight key: unique across gateways."""
        return f"{self.gateway_id}.{connection_id}"

    async def admit(self, tenant: TenantConfig, client: str, connection_id: str) -> str | None:
        """Count the connection, or return why it may not open (the 4029 reason).

        Redis unreachable: admitted without being counted (logged), like a connection
        that needs no Redis until its first frame."""
        member = self.member(connection_id)
        counts = (
            keys.connections_tenant(tenant.slug),
            keys.connections_client(tenant.slug, client),
        )
        try:
            view = await self._current_view()
            lease_id = self.lease_id
            admission = scripts.AdmitConnection(
                tenant_counts=counts[0],
                client_counts=counts[1],
                gateway=lease_id,
                tenant_max=tenant.max_connections,
                client_max=tenant.max_connections_per_client,
                live_count=len(view.live),
                known=[*view.live, *view.dead, *self._gone],
            )
            refused, unknown = await self._admit_pipelined(admission)
        except UNAVAILABLE:
            logger.warning(
                "connection admitted without counting (Redis unreachable) tenant=%s client=%s",
                tenant.slug,
                client,
                exc_info=True,
            )
            return None
        if unknown:
            await self._identify(unknown)
        if refused:
            return REFUSALS[refused]
        if member not in self.members:
            for key in counts:
                self._held[key] = self._held.get(key, 0) + 1
        self.members[member] = counts
        self._changes += 1
        if lease_id != self.lease_id:
            # Counted under a lease id that died meanwhile: the next renewal writes it again.
            self._unsure.update(counts)
        self._ensure_running()
        return None

    async def _current_view(self) -> scripts.GatewayLeases:
        """What this process knows of the lease set, read again (with a renewal, creating
        the lease on first use) when older than VIEW_MAX_AGE_S."""
        loop = asyncio.get_running_loop()
        view = self._view
        if view is not None and loop.time() - self._view_at < VIEW_MAX_AGE_S:
            return view
        if self._lease_lock is None:
            self._lease_lock = asyncio.Lock()
        async with self._lease_lock:
            if self._view is None or loop.time() - self._view_at >= VIEW_MAX_AGE_S:
                await self._renew()
            assert self._view is not None
            return self._view

    async def _renew(self) -> scripts.GatewayLeases:
        """Renew (or create) the lease and read everyone's. A lease found lapsed means its
        counts may be reaped by now: the process takes a new lease id, created at once, and
        every count it holds is written again under it at the next write-back."""
        started = asyncio.get_running_loop().time()
        view = await self._renew_once()
        if view.lost:
            old = self.lease_id
            self.lease_id = secrets.token_hex(8)
            self._leased = False
            logger.warning(
                "gateway lease had lapsed; counting under a new lease id old=%s new=%s",
                old,
                self.lease_id,
            )
            self._unsure.update(self.local_counts())
            view = await self._renew_once()
        self._view, self._view_at = view, started
        return view

    async def _renew_once(self) -> scripts.GatewayLeases:
        create = not self._leased
        view = await scripts.RenewGatewayLease(
            leases=keys.GATEWAY_LEASES,
            gateway=self.lease_id,
            lease_ms=self.ttl_ms,
            create=int(create),
            dead_max=REAP_GATEWAYS,
        ).run_async(self.client)
        if create:
            self._leased = True
        return view

    async def _identify(self, unknown: list[str]) -> None:
        """Ids an admission met with neither a live nor a dead lease in our last read: read
        the leases again; one with no lease at all is dead (every gateway creates its lease
        before its first count) and is dropped by later admissions."""
        if self._lease_lock is None:
            self._lease_lock = asyncio.Lock()
        try:
            async with self._lease_lock:
                # Many admissions of a burst meet the same newcomer: one read serves them.
                view = self._view
                if view is None or not self._knows(view, unknown):
                    view = await self._renew()
        except UNAVAILABLE:
            return
        known = set(view.live) | set(view.dead) | {self.lease_id}
        for gateway in unknown:
            if gateway not in known:
                self._gone[gateway] = None
        while len(self._gone) > GONE_MAX:
            del self._gone[next(iter(self._gone))]

    def _knows(self, view: scripts.GatewayLeases, ids: list[str]) -> bool:
        return all(
            gateway in view.live or gateway in view.dead or gateway in self._gone for gateway in ids
        )

    def _admit_pipelined(self, admission: scripts.AdmitConnection) -> asyncio.Future[Any]:
        """One ADMIT script call, sent with whatever other admissions are waiting: during a
        handshake storm each connect still costs one script, but the round trips (and
        their client CPU) are shared. One pipeline is in flight at a time; the next one
        takes every admission that arrived meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((admission, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_admissions())
        return future

    async def _send_admissions(self) -> None:
        client = self.client
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                # Each hash is listed in its gateway's held set before it can hold a count,
                # for reapers to find it (a listed hash without a count costs nothing).
                held: dict[str, set[str]] = {}
                for admission, _ in batch:
                    listed = held.setdefault(keys.gateway_connection_keys(admission.gateway), set())
                    listed.update((admission.tenant_counts, admission.client_counts))
                async with client.pipeline(transaction=False) as pipe:
                    for held_key, listed in held.items():
                        pipe.sadd(held_key, *sorted(listed))
                    await pipe.execute()
                calls = [admission for admission, _ in batch]
                results: list[Any] = await scripts.run_pipelined_async(client, calls)
            except Exception as error:
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def release(self, connection_id: str) -> None:
        """The connection closed: it no longer counts (at once, on every gateway)."""
        member = self.member(connection_id)
        counts = self.members.pop(member, None)
        if counts is None:
            return
        for key in counts:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
        self._changes += 1
        release = scripts.ReleaseConnection(
            tenant_counts=counts[0], client_counts=counts[1], gateway=self.lease_id
        )
        try:
            await self._releases.submit(release)
        except Exception:
            # Our counts in Redis may be one too high now: the next renewal writes them.
            self._unsure.update(counts)
            raise

    async def _release_batch(
        self, releases: list[scripts.ReleaseConnection]
    ) -> list[Any | BaseException]:
        """Releases made at the same moment, in one pipeline; then the hashes this process
        no longer counts in leave its held set (read after the releases: a connection
        admitted meanwhile keeps its hash listed)."""
        if len(releases) == 1:  # alone: a pipeline would only add client CPU
            results: list[Any | BaseException] = [await releases[0].run_async(self.client)]
        else:
            results = await scripts.run_pipelined_async(self.client, releases)
        released = {
            key
            for release, result in zip(releases, results, strict=True)
            if not isinstance(result, BaseException)
            for key in (release.tenant_counts, release.client_counts)
        }
        unheld = sorted(key for key, count in self.local_counts(released).items() if not count)
        if unheld:
            try:
                await self.client.srem(self.held_key, *unheld)
            except UNAVAILABLE:
                # Best effort: a hash left listed costs a reaper one HDEL of nothing.
                logger.debug("held set not trimmed of %s hashes", len(unheld), exc_info=True)
        return results

    def local_counts(self, wanted: set[str] | None = None) -> dict[str, int]:
        """This process's count per hash (of those `wanted`; every one by default)."""
        if wanted is None:
            return dict(self._held)
        return {key: self._held.get(key, 0) for key in wanted}

    async def refresh(self) -> None:
        """Renew this process's lease (one command), remove dead gateways' counts, and
        write back any of our counts Redis may have wrong. Costs nothing per connection
        unless the lease had lapsed."""
        if self._lease_lock is None:
            self._lease_lock = asyncio.Lock()
        async with self._lease_lock:
            view = await self._renew()
        if self._unsure:
            unsure, self._unsure = self._unsure, set()
            changes = self._changes
            try:
                await self._write_counts(self.local_counts(unsure))
            except Exception:
                self._unsure |= unsure
                raise
            if self._changes != changes:
                # An admission or release ran meanwhile and the write may have undone it.
                self._unsure |= unsure
        for gateway in view.dead:
            left = await self._reap(gateway)
            logger.info(
                "dead gateway's connection counts removed gateway=%s left=%s", gateway, left
            )

    async def _reap(self, gateway: str) -> int:
        """Remove a slice of a dead gateway's counts (its lease lapsed, and a lapsed lease
        is never renewed, so none of them counts any more); its lease goes with the last.
        Returns how many hashes are left to visit."""
        held_key = keys.gateway_connection_keys(gateway)
        listed = await self.client.spop(held_key, REAP_BATCH)
        if listed:
            async with self.client.pipeline(transaction=False) as pipe:
                for counts in listed:
                    pipe.hdel(as_text(counts), gateway)
                await pipe.execute()
        left = int(await self.client.scard(held_key))
        if left == 0:
            await self.client.zrem(keys.GATEWAY_LEASES, gateway)
        return left

    async def _write_counts(self, counts: dict[str, int]) -> None:
        items = list(counts.items())
        for start in range(0, len(items), REAP_BATCH):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, count in items[start : start + REAP_BATCH]:
                    if count:
                        pipe.sadd(self.held_key, key)
                        pipe.hset(key, self.lease_id, count)
                    else:
                        pipe.hdel(key, self.lease_id)
                        pipe.srem(self.held_key, key)
                await pipe.execute()

    async def retire(self) -> bool:
        """Remove a drained process's lease, so that it stops counting as a live gateway
        at once rather than when the lease lapses (PRESENCE_TTL_S later): the others' view
        of who is alive, and an operator's check that the deployment is still
        (`copy_data_plane`), see it gone. Only when it counts no connection any more:
        counts still held (a drain that timed out) keep their lease and are reaped once it
        lapses, as after a crash. Returns whether the lease was removed."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        if self._held or not self._leased:
            return False
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.GATEWAY_LEASES, self.lease_id)
            pipe.delete(self.held_key)
            await pipe.execute()
        self._leased = False
        logger.info("gateway lease removed at shutdown gateway=%s", self.lease_id)
        return True

    def _ensure_running(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.warning("gateway lease renewal failed; trying again", exc_info=True)


_registry: ConnectionRegistry | None = None
_rates: RateLimiter | None = None


def connection_registry() -> ConnectionRegistry:
    global _registry
    if _registry is None:
        from streams.redis_clients import async_client

        _registry = ConnectionRegistry(async_client)
    return _registry


async def retire_connection_registry() -> None:
    """This process's lease removed at shutdown, if it ever counted a connection."""
    if _registry is not None:
        await _registry.retire()


def rate_limiter() -> RateLimiter:
    global _rates
    if _rates is None:
        from streams.redis_clients import async_client

        _rates = RateLimiter(async_client())
    return _rates
