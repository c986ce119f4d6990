"""A master of the Redis Cluster killed (-9) during steady appends to a busy stream, its
replica promoted, writers retrying every unacked message with the same id: what the acks
promise across a failover, for each SWITCHBOARD_REPLICA_ACKS (docs/guarantees.md).

- 0 (the default): every acked message is in the stream at most once; the acked ones
  missing are exactly those the dead master had not yet sent to the replica (Redis
  replicates asynchronously). Each message id is there at most once, acked or not.
- 1: every acked message is in the stream exactly once.

The appends are the gateway's own (streams/log.py StreamStore._write: the publish script,
then WAIT on its connection when asked), on the async Redis Cluster client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from project.redis_cluster import RedisCluster
from streams import replication, scripts
from streams.events import cause_of, event_parts, new_event_id
from streams.log import StreamStore

logger = logging.getLogger(__name__)

TENANT = "acme"
STREAM = "busy"
CLIENT = "writer"
# Keys of one tenant share its hash tag, so the append is one slot (docs/architecture.md).
SEQ_KEY = f"ft:s:{{{TENANT}}}:{STREAM}:seq"
LOG_KEY = f"ft:s:{{{TENANT}}}:{STREAM}:log"
QUEUE_KEY = f"ft:q:{{{TENANT}}}"
OUTBOX_KEY = f"ft:o:{{{TENANT}}}"
CHANNEL = f"ft:e:{{{TENANT}}}:{STREAM}"
WRITERS = 4
BEFORE_KILL = 300  # acks before the kill, so the master is busy when it dies
AFTER_FAILOVER = 100  # acks after the promotion, so the writers are seen to carry on


def dedupe_key(message_id: str) -> str:
    return f"ft:m:{{{TENANT}}}:{len(CLIENT)}:{CLIENT}:{message_id}"


def append_call(message_id: str, data: int) -> scripts.AppendEvent:
    event_id = new_event_id()
    prefix, suffix = event_parts(
        stream=STREAM,
        event_id=event_id,
        kind="published",
        sender=f"client:{CLIENT}",
        cause=cause_of(CLIENT, message_id, None),
        data={"n": data},
    )
    return scripts.AppendEvent(
        seq_key=SEQ_KEY,
        log_key=LOG_KEY,
        dedupe_key=dedupe_key(message_id),
        queue_key=QUEUE_KEY,
        channel=CHANNEL,
        prefix=prefix,
        suffix=suffix,
        maxlen=1_000_000,
        dedupe_ttl=3600,
        event_id=event_id,
        trigger_message="",
        task_outbox_key=OUTBOX_KEY,
        outbox_entry="",
    )


@dataclass
class Run:
    acked: dict[str, str] = field(default_factory=dict)  # message id -> acked event id
    acked_at: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def write_until(store: StreamStore, run: Run, writer: str, stop: asyncio.Event) -> None:
    """One client's steady sends: each message retried with its id until acked."""
    number = 0
    while not stop.is_set():
        message_id = f"{writer}-{number}"
        while True:
            run.attempts += 1
            try:
                answer = await store._write(append_call(message_id, number), dedupe_key(message_id))
            except (
                redis.RedisError,
                redis.exceptions.RedisClusterException,
                OSError,
                replication.NotReplicated,
            ) as error:
                name = type(error).__name__
                run.errors[name] = run.errors.get(name, 0) + 1
                await asyncio.sleep(0.05)
                continue
            run.acked[message_id] = answer.value.split(" ")[1]
            run.acked_at[message_id] = time.monotonic()
            break
        number += 1


def stream_contents(redis_cluster: RedisCluster) -> list[tuple[int, str, str]]:
    """(seq, event id, message id) of every event in the log, read from its master once
    every node agrees who that is (a node just restarted believes its old role a moment)."""
    redis_cluster.wait_ok(timeout=30)
    node = redis_cluster.master_of(LOG_KEY)
    entries = node.client(timeout=10).xrange(LOG_KEY)
    found = []
    for entry_id, fields in entries:
        event = json.loads(fields[b"e"])
        found.append(
            (int(entry_id.decode().partition("-")[0]), event["id"], event["cause"]["message"])
        )
    return found


async def failover_during_writes(
    redis_cluster: RedisCluster, replica_acks: int
) -> tuple[Run, float]:
    master = redis_cluster.master_of(SEQ_KEY)
    master.client().delete(SEQ_KEY, LOG_KEY)
    client = AsyncRedisCluster.from_url(
        redis_cluster.url, socket_timeout=2, socket_connect_timeout=1
    )
    store = StreamStore(client)  # type: ignore[arg-type]
    store.replica_acks = replica_acks
    store.replica_ack_timeout_ms = 1000
    run = Run()
    stop = asyncio.Event()
    # Ids of this run alone: the dedupe keys of an earlier run are still there.
    names = [f"w{i}-{uuid.uuid4().hex[:6]}" for i in range(WRITERS)]
    writers = [asyncio.create_task(write_until(store, run, name, stop)) for name in names]
    try:
        deadline = time.monotonic() + 60
        while len(run.acked) < BEFORE_KILL and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(run.acked) >= BEFORE_KILL, run
        killed_at = time.monotonic()
        await asyncio.to_thread(redis_cluster.kill, master)
        await asyncio.to_thread(redis_cluster.wait_for_failover, master, 60)
        if replica_acks:
            # The promoted replica is a master without replicas: `WAIT 1` cannot pass (its
            # writes answer `unavailable`) until the killed node is back as its replica.
            await asyncio.to_thread(redis_cluster.restart, master)
        after = len(run.acked)
        deadline = time.monotonic() + 60
        while len(run.acked) < after + AFTER_FAILOVER and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(run.acked) >= after + AFTER_FAILOVER, f"writers stuck after failover: {run}"
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
        await client.aclose()
    return run, killed_at


def check(redis_cluster: RedisCluster, run: Run, killed_at: float) -> list[str]:
    """The promises both settings keep; answers the acked messages lost."""
    contents = stream_contents(redis_cluster)
    by_message: dict[str, list[str]] = {}
    for _, event_id, message_id in contents:
        by_message.setdefault(message_id, []).append(event_id)
    # Each message id is in the stream at most once, acked or not: a retry after a lost
    # ack is deduplicated, a retry after a lost write writes it once.
    repeated = {m: ids for m, ids in by_message.items() if len(ids) > 1}
    assert not repeated, repeated
    seqs = [seq for seq, _, _ in contents]
    assert seqs == sorted(set(seqs)), "seqs out of order or repeated"
    lost = []
    for message_id, event_id in run.acked.items():
        found = by_message.get(message_id)
        if found is None:
            lost.append(message_id)
        else:
            # What the client was told is what the stream holds.
            assert found == [event_id], (message_id, found, event_id)
    # Only an ack the dead master gave can be lost: none after the promotion.
    late = [
        (m, round(run.acked_at[m] - killed_at, 3)) for m in lost if run.acked_at[m] >= killed_at
    ]
    assert not late, f"acks given after the kill were lost: {late}"
    logger.info(
        "acked %d, lost %d, attempts %d, errors %s",
        len(run.acked),
        len(lost),
        run.attempts,
        run.errors,
    )
    return lost


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_without_replica_acks_an_acked_write_is_at_most_once(
    healed_redis_cluster: RedisCluster,
) -> None:
    run, killed_at = await failover_during_writes(healed_redis_cluster, replica_acks=0)
    lost = check(healed_redis_cluster, run, killed_at)
    # Any number may be lost (usually 0 to a few on loopback): the promise is at most once.
    print(f"replica_acks=0: {len(lost)} of {len(run.acked)} acked messages lost by the failover")


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_with_replica_acks_every_acked_write_survives_exactly_once(
    healed_redis_cluster: RedisCluster,
) -> None:
    run, killed_at = await failover_during_writes(healed_redis_cluster, replica_acks=1)
    lost = check(healed_redis_cluster, run, killed_at)
    assert lost == []


def test_launcher_promotes_a_replica_for_the_killed_masters_slots(
    healed_redis_cluster: RedisCluster,
) -> None:
    cluster = healed_redis_cluster
    victim = cluster.master_of("x:{tiny}:y")
    before = cluster.slot_owners()
    owned = [slot for slot, name in before.items() if name == victim.name]
    cluster.kill(victim)
    after = cluster.wait_for_failover(victim)
    new_owners = {after[slot] for slot in owned}
    assert len(new_owners) == 1 and victim.name not in new_owners
    assert cluster.is_ok()
