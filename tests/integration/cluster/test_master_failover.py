"""A Redis Cluster master killed (-9) under steady publishes through a gateway, its replica
promoted: clients reconnect and resend every unacked message with its id until acked.
With SWITCHBOARD_REPLICA_ACKS=1 every acked message is in the stream exactly once; with 0,
at most once, and only acks given before the kill may be missing (docs/guarantees.md,
"Redis failover")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from client.connection import SwitchboardClient, SwitchboardError
from project.redis_cluster import RedisCluster
from tests.integration.conftest import TENANT, StartGateway, Switchboard

# After the package's other modules (by name): the kill disturbs every process a moment.
pytestmark = pytest.mark.asyncio

PUBLISHERS = 4
BEFORE_KILL = 150
AFTER_FAILOVER = 60
RETRYABLE = {"internal", "unavailable", "rate_limited", "overloaded"}


@dataclass
class Acks:
    acked: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (seq, event id)
    acked_at: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1


async def publish_until(
    url: str, token: str, name: str, stream: str, acks: Acks, stop: asyncio.Event
) -> None:
    """One client's steady publishes, each resent with its id until acked, reconnecting
    whenever the connection is lost."""
    client: SwitchboardClient | None = None
    number = 0
    try:
        while not stop.is_set():
            message_id = f"{name}-{number}"
            while True:
                try:
                    if client is None:
                        client = await SwitchboardClient.connect(url, token)
                    ack = await client.publish(stream, {"n": number}, id=message_id, timeout=5)
                except SwitchboardError as refused:
                    assert refused.code in RETRYABLE, refused
                    acks.count(refused.code)
                    await asyncio.sleep((refused.retry_after_ms or 100) / 1000)
                    continue
                except (ConnectionError, OSError, TimeoutError) as lost:
                    acks.count(type(lost).__name__)
                    if client is not None:
                        await client.close()
                    client = None
                    await asyncio.sleep(0.1)
                    continue
                acks.acked[message_id] = (ack["seq"], ack["event_id"])
                acks.acked_at[message_id] = time.monotonic()
                break
            number += 1
    finally:
        if client is not None:
            await client.close()


async def wait_for_acks(acks: Acks, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(acks.acked) < count:
        assert time.monotonic() < deadline, f"{len(acks.acked)} of {count} acks: {acks.retries}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replica_acks", [0, 1])
async def test_acked_publishes_across_a_master_failover(
    switchboard: Switchboard,
    redis_cluster: RedisCluster,
    start_gateway: StartGateway,
    unique: Callable[[str], str],
    replica_acks: int,
) -> None:
    url, _ = start_gateway(
        SWITCHBOARD_REPLICA_ACKS=str(replica_acks), SWITCHBOARD_REPLICA_ACK_TIMEOUT_MS="1000"
    )
    stream = unique("busy")
    log_key = f"{switchboard.key_prefix}:s:{{{TENANT}}}:{stream}:log"
    acks = Acks()
    stop = asyncio.Event()
    publishers = [
        asyncio.create_task(publish_until(url, switchboard.token(name), name, stream, acks, stop))
        for name in (unique("pub") for _ in range(PUBLISHERS))
    ]
    try:
        await wait_for_acks(acks, BEFORE_KILL, 60)
        master = redis_cluster.master_of(log_key)
        killed_at = time.monotonic()
        await asyncio.to_thread(redis_cluster.kill, master)
        await asyncio.to_thread(redis_cluster.wait_for_failover, master, 60)
        # Back as the new master's replica: with REPLICA_ACKS=1 the shard takes no acked
        # write before it has one.
        await asyncio.to_thread(redis_cluster.restart, master)
        await wait_for_acks(acks, len(acks.acked) + AFTER_FAILOVER, 120)
    finally:
        stop.set()
        await asyncio.gather(*publishers, return_exceptions=True)
        await asyncio.to_thread(redis_cluster.wait_ok, 60)
        await asyncio.to_thread(redis_cluster.wait_synced)

    entries = switchboard.redis().xrange(log_key)
    by_message: dict[str, list[tuple[int, str]]] = {}
    for _, fields in entries:
        event = json.loads(fields[b"e"])
        by_message.setdefault(event["cause"]["message"], []).append((event["seq"], event["id"]))
    repeated = {m: found for m, found in by_message.items() if len(found) > 1}
    assert not repeated, repeated  # each message id at most once, acked or not
    lost = [m for m in acks.acked if m not in by_message]
    for message_id, (seq, event_id) in acks.acked.items():
        if message_id in by_message:
            assert by_message[message_id] == [(seq, event_id)], message_id
    late = [m for m in lost if acks.acked_at[m] >= killed_at]
    assert not late, f"acks given after the kill were lost: {late}"
    if replica_acks:
        assert lost == [], f"{len(lost)} acked messages lost with REPLICA_ACKS=1: {lost}"
    print(
        f"REPLICA_ACKS={replica_acks}: {len(acks.acked)} acked, {len(lost)} lost,"
        f" retries {acks.retries}"
    )
