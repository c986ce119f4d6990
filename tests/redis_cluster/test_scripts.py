"""Script calls on a real Redis Cluster: pipelined calls of several slots (the presence
refresh's way, streams/scripts.py run_pipelined_async) and the replica-ack path."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from project.redis_cluster import RedisCluster
from streams import replication, scripts
from tests.redis_cluster.test_failover import append_call


def call_for(tenant: str, message_id: str) -> scripts.AppendEvent:
    call = append_call(message_id, 1)
    tag = "{" + tenant + "}"
    call.seq_key = call.seq_key.replace("{acme}", tag)
    call.log_key = call.log_key.replace("{acme}", tag)
    call.dedupe_key = call.dedupe_key.replace("{acme}", tag)
    call.queue_key = call.queue_key.replace("{acme}", tag)
    call.channel = call.channel.replace("{acme}", tag)  # SPUBLISH: the same slot
    call.task_outbox_key = call.task_outbox_key.replace("{acme}", tag)
    return call


@pytest.mark.asyncio
async def test_pipelined_calls_of_several_slots_load_their_script_and_answer(
    redis_cluster: RedisCluster,
) -> None:
    client = AsyncRedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    try:
        tenants = ["p1", "p2", "p3", "p4"]
        assert len({redis_cluster.master_of("{" + t + "}").port for t in tenants}) > 1
        for attempt in ("first", "again"):
            calls = [call_for(t, f"{attempt}-{t}") for t in tenants]
            results = await scripts.run_pipelined_async(client, calls)  # type: ignore[arg-type]
            assert [r.code for r in results] == [1, 1, 1, 1], results
        repeated = await scripts.run_pipelined_async(client, calls)  # type: ignore[arg-type]
        assert [r.code for r in repeated] == [0, 0, 0, 0]
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_the_replica_ack_path_confirms_a_write_on_its_slots_master(
    redis_cluster: RedisCluster,
) -> None:
    client = AsyncRedisCluster.from_url(redis_cluster.url)
    try:
        answer, confirmed = await replication.run_replicated(
            call_for("r1", "m-1"), client, replicas=1, timeout_ms=2000
        )
        assert (answer.code, confirmed) == (1, 1)
        # More replicas than the shard has: WAIT answers what it got once its time is up.
        answer, confirmed = await replication.run_replicated(
            call_for("r1", "m-2"), client, replicas=2, timeout_ms=50
        )
        assert (answer.code, confirmed) == (1, 1)
    finally:
        await client.aclose()
