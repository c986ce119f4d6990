"""Queued runs whose tickets were lost (orchestration/tickets.py) on the real cluster.

A Redis restart under load can lose fair-queue tickets: the tasks that had taken them
failed on the dead connection. Here the tickets are deleted from the runs queue while no
worker is running, which leaves three runs queued with none; without the sweepers'
reconciliation they would wait, the restarted worker idle, until their deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from streams.enqueue import RUN_NEXT_TASK
from tests.conftest import rabbitmq_requested

from .conftest import KEY_PREFIX, SOFT_LIMIT_S, Connect, Switchboard
from .support import wait_until

pytestmark = pytest.mark.asyncio

RUNS_QUEUE = f"{KEY_PREFIX}:celery:switchboard.runs"
# Each run holds a worker process this long (inside the soft limit): the window in which
# the waiting runs' tickets are deleted.
SLOW = {"latency_ms": int(SOFT_LIMIT_S * 800), "chunks": 1}


@pytest.mark.skipif(
    rabbitmq_requested(),
    reason="deletes tickets from the Redis broker's list; with RabbitMQ a lost wake-up is the "
    "outbox sweep's (tests/integration/test_rabbitmq.py)",
)
async def test_queued_runs_whose_tickets_were_lost_still_end_ok(
    connect: Connect, switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    r = switchboard.redis()
    client = await connect()
    stream = unique("tickets")

    async def queue_length(length: int) -> bool:
        return r.llen(RUNS_QUEUE) == length

    worker = switchboard.cluster.processes["worker-0"]
    worker.stop()
    try:
        # No worker: three runs wait in the fair queue, their tickets in the runs queue.
        acks = [await client.send(stream, "echo", f"queued {n}", options=SLOW) for n in range(3)]
        await wait_until(lambda: queue_length(3), 10, "three tickets waiting")
        lost = 0
        for raw in r.lrange(RUNS_QUEUE, 0, -1):
            if json.loads(raw)["headers"]["task"] == RUN_NEXT_TASK:
                lost += r.lrem(RUNS_QUEUE, 1, raw)
        assert lost == 3, "the tickets were deleted before a worker took them"
    finally:
        switchboard.cluster.start_worker(0)

    for ack in acks:
        _, done = await client.reply(ack["id"], timeout=30)
        assert done["data"]["status"] == "ok", done
    logs = switchboard.log("gateway-0") + switchboard.log("worker-0")
    assert "queued runs without a ticket: enqueued" in logs
