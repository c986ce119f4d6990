"""Flow control in Redis (realtime/admission.py, ACCEPT_SEND/CLAIM_STEP/FINALIZE_RUN): runs in
flight per connection and queued runs per tenant counted exactly under concurrency and
uncounted once; a refused send leaves no trace; connection counts across gateway processes
that stop counting with a dead gateway's lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis

import agents
from agents import Agent
from realtime.admission import ConnectionRegistry
from realtime.protocol import Send
from streams import keys, log
from streams.enqueue import RUNS_QUEUE
from streams.log import Appended, LimitReached, RunLimits, StreamStore
from streams.runs import RunStore
from tenants.config import TenantConfig
from tests.integration.support import wait_until

pytestmark = pytest.mark.asyncio

TENANT = "acme"
CLIENT = "alice"


@pytest_asyncio.fixture
async def client(r: redis.Redis, store_redis_url: str) -> AsyncIterator[aredis.Redis]:
    connection = aredis.Redis.from_url(store_redis_url)
    yield connection
    await connection.aclose()


@pytest_asyncio.fixture
async def store(client: aredis.Redis) -> StreamStore:
    return StreamStore(client)


def tenant_config(**limits: int) -> TenantConfig:
    values = {
        "max_frame_bytes": 65536,
        "stream_retention": 1000,
        "max_connections": 100,
        "max_connections_per_client": 100,
        "max_runs_in_flight_per_connection": 8,
        "max_queued_runs": 100,
        "client_messages_per_s": 20,
        "client_burst": 40,
        "tenant_messages_per_s": 2000,
        "tenant_burst": 4000,
    }
    values.update(limits)
    return TenantConfig(slug=TENANT, signing_secret="s", enabled=True, **values)  # type: ignore[arg-type]


async def send(
    store: StreamStore,
    message_id: str,
    limits: RunLimits | None,
    *,
    stream: str = "room",
    agent: Agent | None = None,
    client: str = CLIENT,
) -> Appended:
    frame = Send(message_id, stream, (agent or agents.get_agent("echo")).name, "hi", {}, None)
    return await store.accept_send(
        TENANT, client, frame, agent or agents.get_agent("echo"), None, limits
    )


async def outcomes(sends: list) -> tuple[list[Appended], list[LimitReached]]:  # type: ignore[type-arg]
    results = await asyncio.gather(*sends, return_exceptions=True)
    accepted = [result for result in results if isinstance(result, Appended)]
    refused = [result for result in results if isinstance(result, LimitReached)]
    assert len(accepted) + len(refused) == len(results), results
    return accepted, refused


def in_flight(r: redis.Redis, connection: str) -> set[str]:
    return {run.decode() for run in r.zrange(keys.runs_in_flight(TENANT, connection), 0, -1)}


def queued(r: redis.Redis) -> set[str]:
    return {run.decode() for run in r.zrange(keys.runs_queued(TENANT), 0, -1)}


def assert_no_trace_beyond(r: redis.Redis, accepted: list[Appended], stream: str = "room") -> None:
    """Only the accepted sends left anything: events, runs, deadlines, tasks, dedupe keys."""
    assert int(r.get(keys.stream_seq(TENANT, stream)) or 0) == len(accepted)
    assert r.xlen(keys.stream_log(TENANT, stream)) == len(accepted)
    runs = {
        key.decode()
        for key in r.scan_iter(match=keys.run_prefix(TENANT) + "*")
        if b":text" not in key
    }
    assert runs == {keys.run(appended.run_id or "r" + "0" * 32 + ".x") for appended in accepted}
    assert r.zcard(keys.run_deadlines(TENANT)) == len(accepted)
    assert r.llen(keys.celery_queue(RUNS_QUEUE)) == len(accepted)
    assert len(list(r.scan_iter(match=keys.client_message(TENANT, CLIENT, "*")))) == len(accepted)


async def test_runs_in_flight_per_connection_are_exact_under_concurrency(
    store: StreamStore, r: redis.Redis
) -> None:
    limits = RunLimits("gw.conn-1", max_in_flight=5, max_queued=-1)
    accepted, refused = await outcomes([send(store, f"m-{i}", limits) for i in range(40)])
    assert len(accepted) == 5
    assert {reached.code for reached in refused} == {"rate_limited"}
    # The hint: until the earliest counted run's deadline (the echo agent's), never more.
    deadline_ms = agents.get_agent("echo").deadline_s * 1000
    assert all(0 < reached.wait_ms <= deadline_ms for reached in refused)
    assert in_flight(r, "gw.conn-1") == {appended.run_id for appended in accepted}
    assert_no_trace_beyond(r, accepted)
    # Another connection of the same client has its own count.
    await send(store, "other", RunLimits("gw.conn-2", 5, -1))


async def test_a_repeat_gets_its_duplicate_ack_even_when_the_connection_is_full(
    store: StreamStore, r: redis.Redis
) -> None:
    limits = RunLimits("gw.conn", max_in_flight=1, max_queued=-1)
    first = await send(store, "m-1", limits)
    with pytest.raises(LimitReached):
        await send(store, "m-2", limits)
    again = await send(store, "m-1", limits)
    assert (again.seq, again.event_id, again.duplicate) == (first.seq, first.event_id, True)
    assert in_flight(r, "gw.conn") == {first.run_id}


async def test_a_reply_done_uncounts_a_run_once(store: StreamStore, r: redis.Redis) -> None:
    limits = RunLimits("gw.conn", max_in_flight=2, max_queued=10)
    one = await send(store, "m-1", limits)
    two = await send(store, "m-2", limits)
    with pytest.raises(LimitReached):
        await send(store, "m-3", limits)
    runs = RunStore(r)
    assert runs.finalize(one.run_id or "", "cancelled") is True
    assert runs.finalize(one.run_id or "", "cancelled") is False  # already done: no change
    assert in_flight(r, "gw.conn") == {two.run_id}
    assert queued(r) == {two.run_id}
    three = await send(store, "m-3", limits)
    assert in_flight(r, "gw.conn") == {two.run_id, three.run_id}
    with pytest.raises(LimitReached):
        await send(store, "m-4", limits)


async def test_queued_runs_per_tenant_are_exact_and_leave_at_the_first_claim(
    store: StreamStore, r: redis.Redis
) -> None:
    def limits(i: int) -> RunLimits:
        return RunLimits(f"gw.conn-{i}", max_in_flight=10, max_queued=7)

    accepted, refused = await outcomes([send(store, f"m-{i}", limits(i)) for i in range(40)])
    assert len(accepted) == 7
    assert {reached.code for reached in refused} == {"overloaded"}
    assert queued(r) == {appended.run_id for appended in accepted}
    assert_no_trace_beyond(r, accepted)

    runs = RunStore(r)
    first, second, third = (appended.run_id or "" for appended in accepted[:3])
    claimed = runs.claim(first, 0)
    assert claimed is not None
    assert queued(r) == {appended.run_id for appended in accepted} - {first}
    # Waiting again (a retry, a redelivery, the next step) does not count it again, and
    # neither does a second claim.
    assert runs.hand_over(first, claimed.owner)
    assert runs.claim(first, 1) is not None
    assert runs.claim(first, 1) is not None
    assert first not in queued(r) and len(queued(r)) == 6
    # Finishing a claimed run changes nothing here; finishing one never claimed uncounts it.
    assert runs.finalize(first, "ok")
    assert runs.finalize(second, "failed", {"reason": "deadline"})
    assert queued(r) == {appended.run_id for appended in accepted} - {first, second}
    assert third in queued(r)
    # Each run left the queue count once: exactly two more fit.
    more, refused = await outcomes([send(store, f"n-{i}", limits(100 + i)) for i in range(10)])
    assert (len(more), len(refused)) == (2, 8)
    # ... and the finished runs no longer count as in flight on their connections.
    assert in_flight(r, "gw.conn-0") | in_flight(r, "gw.conn-1") <= {
        appended.run_id for appended in accepted
    } - {first, second}


async def test_a_zero_bound_refuses_every_send(store: StreamStore, r: redis.Redis) -> None:
    with pytest.raises(LimitReached) as reached:
        await send(store, "m-1", RunLimits("gw.conn", max_in_flight=0, max_queued=10))
    assert (reached.value.code, reached.value.wait_ms) == ("rate_limited", -1)
    with pytest.raises(LimitReached) as reached:
        await send(store, "m-1", RunLimits("gw.conn", max_in_flight=10, max_queued=0))
    assert (reached.value.code, reached.value.wait_ms) == ("overloaded", -1)
    assert_no_trace_beyond(r, [])


async def test_counts_expire_with_their_runs(
    store: StreamStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose record was lost (never finished) stops counting after its deadline plus
    the grace, and the count's key does not outlive its last run."""
    monkeypatch.setattr(log, "COUNTED_GRACE_S", 0)
    brief = register_agent("brief", deadline_s=0.3)
    limits = RunLimits("gw.conn", max_in_flight=1, max_queued=1)
    lost = await send(store, "m-1", limits, agent=brief)
    assert 0 < r.ttl(keys.runs_in_flight(TENANT, "gw.conn")) <= 1
    assert 0 < r.ttl(keys.runs_queued(TENANT)) <= 1
    r.delete(keys.run(lost.run_id or ""))

    async def accepted() -> Appended | None:
        try:
            return await send(store, "m-2", limits, agent=brief)
        except LimitReached:
            return None

    await wait_until(accepted, 5, "the lost run to stop counting")


# --- connections -------------------------------------------------------------------------


def registry(client: aredis.Redis, ttl_s: float = 30) -> ConnectionRegistry:
    gateway = ConnectionRegistry(lambda: client)
    gateway.ttl_ms = round(ttl_s * 1000)
    return gateway


def counted(r: redis.Redis, key: str) -> dict[str, int]:
    """A connection-count hash: gateway id -> its count."""
    return {gateway.decode(): int(count) for gateway, count in r.hgetall(key).items()}


async def test_connections_are_counted_exactly_across_gateways(
    client: aredis.Redis, r: redis.Redis
) -> None:
    tenant = tenant_config(max_connections=10, max_connections_per_client=100)
    gateways = [registry(client) for _ in range(3)]
    results = await asyncio.gather(
        *(gateways[i % 3].admit(tenant, f"client-{i}", f"conn-{i}") for i in range(50))
    )
    assert results.count(None) == 10
    assert set(results) == {None, "too many connections for the tenant"}
    assert sum(counted(r, keys.connections_tenant(TENANT)).values()) == 10

    per_client = tenant_config(max_connections=100, max_connections_per_client=3)
    results = await asyncio.gather(
        *(gateways[i % 3].admit(per_client, "bob", f"bob-{i}") for i in range(20))
    )
    assert results.count(None) == 3
    assert set(results) == {None, "too many connections for the client"}
    assert sum(counted(r, keys.connections_client(TENANT, "bob")).values()) == 3
    assert sum(counted(r, keys.connections_tenant(TENANT)).values()) == 13


async def test_a_released_connection_frees_its_place_at_once(
    client: aredis.Redis, r: redis.Redis
) -> None:
    tenant = tenant_config(max_connections=2, max_connections_per_client=2)
    gateway = registry(client)
    assert await gateway.admit(tenant, "alice", "a1") is None
    assert await gateway.admit(tenant, "bob", "b1") is None
    assert await gateway.admit(tenant, "carol", "c1") == "too many connections for the tenant"
    await gateway.release("a1")
    await gateway.release("a1")  # twice: no effect
    await gateway.release("never-admitted")
    assert await gateway.admit(tenant, "carol", "c1") is None
    assert counted(r, keys.connections_tenant(TENANT)) == {gateway.gateway_id: 2}
    assert not r.exists(keys.connections_client(TENANT, "alice"))
    assert r.smembers(gateway.held_key) == {
        keys.connections_tenant(TENANT).encode(),
        keys.connections_client(TENANT, "bob").encode(),
        keys.connections_client(TENANT, "carol").encode(),
    }
    # The process's own counts, kept as connections come and go (a release reads two).
    assert gateway.local_counts() == {
        keys.connections_tenant(TENANT): 2,
        keys.connections_client(TENANT, "bob"): 1,
        keys.connections_client(TENANT, "carol"): 1,
    }
    alice = keys.connections_client(TENANT, "alice")
    assert gateway.local_counts({alice}) == {alice: 0}


async def test_a_dead_gateways_connections_stop_counting_after_its_lease(
    client: aredis.Redis, r: redis.Redis
) -> None:
    tenant = tenant_config(max_connections=2, max_connections_per_client=2)
    dead = registry(client, ttl_s=0.3)  # never renews
    live = registry(client)
    assert await dead.admit(tenant, "alice", "a1") is None
    assert await dead.admit(tenant, "alice", "a2") is None
    assert await live.admit(tenant, "alice", "a3") == "too many connections for the tenant"

    async def admitted() -> bool:
        return await live.admit(tenant, "alice", "a3") is None

    await wait_until(admitted, 5, "the dead gateway's connections to stop counting")
    assert counted(r, keys.connections_client(TENANT, "alice")) == {live.gateway_id: 1}
    # Any gateway's renewal removes what is left of the dead one: its lease and its counts.
    r.hset(keys.connections_client(TENANT, "other"), dead.gateway_id, 1)
    r.sadd(dead.held_key, keys.connections_client(TENANT, "other"))
    await live.refresh()
    assert not r.exists(keys.connections_client(TENANT, "other"))
    assert not r.exists(dead.held_key)
    assert r.zscore(keys.GATEWAY_LEASES, dead.gateway_id) is None
    assert r.zscore(keys.GATEWAY_LEASES, live.gateway_id) is not None


async def test_a_drained_gateway_takes_its_lease_away_only_once_it_counts_nothing(
    client: aredis.Redis, r: redis.Redis
) -> None:
    tenant = tenant_config()
    gateway = registry(client)
    assert await gateway.admit(tenant, "alice", "a1") is None
    assert r.zscore(keys.GATEWAY_LEASES, gateway.lease_id) is not None
    # A connection still counted (a drain that timed out): the lease stays, to lapse.
    assert await gateway.retire() is False
    assert r.zscore(keys.GATEWAY_LEASES, gateway.lease_id) is not None
    await gateway.release("a1")
    assert await gateway.retire() is True
    assert r.zscore(keys.GATEWAY_LEASES, gateway.lease_id) is None
    assert not r.exists(gateway.held_key)


class CountingRedis(aredis.Redis):
    """Counts the commands and pipelines a registry sends (Redis's own command statistics
    are server-wide, and the server is shared)."""

    sent = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        CountingRedis.sent += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, *args: Any, **options: Any) -> Any:
        CountingRedis.sent += 1
        return super().pipeline(*args, **options)


async def test_renewing_costs_one_command_whatever_the_connections(
    store_redis_url: str, r: redis.Redis
) -> None:
    counting = CountingRedis.from_url(store_redis_url)
    try:
        tenant = tenant_config(max_connections=1000, max_connections_per_client=10)
        gateway = ConnectionRegistry(lambda: counting)
        for i in range(200):
            assert await gateway.admit(tenant, f"client-{i}", f"conn-{i}") is None
        CountingRedis.sent = 0
        await gateway.refresh()
        assert CountingRedis.sent == 1  # the renewal script, for 200 connections
        assert r.zscore(keys.GATEWAY_LEASES, gateway.gateway_id) is not None
    finally:
        await counting.aclose()


async def test_a_gateway_whose_lease_lapsed_writes_its_counts_back(
    client: aredis.Redis, r: redis.Redis
) -> None:
    tenant = tenant_config()
    gateway = registry(client, ttl_s=10)
    other = registry(client)
    await gateway.admit(tenant, "alice", "a1")
    await gateway.admit(tenant, "alice", "a2")
    await gateway.admit(tenant, "bob", "b1")
    await gateway.release("a2")
    # Its lease lapsed (Redis was out of reach, say) and another gateway reaped its counts.
    r.zadd(keys.GATEWAY_LEASES, {gateway.gateway_id: 1})
    await other.refresh()
    assert not r.exists(keys.connections_tenant(TENANT))
    await gateway.release("b1")  # a release meanwhile never goes below zero
    await gateway.refresh()
    # Its old lease id stays dead (a reaper may still be at its counts): it counts anew
    # under a new one.
    assert gateway.lease_id != gateway.gateway_id
    assert r.zscore(keys.GATEWAY_LEASES, gateway.gateway_id) is None
    assert r.zscore(keys.GATEWAY_LEASES, gateway.lease_id) is not None
    assert counted(r, keys.connections_tenant(TENANT)) == {gateway.lease_id: 1}
    assert counted(r, keys.connections_client(TENANT, "alice")) == {gateway.lease_id: 1}
    assert not r.exists(keys.connections_client(TENANT, "bob"))
    assert r.smembers(gateway.held_key) == {
        keys.connections_tenant(TENANT).encode(),
        keys.connections_client(TENANT, "alice").encode(),
    }
    await gateway.release("a1")
    assert not r.exists(keys.connections_tenant(TENANT))


async def test_a_gateway_started_since_the_last_read_of_the_leases_counts(
    client: aredis.Redis, r: redis.Redis
) -> None:
    """Admission scripts are passed the lease set as last read (it lives in a slot of its
    own): a count of a gateway it does not name counts all the same, so no limit is ever
    exceeded for want of a fresh read."""
    tenant = tenant_config(max_connections=2, max_connections_per_client=10)
    early = registry(client)
    assert await early.admit(tenant, "alice", "a1") is None
    late = registry(client)  # its lease is newer than what `early` read
    assert await late.admit(tenant, "bob", "b1") is None
    assert await early.admit(tenant, "carol", "c1") == "too many connections for the tenant"
    assert sum(counted(r, keys.connections_tenant(TENANT)).values()) == 2


async def test_a_count_without_any_lease_is_dropped(client: aredis.Redis, r: redis.Redis) -> None:
    """A count left by a gateway whose lease was already reaped (its late admission, say)
    counts until a read of the leases shows it has none, then goes."""
    tenant = tenant_config(max_connections=2, max_connections_per_client=10)
    r.hset(keys.connections_tenant(TENANT), "reaped", 2)
    gateway = registry(client)
    assert await gateway.admit(tenant, "alice", "a1") == "too many connections for the tenant"
    assert await gateway.admit(tenant, "alice", "a1") is None
    assert counted(r, keys.connections_tenant(TENANT)) == {gateway.lease_id: 1}
