"""Flow control at the gateway: every bound is answered at once, nothing waits in a queue.

- **Message rates.** Each `send` and `publish` draws one token from its client's bucket and
  its tenant's bucket together (`realtime/buckets.py`, all or nothing); short, it is
  refused with `rate_limited` and the buckets' honest wait. A `receipt` (a Redis write
  too) pays into a bucket of its own per client (`client_receipts_per_s`,
  `client_receipt_burst`). The rate check comes before
  the message's dedupe lookup: a repeated id also costs a token, and a rate-limited repeat
  gets its duplicate `ack` once it is tried again after `retry_after_ms`.
- **Runs in flight per connection, queued runs per tenant.** Counted in Redis by
  `ACCEPT_SEND` (check and count in the same script that accepts) and uncounted by
  `CLAIM_STEP` (a run's first claim) and `FINALIZE_RUN` (its reply.done): see
  `realtime/scripts.py`. Past either bound a `send` is refused (`rate_limited`,
  `overloaded`) with a hint: the shorter of `LIMIT_RETRY_CAP_MS` and the time until the
  earliest deadline among the runs counted, by which one of them is certain to end.
- **Connections per tenant and per client id**, across every gateway process:
  `ConnectionRegistry`. Per tenant and per client a sorted set holds one member per open
  connection, scored by when it expires on the Redis clock; the gateway renews its own
  members every `PRESENCE_REFRESH_S`, the admission script prunes expired ones before it
  counts, so a dead gateway's connections stop counting `PRESENCE_TTL_S` after its last
  renewal. Admission is one script; past a bound the socket is closed with 4029.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from realtime import keys
from realtime.buckets import NEVER, AsyncBuckets, Bucket, retry_after_ms
from realtime.protocol import ProtocolError
from realtime.tenants import TenantConfig

logger = logging.getLogger(__name__)

# The longest hint a refusal for runs in flight or queued runs gives: the server cannot
# know when a run ends, only that it ends by its deadline.
LIMIT_RETRY_CAP_MS = 1000
# The hint when a limit is 0 (the tenant allows no such thing): ask an operator.
NEVER_RETRY_MS = 60_000
# Members renewed per script call, and script calls per pipeline round trip.
REFRESH_BATCH = 500
PIPELINE_CHUNK = 100


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
    if tenant.fault_injection or settings.SWITCHBOARD["FAULT_INJECTION"]:
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


# KEYS: the tenant's set, the client's set. ARGV: member, ttl_ms, max_tenant, max_client.
# Returns 0 admitted (the member is in both sets), 1 the tenant is full, 2 the client is.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then return i end
end
local expiry = string.format('%d', now + tonumber(ARGV[2]))
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
end
return 0
"""

# KEYS: one set. ARGV: ttl_ms, members... Extends the members still in the set and never
# adds one: a renewal racing a release (or an expiry) must not bring a member back.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = string.format('%d', now + tonumber(ARGV[1]))
local args = {'XX'}
for i = 2, #ARGV do
  args[#args + 1] = expiry
  args[#args + 1] = ARGV[i]
end
if #args > 1 then redis.call('ZADD', KEYS[1], unpack(args)) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the tenant's set, the client's set. ARGV: member. One round trip, no pipeline.
RELEASE = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 1
"""

REFUSALS = {1: "too many connections for the tenant", 2: "too many connections for the client"}


class ConnectionRegistry:
    """A gateway process's open connections as the tenants' connection limits count them."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        config = settings.SWITCHBOARD
        self.ttl_ms = max(1, round(config["PRESENCE_TTL_S"] * 1000))
        self.refresh_s: float = config["PRESENCE_REFRESH_S"]
        # Random per process: a restarted gateway never renews its predecessor's members.
        self.gateway_id = secrets.token_hex(8)
        self._client_factory = client_factory
        self._client: aredis.Redis | None = None
        self._admit: Any = None
        self._refresh: Any = None
        self._release: Any = None
        # member -> (tenant set, client set) of every connection admitted here and open.
        self.members: dict[str, tuple[str, str]] = {}
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

    def _scripts(self) -> tuple[Any, Any]:
        if self._client is None:
            self._client = self._client_factory()
            self._admit = self._client.register_script(ADMIT)
            self._refresh = self._client.register_script(REFRESH)
            self._release = self._client.register_script(RELEASE)
        return self._admit, self._refresh

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
        sets = (keys.connections_tenant(tenant.slug), keys.connections_client(tenant.slug, client))
        args = [member, self.ttl_ms, tenant.max_connections, tenant.max_connections_per_client]
        try:
            refused = int(await self._admit_pipelined(list(sets), args))
        except (RedisConnectionError, RedisTimeoutError):
            logger.warning(
                "connection admitted without counting (Redis unreachable) tenant=%s client=%s",
                tenant.slug,
                client,
                exc_info=True,
            )
            return None
        if refused:
            return REFUSALS[refused]
        self.members[member] = sets
        self._ensure_running()
        return None

    def _admit_pipelined(self, sets: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """One ADMIT script call, sent with whatever other admissions are waiting: during a
        handshake storm each connect still costs one script, but the round trips (and
        their client CPU) are shared. One pipeline is in flight at a time; the next one
        takes every admission that arrived meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((sets, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_admissions())
        return future

    async def _send_admissions(self) -> None:
        admit = self._scripts()[0]
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                if len(batch) == 1:  # alone: a pipeline would only add client CPU
                    sets, args, _ = batch[0]
                    results = [await admit(keys=sets, args=args)]
                else:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for sets, args, _ in batch:
                            await admit(keys=sets, args=args, client=pipe)
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
        sets = self.members.pop(member, None)
        if sets is None:
            return
        self._scripts()
        await self._release(keys=list(sets), args=[member])

    async def refresh(self) -> None:
        """Extend every member of this process (pipelined, a batch per script call)."""
        by_set: dict[str, list[str]] = {}
        for member, sets in list(self.members.items()):
            for key in sets:
                by_set.setdefault(key, []).append(member)
        calls = [
            (key, members[start : start + REFRESH_BATCH])
            for key, members in by_set.items()
            for start in range(0, len(members), REFRESH_BATCH)
        ]
        refresh = self._scripts()[1]
        for start in range(0, len(calls), PIPELINE_CHUNK):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, members in calls[start : start + PIPELINE_CHUNK]:
                    await refresh(keys=[key], args=[self.ttl_ms, *members], client=pipe)
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
                logger.warning("connection count refresh failed; trying again", exc_info=True)


_registry: ConnectionRegistry | None = None
_rates: RateLimiter | None = None


def connection_registry() -> ConnectionRegistry:
    global _registry
    if _registry is None:
        from realtime.redis_clients import async_client

        _registry = ConnectionRegistry(async_client)
    return _registry


def rate_limiter() -> RateLimiter:
    global _rates
    if _rates is None:
        from realtime.redis_clients import async_client

        _rates = RateLimiter(async_client())
    return _rates
