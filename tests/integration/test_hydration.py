"""Compact catch-up and interrupt over real processes (gateway + worker, the simulated
backend streaming a reply piece by piece): a subscriber joining or resuming mid-reply gets
one reply.snapshot and then the live deltas, and the text they make is the final text; a
finished reply comes as its reply.done alone; `send` with `interrupt: true` ends the run in
flight with one reply.done `cancelled` before the new run, which sees the partial text."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from client.connection import Event, assembled_text

from .agents_app import catalog as c
from .conftest import SOFT_LIMIT_S, Connect, Switchboard
from .support import collect_run, collect_until, is_done_of

pytestmark = pytest.mark.asyncio

# Pieces further apart than the worker's 50 ms coalescing window, all within the soft limit.
SLOW = {"chunks": 12, "chunk_delay_ms": 100}
REPLY = "the quick brown fox jumps over the lazy dog and runs far away"
STALL_MS = 600_000  # the call stalls after its first piece until interrupted


def of_run(events: list[Event], run: str) -> list[Event]:
    return [e for e in events if e["kind"].startswith("reply.") and e["data"]["run"] == run]


async def test_joining_mid_reply_gets_a_snapshot_then_deltas_making_the_final_text(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("hydrate")
    writer = await connect()
    await writer.subscribe(stream)
    sent = await writer.send(stream, "echo", REPLY, SLOW)
    seen = await collect_until(
        writer, stream, lambda e: e["kind"] == "reply.delta" and e["data"]["offset"] > 0
    )
    run = seen[-1]["data"]["run"]

    reader = await connect()
    subscribed = await reader.subscribe(stream, since=0, compact=True)
    events = await collect_run(reader, stream, sent["id"])
    mine = of_run(events, run)
    kinds = [e["kind"] for e in mine]
    assert kinds[0] == "reply.snapshot" and kinds.count("reply.snapshot") == 1, kinds
    assert set(kinds[1:-1]) <= {"reply.delta"} and kinds[-1] == "reply.done", kinds
    snapshot, done = mine[0], mine[-1]
    assert snapshot["data"]["offset"] == 0 and snapshot["data"]["text"]
    assert snapshot["seq"] <= subscribed["head"] < mine[1]["seq"]
    # Exact: the snapshot and the later deltas make the final text, offsets contiguous.
    offset = len(snapshot["data"]["text"])
    for delta in mine[1:-1]:
        assert delta["data"]["offset"] == offset
        offset += len(delta["data"]["text"])
    assert assembled_text(mine[:-1]) == done["data"]["text"] == REPLY
    assert done["data"]["status"] == "ok"
    assert reader.seq_anomalies == []


async def test_compact_history_gives_each_finished_reply_as_its_reply_done_alone(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("compact")
    writer = await connect()
    first = await writer.send(stream, "echo", "one two three four", SLOW)
    await collect_run(writer, stream, first["id"])
    second = await writer.send(stream, "echo", "five six seven eight")
    full_events = await collect_run(writer, stream, second["id"])

    reader = await connect()
    await reader.subscribe(stream, since=0, compact=True)
    events = await collect_run(reader, stream, second["id"])
    assert [e["kind"] for e in events] == ["message", "reply.done", "message", "reply.done"]
    assert [e["data"]["text"] for e in events if e["kind"] == "reply.done"] == [
        "one two three four",
        "five six seven eight",
    ]
    assert sum(e["kind"] == "reply.delta" for e in full_events) > 1
    assert reader.seq_anomalies == []
    assert reader.last_seq(stream) == events[-1]["seq"]


async def test_resuming_mid_reply_from_a_position_gets_the_rest_as_one_snapshot(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("resume")
    writer = await connect()
    sent = await writer.send(stream, "echo", REPLY, SLOW)

    first = await connect()
    await first.subscribe(stream, since=0)
    had = await collect_until(
        first, stream, lambda e: e["kind"] == "reply.delta" and e["data"]["offset"] > 0
    )
    position = had[-1]["seq"]
    await first.close()
    # More of the reply streams while no one of this client listens.
    await collect_until(
        writer,
        stream,
        lambda e: e["kind"] == "reply.delta" and e["seq"] > position + 1,
    )

    again = await connect()
    await again.subscribe(stream, since=position, compact=True)
    events = await collect_run(again, stream, sent["id"])
    run = events[-1]["data"]["run"]
    mine = of_run(events, run)
    assert mine[0]["kind"] == "reply.snapshot"
    assert mine[0]["data"]["offset"] == len(assembled_text(of_run(had, run)))
    assert assembled_text(of_run(had, run) + mine[:-1]) == mine[-1]["data"]["text"] == REPLY


async def test_interrupt_ends_the_run_in_flight_once_and_the_next_run_sees_its_text(
    connect: Connect, unique: Callable[[str], str], switchboard: Switchboard
) -> None:
    stream = unique("steer")
    client = await connect()
    old = await client.send(
        stream, c.STEER, "tell me a long story", {"chunks": 4, "chunk_delay_ms": STALL_MS}
    )
    before = await collect_until(client, stream, lambda e: e["kind"] == "reply.delta")
    partial = before[-1]["data"]["text"]

    new = await client.send(stream, c.STEER, "shorter please", {"interrupt": True})
    events = before + await collect_run(client, stream, new["id"], timeout=SOFT_LIMIT_S + 10)
    old_dones = [e for e in events if is_done_of(old["id"])(e)]
    assert len(old_dones) == 1
    assert old_dones[0]["data"]["status"] == "cancelled"
    assert old_dones[0]["data"]["text"] == partial
    new_message = next(e for e in events if e["kind"] == "message" and e["seq"] == new["seq"])
    assert old_dones[0]["seq"] < new_message["seq"]
    old_run = old_dones[0]["data"]["run"]
    assert not [e for e in of_run(events, old_run) if e["seq"] > old_dones[0]["seq"]]
    # The new run saw what the old one had said (the steer agent puts it first).
    done = events[-1]
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"] == f"[{c.STEER_MARK}{partial}] shorter please"
    # Nothing more of the old run comes later (its worker abandoned the call).
    later = [e for e in client.buffered(stream) if e["kind"].startswith("reply.")]
    assert all(e["data"]["run"] != old_run for e in later)


async def test_joining_at_the_head_mid_reply_without_since_is_hydrated_too(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("head")
    writer = await connect()
    sent = await writer.send(stream, "echo", REPLY, SLOW)
    await collect_until(
        writer, stream, lambda e: e["kind"] == "reply.delta" and e["data"]["offset"] > 0
    )

    reader = await connect()
    subscribed = await reader.subscribe(stream, compact=True)
    events = await collect_run(reader, stream, sent["id"])
    assert events[0]["kind"] == "reply.snapshot", events[0]
    assert events[0]["seq"] <= subscribed["head"] and events[0]["data"]["offset"] == 0
    assert all(e["seq"] > subscribed["head"] for e in events[1:])
    assert assembled_text(events[:-1]) == events[-1]["data"]["text"] == REPLY
    assert reader.seq_anomalies == []
