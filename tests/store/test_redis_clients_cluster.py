"""The gateways' Redis Cluster client (streams/redis_clients.py) keeps every node's pool
under its cap, for pipelines as for single commands, and a full one fails after its wait
the way the single-Redis pool does, instead of raising redis-py's MaxConnectionsError at
once or queueing without end.

On the Redis Cluster at SWITCHBOARD_TEST_REDIS_CLUSTER_URL, or one started for the session
(the `redis_cluster_url` fixture of tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aredis

from streams.redis_clients import BoundedAsyncRedisCluster, pool_exhausted
from tests.integration.support import wait_until

pytestmark = pytest.mark.asyncio


def keys_on_every_master(cluster: aredis.RedisCluster, prefix: str) -> list[str]:
    """One key per master (hash tags chosen until each master has one)."""
    by_master: dict[str, str] = {}
    masters = {node.name for node in cluster.get_primaries()}
    index = 0
    while set(by_master) != masters:
        key = f"{{{prefix}-{index}}}:k"
        node = cluster.get_node_from_key(key)
        assert node is not None
        by_master.setdefault(node.name, key)
        index += 1
    return list(by_master.values())


async def test_pipelines_over_every_master_wait_for_a_place_instead_of_failing(
    redis_cluster_url: str, cluster: aredis.RedisCluster
) -> None:
    prefix = f"bounded-{secrets.token_hex(4)}"
    spread = keys_on_every_master(cluster, prefix)
    client = BoundedAsyncRedisCluster.from_url(redis_cluster_url, max_connections=2, wait_s=10)
    try:

        async def one_pipeline(n: int) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                for key in spread:
                    pipe.incr(key)
                return await pipe.execute()

        # redis-py's own client raises MaxConnectionsError here: 40 pipelines, each wanting
        # a connection to every master, against pools of 2.
        answers = await asyncio.gather(*(one_pipeline(n) for n in range(40)))
        assert all(len(answer) == len(spread) for answer in answers)
        for key in spread:
            assert await cluster.get(key) == b"40"
        for node in client.get_nodes():
            assert len(node._connections) <= 2, node.name
    finally:
        await client.aclose()
        await cluster.delete(*spread)


async def test_a_full_client_gives_up_after_its_wait_and_serves_again_once_free(
    redis_cluster_url: str, cluster: aredis.RedisCluster
) -> None:
    idle_list = f"bounded-{secrets.token_hex(4)}:never-pushed"
    client = BoundedAsyncRedisCluster.from_url(redis_cluster_url, max_connections=1, wait_s=0.3)
    node = cluster.get_node_from_key(idle_list)
    try:

        async def hold_the_place() -> object:
            return await client.blpop([idle_list], timeout=2)

        holder = asyncio.create_task(hold_the_place())

        async def blocked() -> bool:
            info = await cluster.info("clients", target_nodes=node)
            return int(info["blocked_clients"]) > 0

        await wait_until(blocked, 5, "the only place to be held by BLPOP")
        with pytest.raises(Exception) as refused:
            await client.get(f"{{{idle_list}}}:other")
        assert pool_exhausted(refused.value)
        assert await holder is None  # BLPOP's timeout: nothing was pushed
        assert await client.get(f"{{{idle_list}}}:other") is None
    finally:
        await client.aclose()
