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
  `streams/scripts.py`. Past either bound a `send` is refused (`rate_limited`,
  `overloaded`) with a hint: the shorter of `LIMIT_RETRY_CAP_MS` and the time until the
  earliest deadline among the runs counted, by which one of them is certain to end.
- **Connections per tenant and per client id**, across every gateway process:
  `ConnectionRegistry`. Per tenant and per client a hash holds each gateway process's
  count of open connections; each process renews one lease (a sorted set of gateway ids
  scored by when their lease ends, on the Redis clock) every `PRESENCE_REFRESH_S`. The
  admission script sums the counts of gateways whose lease is current, so a dead
  gateway's connections stop counting `PRESENCE_TTL_S` after its last renewal, and the
  next renewal of any gateway removes them. Admission is one script; past a bound the
  socket is closed with 4029.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from project.conf import conf
from realtime.protocol import ProtocolError
from streams import keys
from streams.buckets import NEVER, AsyncBuckets, Bucket, retry_after_ms
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


# Redis's clock, in ms, for every script here (gateway clocks never matter).
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the tenant's hash, the client's hash, the leases, this gateway's held keys.
# ARGV: gateway id, lease ms, max for the tenant, max for the client.
# Returns {refused, lease_created}: refused is 0 (admitted and counted), 1 (the tenant is
# full) or 2 (the client is); lease_created 1 when this gateway had no lease (its first
# admission, or its lease lapsed and was reaped: the registry then writes its counts back).
ADMIT = (
    _NOW_MS
    + """
local tenant_counts, client_counts, leases, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gateway, lease_ms = ARGV[1], tonumber(ARGV[2])
local maxima = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local created = 0
if not redis.call('ZSCORE', leases, gateway) then
  redis.call('ZADD', leases, string.format('%d', now + lease_ms), gateway)
  created = 1
end
for i, counts in ipairs({tenant_counts, client_counts}) do
  local fields = redis.call('HGETALL', counts)
  local total = 0
  for j = 1, #fields, 2 do
    local expiry = redis.call('ZSCORE', leases, fields[j])
    if expiry and tonumber(expiry) > now then
      total = total + tonumber(fields[j + 1])
    else
      -- A dead gateway's connections stop counting as soon as its lease has lapsed.
      redis.call('HDEL', counts, fields[j])
    end
  end
  if total >= maxima[i] then return {i, created} end
end
for _, counts in ipairs({tenant_counts, client_counts}) do
  if redis.call('HINCRBY', counts, gateway, 1) == 1 then redis.call('SADD', held, counts) end
end
return {0, created}
"""
)

# KEYS: the tenant's hash, the client's hash, this gateway's held keys. ARGV: gateway id.
RELEASE = """
local tenant_counts, client_counts, held = KEYS[1], KEYS[2], KEYS[3]
local gateway = ARGV[1]
for _, counts in ipairs({tenant_counts, client_counts}) do
  if redis.call('HINCRBY', counts, gateway, -1) <= 0 then
    redis.call('HDEL', counts, gateway)
    redis.call('SREM', held, counts)
  end
end
return 1
"""

# KEYS: the leases. ARGV: gateway id, lease ms, how many dead gateways to return.
# Returns {lost, dead gateway ids...}: lost is 1 when this gateway's lease had lapsed (its
# counts may have been reaped: it writes them back).
RENEW = (
    _NOW_MS
    + """
local leases = KEYS[1]
local gateway, lease_ms, dead_max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local expiry = redis.call('ZSCORE', leases, gateway)
local lost = 0
if not expiry or tonumber(expiry) <= now then lost = 1 end
redis.call('ZADD', leases, string.format('%d', now + lease_ms), gateway)
local result = {lost}
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', string.format('(%d', now),
  'LIMIT', 0, dead_max)
for _, id in ipairs(dead) do result[#result + 1] = id end
return result
"""
)

# KEYS: the leases, the dead gateway's held keys. ARGV: its id, how many counts to remove.
# Removes a dead gateway's counts a slice at a time, then its lease; nothing if it is
# alive again. Returns how many counts are left to remove.
REAP = (
    _NOW_MS
    + """
local leases, held = KEYS[1], KEYS[2]
local gateway, limit = ARGV[1], tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', leases, gateway)
if expiry and tonumber(expiry) > now then return 0 end
for _, counts in ipairs(redis.call('SPOP', held, limit)) do
  redis.call('HDEL', counts, gateway)
end
local left = redis.call('SCARD', held)
if left == 0 then redis.call('ZREM', leases, gateway) end
return left
"""
)

REFUSALS = {1: "too many connections for the tenant", 2: "too many connections for the client"}
# Dead gateways looked at, and counts removed per script call, per renewal.
REAP_GATEWAYS = 10
REAP_BATCH = 1000


class ConnectionRegistry:
    """A gateway process's open connections as the tenants' connection limits count them.

    Per tenant and per client id a hash holds each gateway process's count: an admission
    adds one (one script, which first sums the counts of gateways whose lease is current),
    a release takes it away. Liveness is per process, not per connection: the process
    renews one lease every PRESENCE_REFRESH_S (one command whatever it holds), and the
    counts of a process whose lease lapsed stop counting at once and are removed by the
    next renewal of any gateway. An idle connection costs nothing per interval."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        config = conf()
        self.ttl_ms = max(1, round(config.presence_ttl_s * 1000))
        self.refresh_s: float = config.presence_refresh_s
        # Random per process: a restarted gateway never renews its predecessor's lease.
        self.gateway_id = secrets.token_hex(8)
        self._client_factory = client_factory
        self._client: aredis.Redis | None = None
        self._admit: Any = None
        self._renew: Any = None
        self._reap: Any = None
        self._release: Any = None
        # member -> (tenant hash, client hash) of every connection admitted here and open.
        self.members: dict[str, tuple[str, str]] = {}
        # Counts Redis may have wrong (a release that failed): written whole next renewal.
        self._unsure: set[str] = set()
        self._changes = 0  # admissions and releases so far: a write-back racing one retries
        self._loop_task: asyncio.Task[None] | None = None
        # Admissions waiting for the next pipeline, and the task sending them.
        self._waiting: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    @property
    def client(self) -> aredis.Redis:
        if self._client is None:
            self._scripts()
        assert self._client is not None
        return self._client

    @property
    def held_key(self) -> str:
        return keys.gateway_connection_keys(self.gateway_id)

    def _scripts(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
            self._admit = self._client.register_script(ADMIT)
            self._renew = self._client.register_script(RENEW)
            self._reap = self._client.register_script(REAP)
            self._release = self._client.register_script(RELEASE)
        return self._admit

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
        args = [
            self.gateway_id,
            self.ttl_ms,
            tenant.max_connections,
            tenant.max_connections_per_client,
        ]
        try:
            refused, created = await self._admit_pipelined(
                [*counts, keys.GATEWAY_LEASES, self.held_key], args
            )
        except (RedisConnectionError, RedisTimeoutError):
            logger.warning(
                "connection admitted without counting (Redis unreachable) tenant=%s client=%s",
                tenant.slug,
                client,
                exc_info=True,
            )
            return None
        if int(created) and self.members:
            # Our lease was gone: whatever we counted before may have been reaped.
            self._unsure.update(key for pair in self.members.values() for key in pair)
        if int(refused):
            return REFUSALS[int(refused)]
        self.members[member] = counts
        self._changes += 1
        self._ensure_running()
        return None

    def _admit_pipelined(self, script_keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """One ADMIT script call, sent with whatever other admissions are waiting: during a
        handshake storm each connect still costs one script, but the round trips (and
        their client CPU) are shared. One pipeline is in flight at a time; the next one
        takes every admission that arrived meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((script_keys, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_admissions())
        return future

    async def _send_admissions(self) -> None:
        admit = self._scripts()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                if len(batch) == 1:  # alone: a pipeline would only add client CPU
                    script_keys, args, _ = batch[0]
                    results = [await admit(keys=script_keys, args=args)]
                else:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for script_keys, args, _ in batch:
                            await admit(keys=script_keys, args=args, client=pipe)
                        results = await pipe.execute(raise_on_error=False)
            except Exception as error:
                results = [error] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
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
        self._changes += 1
        self._scripts()
        try:
            await self._release(keys=[*counts, self.held_key], args=[self.gateway_id])
        except Exception:
            # Our counts in Redis may be one too high now: the next renewal writes them.
            self._unsure.update(counts)
            raise

    def local_counts(self, wanted: set[str] | None = None) -> dict[str, int]:
        """This process's count per hash (of those `wanted`; every one by default)."""
        counts: dict[str, int] = dict.fromkeys(wanted or (), 0)
        for pair in self.members.values():
            for key in pair:
                if wanted is None or key in wanted:
                    counts[key] = counts.get(key, 0) + 1
        return counts

    async def refresh(self) -> None:
        """Renew this process's lease (one command), remove dead gateways' counts, and
        write back any of our counts Redis may have wrong. Costs nothing per connection
        unless the lease had lapsed."""
        self._scripts()
        lost, *dead = await self._renew(
            keys=[keys.GATEWAY_LEASES], args=[self.gateway_id, self.ttl_ms, REAP_GATEWAYS]
        )
        if int(lost):
            logger.warning("gateway lease had lapsed; writing its connection counts back")
            self._unsure.update(self.local_counts())
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
        for gateway in dead:
            gateway = gateway.decode() if isinstance(gateway, bytes) else gateway
            held = keys.gateway_connection_keys(gateway)
            left = await self._reap(keys=[keys.GATEWAY_LEASES, held], args=[gateway, REAP_BATCH])
            logger.info(
                "dead gateway's connection counts removed gateway=%s left=%s", gateway, left
            )

    async def _write_counts(self, counts: dict[str, int]) -> None:
        items = list(counts.items())
        for start in range(0, len(items), REAP_BATCH):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, count in items[start : start + REAP_BATCH]:
                    if count:
                        pipe.hset(key, self.gateway_id, count)
                        pipe.sadd(self.held_key, key)
                    else:
                        pipe.hdel(key, self.gateway_id)
                        pipe.srem(self.held_key, key)
                await pipe.execute()

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


def rate_limiter() -> RateLimiter:
    global _rates
    if _rates is None:
        from streams.redis_clients import async_client

        _rates = RateLimiter(async_client())
    return _rates
