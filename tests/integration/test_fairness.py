"""Fair scheduling across tenants on the real cluster (streams/fairness.py).

The cluster's worker is swapped for one that holds two model calls at once
(SWITCHBOARD_WORKER_MAX_CALLS=2), so runs queue. A tenant that floods it with slow runs must
not make another tenant's few runs wait behind its whole backlog: with deficit round robin
the quiet tenant's runs are picked every other time, so they finish while most of the
flood is still queued. Asserted on the order replies complete, never on milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from client.connection import Event, SwitchboardClient

from .conftest import FLOOD_TENANT, QUIET_TENANT, Connect, Switchboard, replaced_worker
from .support import collect_until

pytestmark = pytest.mark.asyncio

FLOOD_RUNS = 20
QUIET_RUNS = 4
# Each run holds one of the worker's two slots this long: the flood is about 3 s of them.
SLOW = {"latency_ms": 300, "chunks": 1}


def is_at(seq: int) -> Callable[[Event], bool]:
    return lambda event: event["seq"] == seq


async def test_a_flooding_tenant_does_not_starve_a_quiet_one(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    with replaced_worker(switchboard, SWITCHBOARD_WORKER_MAX_CALLS="2"):
        await flood_and_quiet(connect, unique)


async def flood_and_quiet(connect: Connect, unique: Callable[[str], str]) -> None:
    flooder = await connect(tenant=FLOOD_TENANT)
    quiet = await connect(tenant=QUIET_TENANT)
    flood_stream, quiet_stream = unique("flood"), unique("quiet")

    flood_ids = [flooder.new_id() for _ in range(FLOOD_RUNS)]
    for message_id in flood_ids:
        await flooder.send(flood_stream, "echo", "flood", options=SLOW, id=message_id)
    # Every flood run is queued (acknowledged) before the quiet tenant sends anything.
    quiet_ids = [quiet.new_id() for _ in range(QUIET_RUNS)]
    for message_id in quiet_ids:
        await quiet.send(quiet_stream, "echo", "quiet", options=SLOW, id=message_id)

    finished: list[str] = []

    async def finish(client: SwitchboardClient, tenant: str, message_id: str) -> None:
        _, done = await client.reply(message_id, timeout=30)
        assert done["data"]["status"] == "ok", done
        finished.append(tenant)

    await asyncio.gather(
        *(finish(flooder, "flood", message_id) for message_id in flood_ids),
        *(finish(quiet, "quiet", message_id) for message_id in quiet_ids),
    )
    last_quiet = max(index for index, tenant in enumerate(finished) if tenant == "quiet")
    flood_before = finished[:last_quiet].count("flood")
    # FIFO would finish all 20 flood runs first. Alternating picks finish the quiet
    # tenant's 4 within about 8 picks of its arrival (2 flood runs were already running).
    assert flood_before <= FLOOD_RUNS // 2, finished

    # Exactly one reply.done per accepted send: nothing after it but the marker.
    for client, stream, ids in (
        (flooder, flood_stream, flood_ids),
        (quiet, quiet_stream, quiet_ids),
    ):
        marker = await client.publish(stream, {"marker": True})
        events = await collect_until(client, stream, is_at(marker["seq"]))
        done_of = [event["cause"]["message"] for event in events if event["kind"] == "reply.done"]
        assert sorted(done_of) == sorted(ids)
