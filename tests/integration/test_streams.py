"""Streams: publish fan-out, duplicates, tenant isolation, recovery with `since`,
history_expired, unsubscribe, presence and receipts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .conftest import (
    OTHER_TENANT,
    SMALL_RETENTION,
    SMALL_TENANT,
    TENANT,
    Connect,
    Switchboard,
)
from .support import collect_run, reply_text, split_run, take, wait_until

pytestmark = pytest.mark.asyncio


async def test_publish_fans_out_to_every_subscriber_in_order(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("fanout")
    subscribers = [await connect() for _ in range(3)]
    for subscriber in subscribers:
        subscribed = await subscriber.subscribe(stream)
        assert subscribed == {
            "type": "subscribed",
            "stream": stream,
            "head": 0,
            "recovered": False,
        }
    publisher = await connect(client="publisher")
    acks = [await publisher.publish(stream, {"n": n, "nested": [n, {"k": "v"}]}) for n in range(5)]
    assert [ack["seq"] for ack in acks] == [1, 2, 3, 4, 5]
    # Read through the async iterator as well as next_event.
    iterated = []
    async for event in subscribers[0].events(stream):
        iterated.append(event)
        if len(iterated) == 5:
            break
    for subscriber in subscribers:
        events = iterated if subscriber is subscribers[0] else await take(subscriber, stream, 5)
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        assert [e["id"] for e in events] == [ack["event_id"] for ack in acks]
        assert [e["data"] for e in events] == [
            {"n": n, "nested": [n, {"k": "v"}]} for n in range(5)
        ]
        assert all(e["kind"] == "published" for e in events)
        assert all(e["from"] == "client:publisher" for e in events)
        assert [e["cause"]["message"] for e in events] == [ack["id"] for ack in acks]
        assert subscriber.seq_anomalies == []
        assert subscriber.last_seq(stream) == 5


@pytest.mark.parametrize("data", [None, 0, "text", [1, 2], {"deep": {"er": [True, None]}}])
async def test_publish_carries_any_json(
    connect: Connect, unique: Callable[[str], str], data: object
) -> None:
    stream = unique("json")
    subscriber = await connect()
    await subscriber.subscribe(stream)
    publisher = await connect()
    await publisher.publish(stream, data)
    assert (await subscriber.next_event(stream))["data"] == data


async def test_duplicate_publish_gets_the_original_ack_and_appends_nothing(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("dup-publish")
    subscriber = await connect()
    await subscriber.subscribe(stream)
    publisher = await connect()
    first = await publisher.publish(stream, {"v": 1}, id="p-1")
    again = await publisher.publish(stream, {"v": 2}, id="p-1")
    assert first["duplicate"] is False
    assert again == {**first, "duplicate": True}
    marker = await publisher.publish(stream, {"marker": True}, id="p-2")
    assert marker["seq"] == first["seq"] + 1
    events = await take(subscriber, stream, 2)
    assert [e["data"] for e in events] == [{"v": 1}, {"marker": True}]


async def test_tenants_sharing_a_stream_name_see_nothing_of_each_other(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("shared-name")
    # Same client id and stream name in both tenants: only the tenant tells them apart.
    acme = await connect(client="twin", tenant=TENANT, name="Acme twin")
    globex = await connect(client="twin", tenant=OTHER_TENANT, name="Globex twin")
    await acme.subscribe(stream)
    await globex.subscribe(stream)

    for n in range(3):
        await acme.publish(stream, {"acme": n})
    ack = await acme.send(stream, "echo", "acme only")
    reply = await acme.reply(ack["id"])
    assert reply_text(*reply) == "acme only"

    # Everything above is appended and announced; globex's next event is its own.
    own = await globex.publish(stream, {"globex": 1})
    assert own["seq"] == 1, "each tenant's stream has its own seq"
    event = await globex.next_event(stream)
    assert event["data"] == {"globex": 1}
    assert globex.buffered(stream) == []

    history = await globex.subscribe(stream, since=0)
    assert history["head"] == 1
    assert (await globex.next_event(stream))["data"] == {"globex": 1}

    assert await globex.presence(stream) == [{"client": "twin", "name": "Globex twin"}]
    assert await acme.presence(stream) == [{"client": "twin", "name": "Acme twin"}]


async def test_subscribe_since_recovers_exactly_the_missed_events_then_live(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("recover")
    publisher = await connect()
    reader = await connect(client="reader")
    await reader.subscribe(stream)
    await publisher.publish(stream, {"n": 1})
    assert (await reader.next_event(stream))["seq"] == 1
    seen = reader.last_seq(stream)
    await reader.close()

    missed = [await publisher.publish(stream, {"n": n}) for n in (2, 3, 4)]
    back = await connect(client="reader")
    subscribed = await back.subscribe(stream, since=seen)
    assert subscribed == {"type": "subscribed", "stream": stream, "head": 4, "recovered": True}
    recovered = await take(back, stream, 3)
    assert [e["seq"] for e in recovered] == [2, 3, 4]
    assert [e["id"] for e in recovered] == [ack["event_id"] for ack in missed]
    live = await publisher.publish(stream, {"n": 5})
    assert (await back.next_event(stream))["id"] == live["event_id"]
    assert back.buffered(stream) == []
    assert back.seq_anomalies == []


async def test_subscribe_since_head_and_since_zero(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("since-edges")
    publisher = await connect()
    for n in range(3):
        await publisher.publish(stream, {"n": n})
    at_head = await connect()
    assert (await at_head.subscribe(stream, since=3))["recovered"] is True
    everything = await connect()
    assert (await everything.subscribe(stream, since=0))["head"] == 3
    assert [e["seq"] for e in await take(everything, stream, 3)] == [1, 2, 3]
    await publisher.publish(stream, {"n": 3})
    assert (await at_head.next_event(stream))["seq"] == 4
    assert (await everything.next_event(stream))["seq"] == 4


async def test_recovery_during_a_run_assembles_the_final_text(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("recover-run")
    sender = await connect()
    ack = await sender.send(stream, "echo", "a reply read in two halves", options={"chunks": 6})
    events = await collect_run(sender, stream, ack["id"])
    late = await connect()
    await late.subscribe(stream, since=ack["seq"] + 2)
    tail = await collect_run(late, stream, ack["id"])
    assert tail == events[3:]
    assert reply_text(*split_run(events[:3] + tail, ack["id"])) == "a reply read in two halves"


async def _publish_many(client, stream: str, count: int) -> None:  # type: ignore[no-untyped-def]
    await asyncio.gather(*(client.publish(stream, {"i": i}) for i in range(count)))


async def test_since_older_than_the_retained_window_is_history_expired(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("expire")
    publisher = await connect(tenant=SMALL_TENANT)
    assert publisher.welcome["limits"]["stream_retention"] == SMALL_RETENTION
    probe = await connect(tenant=SMALL_TENANT)

    async def trimmed() -> dict | None:
        # Redis trims a stream in whole nodes ("MAXLEN ~"): publish until seq 2 is gone.
        await _publish_many(publisher, stream, 50)
        answer = await probe.subscribe(stream, since=1)
        return answer if "history_expired" in answer else None

    answer = await wait_until(trimmed, 30, "the stream to be trimmed", interval=0)
    expired = answer["history_expired"]
    assert expired["code"] == "history_expired" and expired["status"] == 410
    assert expired["stream"] == stream
    assert answer["recovered"] is False
    head = answer["head"]
    assert expired["head"] == head

    # Whatever the approximation, the newest `retention` events are always there.
    reader = await connect(tenant=SMALL_TENANT)
    since = head - SMALL_RETENTION
    recovered = await reader.subscribe(stream, since=since)
    assert recovered["recovered"] is True and "history_expired" not in recovered
    events = await take(reader, stream, SMALL_RETENTION)
    assert [e["seq"] for e in events] == list(range(since + 1, head + 1))

    # After history_expired the client goes on from head: live events follow with no gap.
    live = await publisher.publish(stream, {"live": True})
    for client in (probe, reader):
        event = await client.next_event(stream)
        while event["seq"] < live["seq"]:  # the probe also hears the trimming rounds
            event = await client.next_event(stream)
        assert event["id"] == live["event_id"]
    assert reader.seq_anomalies == []


async def test_run_events_honour_the_tenants_retention(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("expire-run")
    client = await connect(tenant=SMALL_TENANT)

    async def trimmed() -> dict | None:
        # A reply's pieces are coalesced (a few deltas per run): runs until seq 1 is gone.
        ack = await client.send(stream, "echo", "x" * 400, options={"chunks": 400})
        await client.reply(ack["id"])
        answer = await client.subscribe(stream, since=1)
        return answer if "history_expired" in answer else None

    await wait_until(trimmed, 30, "the run events to be trimmed", interval=0)


async def test_unsubscribe_stops_delivery(connect: Connect, unique: Callable[[str], str]) -> None:
    stream, marker_stream = unique("unsub"), unique("unsub-marker")
    reader = await connect()
    await reader.subscribe(stream)
    await reader.subscribe(marker_stream)
    publisher = await connect()
    await publisher.publish(stream, {"before": True})
    assert (await reader.next_event(stream))["data"] == {"before": True}
    assert await reader.unsubscribe(stream) == {"type": "unsubscribed", "stream": stream}
    await publisher.publish(stream, {"after": True})
    # Both streams reach this gateway over one ordered channel, so once the marker,
    # published later, has arrived, the unsubscribed stream's event would have too.
    await publisher.publish(marker_stream, {"marker": True})
    assert (await reader.next_event(marker_stream))["data"] == {"marker": True}
    assert reader.buffered(stream) == []
    assert await reader.presence(stream) == []


async def test_presence_lists_subscribed_clients(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("presence")
    alice = await connect(client="alice", name="Alice")
    await alice.subscribe(stream)
    anonymous = await connect(client="anon")
    await anonymous.send(stream, "echo", "sending subscribes too")
    observer = await connect()
    clients = await observer.presence(stream)
    assert sorted(clients, key=lambda c: c["client"]) == [
        {"client": "alice", "name": "Alice"},
        {"client": "anon", "name": None},
    ]
    await alice.close()

    async def alice_gone() -> bool:
        return [c["client"] for c in await observer.presence(stream)] == ["anon"]

    await wait_until(alice_gone, 10, "alice to leave presence")


async def test_receipt_is_recorded_and_answers_nothing(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("receipt")
    client = await connect(client="receiver")
    await client.subscribe(stream)
    await client.publish(stream, {"n": 1})
    event = await client.next_event(stream)
    await client.receipt(stream, event["seq"])
    await client.ping()  # the server handles frames in order: the receipt is done
    assert client.unread_frames() == []
    stored = switchboard.redis().hget(
        f"{switchboard.key_prefix}:s:{{{TENANT}}}:{stream}:receipts", "receiver"
    )
    assert stored == str(event["seq"]).encode()
