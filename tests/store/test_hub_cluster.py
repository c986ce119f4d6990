"""The hub on a real Redis Cluster (realtime/hub.py): sharded subscriptions on each slot's
master, and a failover that moves slots never passes silently: every listener of a moved
channel is told it may have missed events, and hears the stream again from its new owner.

On the Redis Cluster at SWITCHBOARD_TEST_REDIS_CLUSTER_URL (any node; a replica per
master), or else one of 3 masters and 3 replicas started for the session
(project/redis_cluster.py, the `redis_cluster_url` fixture of tests/conftest.py). The
failover test promotes a replica (CLUSTER FAILOVER TAKEOVER), which leaves the cluster
healthy with the roles swapped.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_asyncio
import redis.asyncio as aredis

from realtime.hub import Hub
from streams import keys
from streams.redis_clients import ClusterTopology
from tests.integration.support import wait_until

pytestmark = pytest.mark.asyncio

TENANTS = [f"t{i}" for i in range(12)]  # enough to land on every master


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []
        self.unsequenced: list[str] = []
        self.losses = 0

    def on_event(self, seq: int, event: str) -> None:
        self.events.append((seq, event))

    def on_unsequenced(self, event: str, sender: str | None) -> None:
        self.unsequenced.append(event)

    def on_possible_loss(self) -> None:
        self.losses += 1


@pytest_asyncio.fixture
async def hub(redis_cluster_url: str) -> AsyncIterator[Hub]:
    def no_single_redis() -> aredis.Redis:
        raise AssertionError("a sharded hub uses the topology's clients only")

    hub = Hub(no_single_redis, ClusterTopology(redis_cluster_url))
    yield hub
    await hub.close()


async def spublish(cluster: aredis.RedisCluster, channel: str, message: str) -> int:
    return int(await cluster.execute_command("SPUBLISH", channel, message, target_nodes=None))


async def joined(hub: Hub) -> dict[str, Recorder]:
    recorders = {tenant: Recorder() for tenant in TENANTS}
    for tenant, recorder in recorders.items():
        await hub.join(tenant, "room", recorder)
    return recorders


async def test_each_channel_is_heard_from_its_slots_master(
    hub: Hub, cluster: aredis.RedisCluster
) -> None:
    recorders = await joined(hub)
    masters = {cluster.get_node_from_key(keys.stream_channel(t, "room")).name for t in TENANTS}
    assert len(masters) > 1, "the tenants' channels should span masters"
    for tenant in TENANTS:
        channel = keys.stream_channel(tenant, "room")
        assert await spublish(cluster, channel, f'1\n{{"t":"{tenant}"}}') == 1
        await spublish(cluster, channel, '\n{"from":"client:bob"}')

    async def heard() -> bool:
        return all(r.events and r.unsequenced for r in recorders.values())

    await wait_until(heard, 5, "every channel's events")
    for tenant, recorder in recorders.items():
        assert recorder.events == [(1, f'{{"t":"{tenant}"}}')]
        assert recorder.losses == 0
    # Leaving unsubscribes: nothing is heard any more.
    first = TENANTS[0]
    hub.leave(first, "room", recorders[first])

    async def unsubscribed() -> bool:
        return await spublish(cluster, keys.stream_channel(first, "room"), "2\n{}") == 0

    await wait_until(unsubscribed, 5, "the channel to be left")


async def test_a_failover_moves_channels_and_says_so(
    hub: Hub, cluster: aredis.RedisCluster
) -> None:
    recorders = await joined(hub)
    # Promote the replica of the master that owns the first tenant's slot.
    channel = keys.stream_channel(TENANTS[0], "room")
    master = cluster.get_node_from_key(channel)
    replicas = await _replicas_of(cluster, master.name)
    assert replicas, "the test cluster needs a replica per master"
    moved = [
        t for t in TENANTS if cluster.get_node_from_key(keys.stream_channel(t, "room")) is master
    ]
    # A client of the replica itself: the cluster client's node cache holds masters only
    # (without read_from_replicas), so it cannot aim a command at a replica.
    host, _, port = replicas[0].rpartition(":")
    replica = aredis.Redis(host=host, port=int(port))

    async def in_sync() -> bool:
        info = await replica.info("replication")
        return bool(info.get("master_link_status") == "up")

    try:
        await wait_until(in_sync, 30, "the replica to be in sync")
        # TAKEOVER: a plain manual failover is refused for a while after the last one (the
        # election retry delay), which reruns of this test would meet.
        await replica.execute_command("CLUSTER FAILOVER", "TAKEOVER")
    finally:
        await replica.aclose()

    async def told() -> bool:
        return all(recorders[t].losses >= 1 for t in moved)

    await wait_until(told, 30, "the listeners of moved channels to be told")
    await cluster.nodes_manager.initialize()

    async def heard_again() -> bool:
        for tenant in moved:
            await spublish(cluster, keys.stream_channel(tenant, "room"), f"7\n{tenant}")
        return all(any(seq == 7 for seq, _ in recorders[t].events) for t in moved)

    await wait_until(heard_again, 30, "the moved channels to be heard from the new master")
    # Channels on the other masters were never interrupted.
    for tenant in TENANTS:
        if tenant not in moved:
            assert recorders[tenant].losses == 0


async def _replicas_of(cluster: aredis.RedisCluster, master: str) -> list[str]:
    node = cluster.get_node(node_name=master)
    nodes: dict[str, Any] = await cluster.execute_command("CLUSTER NODES", target_nodes=node)
    master_id = next(info["node_id"] for address, info in nodes.items() if address == master)
    return [address for address, info in nodes.items() if info["master_id"] == master_id]


# --- the gateway's other scripts on the cluster -------------------------------------------


def _fresh(name: str) -> str:
    # Tenants of their own: the cluster is not flushed between runs.
    return f"{name}-{secrets.token_hex(4)}"


async def test_presence_works_tenant_by_tenant_on_the_cluster(
    cluster: aredis.RedisCluster,
) -> None:
    from realtime.presence import PresenceStore

    client = cast(aredis.Redis, cluster)
    tenants = [_fresh(f"p{i}") for i in range(6)]
    dead = PresenceStore(client, "dead", 0.2)
    live = PresenceStore(client, "live", 30)
    for tenant in tenants:
        assert await dead.join(tenant, "room", "ghost", "Ghost")
        assert await live.join(tenant, "room", "alice", "")
    # A batch of refreshes across tenants (one call per tenant, made concurrently here).
    assert await live.refresh([(tenant, "room", ["alice"]) for tenant in tenants]) == []

    removed: set[tuple[str, str]] = set()

    async def swept() -> bool:
        removed.update(await live.sweep())
        return all((tenant, "room") in removed for tenant in tenants)

    await wait_until(swept, 5, "every tenant's ghost to be swept")
    for tenant in tenants:
        assert await live.clients(tenant, "room") == [{"client": "alice", "name": None}]
        assert await live.leave(tenant, "room", "alice")


async def test_connection_admission_counts_exactly_on_the_cluster(
    cluster: aredis.RedisCluster,
) -> None:
    from dataclasses import replace

    from realtime.admission import ConnectionRegistry
    from tests.store.test_limits import tenant_config

    client = cast(aredis.Redis, cluster)
    gateways = [ConnectionRegistry(lambda: client) for _ in range(3)]
    tenants = [_fresh("a"), _fresh("b")]
    configs = {slug: replace(tenant_config(max_connections=5), slug=slug) for slug in tenants}
    results = await asyncio.gather(
        *(gateways[i % 3].admit(configs[tenants[i % 2]], f"c{i}", f"conn-{i}") for i in range(40))
    )
    for slug in tenants:
        counts = await cluster.hgetall(keys.connections_tenant(slug))
        assert sum(int(count) for count in counts.values()) == 5
    assert results.count(None) == 10
    for gateway in gateways:
        for connection in [m.split(" ", 1)[1] for m in list(gateway.members)]:
            await gateway.release(connection)
        await gateway.refresh()
    for slug in tenants:
        assert not await cluster.exists(keys.connections_tenant(slug))
