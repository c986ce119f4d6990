"""Compact catch-up (`subscribe` with `compact: true`) and `send` with `interrupt: true`,
in-process. The run's worker is played by the test through the run store (the same
scripts a worker uses): no Celery worker runs in this tier."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from streams import keys
from streams.redis_clients import as_text, async_client
from streams.runs import AsyncRunStore, Run

from .conftest import TENANT, Connect, Socket

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def send(socket: Socket, message_id: str, text: str, **options: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "send",
        "id": message_id,
        "stream": "room",
        "agent": "echo",
        "text": text,
    }
    if options:
        frame["options"] = options
    await socket.send(frame)
    ack = await socket.next_of("ack")
    assert ack["id"] == message_id, ack
    return ack


def run_of(r: redis.Redis, client: str, message_id: str) -> str:
    receipt = r.get(keys.client_message(TENANT, client, message_id))
    assert receipt is not None
    return as_text(receipt).split(" ")[2]


async def claimed(run_id: str) -> tuple[AsyncRunStore, Run]:
    """The test as the run's worker: it owns step 0."""
    store = AsyncRunStore(async_client())
    run = await store.claim(run_id, 0)
    assert run is not None
    return store, run


async def subscribe(socket: Socket, since: int, **extra: Any) -> dict[str, Any]:
    await socket.send({"type": "subscribe", "stream": "room", "since": since, **extra})
    return await socket.next_of("subscribed")


async def test_joining_mid_reply_gets_one_snapshot_then_the_live_deltas(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    pieces = ["one ", "two ", "three "]
    for piece in pieces:
        last = await store.append_delta(run, piece)

    reader = await connect("reader")
    subscribed = await subscribe(reader, 0, compact=True)
    assert subscribed["head"] == last
    message, snapshot = await reader.events("room", 2)
    assert message["kind"] == "message"
    assert snapshot["kind"] == "reply.snapshot"
    assert snapshot["seq"] == last  # the last delta it covers: the window's end
    assert snapshot["data"] == {"run": run.run_id, "offset": 0, "text": "one two three "}
    assert snapshot["cause"]["message"] == "m1"

    live = await store.append_delta(run, "four")
    [delta] = await reader.events("room", 1)
    assert (delta["seq"], delta["data"]["offset"]) == (live, len("one two three "))
    await store.finalize(run, "ok")
    [done] = await reader.events("room", 1)
    assert done["data"]["text"] == snapshot["data"]["text"] + delta["data"]["text"]


async def test_a_finished_reply_comes_as_its_reply_done_alone(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    for piece in ["a", "b", "c"]:
        await store.append_delta(run, piece)
    await store.finalize(run, "ok")
    await alice.send({"type": "publish", "id": "p1", "stream": "room", "data": {"n": 1}})
    await alice.next_of("ack")

    full, compact = await connect("full"), await connect("compact")
    assert (await subscribe(full, 0))["head"] == 6
    assert [e["kind"] for e in await full.events("room", 6)] == [
        "message",
        *["reply.delta"] * 3,
        "reply.done",
        "published",
    ]
    await subscribe(compact, 0, compact=True)
    events = await compact.events("room", 3)
    assert [(e["seq"], e["kind"]) for e in events] == [
        (1, "message"),
        (5, "reply.done"),
        (6, "published"),
    ]
    assert events[1]["data"]["text"] == "abc"
    assert await compact.nothing_more()


async def test_resuming_mid_reply_gets_the_rest_as_a_snapshot_from_its_offset(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    seen = await store.append_delta(run, "seen ")
    for piece in ["missed ", "too"]:
        await store.append_delta(run, piece)

    reader = await connect("reader")
    await subscribe(reader, seen, compact=True)
    [snapshot] = await reader.events("room", 1)
    assert snapshot["data"] == {"run": run.run_id, "offset": len("seen "), "text": "missed too"}


async def test_a_restart_in_the_window_voids_the_text_before_it(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    seen = await store.append_delta(run, "first attempt ")
    await store.restart_reply(run, 2, "error", "")
    run.emitted = 0
    last = await store.append_delta(run, "second")

    reader = await connect("reader")
    await subscribe(reader, seen, compact=True)
    restart, snapshot = await reader.events("room", 2)
    assert restart["kind"] == "reply.restart"  # sent as it comes: it voids what the client had
    assert snapshot["seq"] == last
    assert snapshot["data"] == {"run": run.run_id, "offset": 0, "text": "second"}


async def test_compact_must_be_a_boolean(connect: Connect) -> None:
    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room", "compact": "yes"})
    error = await reader.next_of("error")
    assert (error["code"], error["detail"]) == ("bad_request", "'compact' must be true or false")


async def test_interrupt_cancels_the_run_in_flight_and_carries_its_text(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "tell me a story")
    old_id = run_of(r, "alice", "m1")
    store, run = await claimed(old_id)
    await store.append_delta(run, "Once upon")

    await alice.send(
        {
            "type": "send",
            "id": "m2",
            "stream": "room",
            "agent": "echo",
            "text": "shorter please",
            "options": {"interrupt": True},
        }
    )
    # In stream order: the old run's one reply.done, then the new message.
    events: list[dict[str, Any]] = []
    ack: dict[str, Any] | None = None
    while ack is None or not events or events[-1]["seq"] < ack["seq"]:
        frame = await alice.receive()
        if frame["type"] == "ack":
            ack = frame
        elif frame["type"] == "event" and frame.get("seq") is not None:
            events.append(frame)
    done, message = events[-2:]
    assert (done["kind"], message["kind"]) == ("reply.done", "message")
    assert message["seq"] == ack["seq"] == done["seq"] + 1
    assert done["data"]["run"] == old_id
    assert done["data"]["status"] == "cancelled"
    assert done["data"]["text"] == "Once upon"
    assert done["seq"] < ack["seq"]

    new_id = run_of(r, "alice", "m2")
    options = json.loads(as_text(r.hget(keys.run(new_id), "options")))
    assert options["interrupted"] == [
        {"run": old_id, "message": "tell me a story", "text": "Once upon", "truncated": False}
    ]
    assert as_text(r.hget(keys.run(old_id), "final_status")) == "cancelled"
    # Exactly one terminal event: the worker's own finish is refused.
    assert await store.finalize(run, "ok") is False


async def test_interrupt_never_touches_another_clients_run(
    connect: Connect, r: redis.Redis
) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await send(bob, "b1", "bob's question")
    bobs = run_of(r, "bob", "b1")
    await send(alice, "m1", "alice's", interrupt=True)
    assert r.hget(keys.run(bobs), "status") != b"done"
    options = json.loads(as_text(r.hget(keys.run(run_of(r, "alice", "m1")), "options")))
    assert "interrupted" not in options


async def test_a_client_cannot_forge_interrupted_context(connect: Connect, r: redis.Redis) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hi", interrupted=[{"run": "r1", "text": "forged"}])
    options = json.loads(as_text(r.hget(keys.run(run_of(r, "alice", "m1")), "options")))
    assert "interrupted" not in options


async def test_interrupt_must_be_a_boolean(connect: Connect) -> None:
    alice = await connect("alice")
    await alice.send(
        {
            "type": "send",
            "id": "m1",
            "stream": "room",
            "agent": "echo",
            "text": "hi",
            "options": {"interrupt": "yes"},
        }
    )
    error = await alice.next_of("error")
    assert error["code"] == "bad_request"
    assert error["detail"] == "'options.interrupt' must be true or false"


async def test_joining_at_the_head_mid_reply_gets_only_its_snapshot_then_live_events(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    await store.append_delta(run, "one ")
    await alice.send({"type": "publish", "id": "p1", "stream": "room", "data": {"n": 1}})
    await alice.next_of("ack")
    last = await store.append_delta(run, "two ")

    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room", "compact": True})
    subscribed = await reader.next_of("subscribed")
    assert (subscribed["head"], subscribed["recovered"]) == (last, False)
    [snapshot] = await reader.events("room", 1)
    assert (snapshot["kind"], snapshot["seq"]) == ("reply.snapshot", last)
    assert snapshot["data"] == {"run": run.run_id, "offset": 0, "text": "one two "}
    assert await reader.nothing_more()  # not the message nor the published event

    live = await store.append_delta(run, "three")
    [delta] = await reader.events("room", 1)
    assert (delta["seq"], delta["data"]["offset"]) == (live, len("one two "))


async def test_joining_at_the_head_after_the_reply_finished_gets_nothing_before_it(
    connect: Connect, r: redis.Redis
) -> None:
    alice = await connect("alice")
    await send(alice, "m1", "hello")
    store, run = await claimed(run_of(r, "alice", "m1"))
    await store.append_delta(run, "all")
    await store.finalize(run, "ok")

    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room", "compact": True})
    assert (await reader.next_of("subscribed"))["head"] == 3
    assert await reader.nothing_more()
