"""Conversation history end to end: beat's persister writes a run's message and reply to
the cluster's database; the worker's log lines carry the run's ids."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import TENANT, Connect, Switchboard
from .support import collect_run, wait_until

pytestmark = pytest.mark.asyncio

# Beat schedules the persister every SWITCHBOARD_HISTORY_FLUSH_S (2 s); the bound covers a
# busy two-core machine starting a Django shell per look.
PERSIST_WAIT_S = 60

_ROWS = """
import json
from history.models import HistoryEntry
rows = HistoryEntry.objects.filter(tenant__slug={tenant!r}, stream={stream!r}).order_by("seq")
print(json.dumps(list(rows.values_list("seq", "kind", "sender", "run_id", "status", "text"))))
"""


def history_rows(switchboard: Switchboard, stream: str) -> list[list[Any]]:
    output = switchboard.shell(_ROWS.format(tenant=TENANT, stream=stream))
    return json.loads(output.splitlines()[-1])


async def test_a_finished_run_reaches_the_database(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect(client="historian")
    stream = unique("history")
    text = 'Keep this: "héllo" ✓'
    ack = await client.send(stream, "echo", text, id="m-1")
    events = await collect_run(client, stream, "m-1")
    message, done = events[0], events[-1]
    run_id = done["data"]["run"]

    async def both_rows() -> list[list[Any]]:
        rows = await asyncio.to_thread(history_rows, switchboard, stream)
        return rows if len(rows) == 2 else []

    rows = await wait_until(both_rows, PERSIST_WAIT_S, "the run's history rows", interval=0.5)
    assert rows == [
        [ack["seq"], "message", "client:historian", run_id, "", text],
        [done["seq"], "reply.done", "agent:echo", run_id, "ok", text],
    ]
    assert message["seq"] == ack["seq"]
    # The worker's line about finishing the run names it through the log context too.
    finished = [
        line
        for line in switchboard.log("worker-0").splitlines()
        if f"run={run_id} status=ok" in line
    ]
    assert finished and f"[tenant={TENANT} run={run_id} event={message['id']}]" in finished[0]
