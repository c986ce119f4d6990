"""`send` and its run: ack, the message event, streamed deltas, exactly one reply.done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from client.connection import Event, SwitchboardError

from .conftest import SOFT_LIMIT_S, Connect, Switchboard
from .support import (
    assert_contiguous,
    collect_run,
    reply_text,
    split_run,
    ts,
)

pytestmark = pytest.mark.asyncio

FALLBACK_TEXT = "Sorry, the assistant could not answer in time. Please try again."
FAILURE_WAIT_S = SOFT_LIMIT_S + 15

# Pieces this far apart are appended one delta each: joining two would take a 100 ms
# stall of the worker against the coalescing window (DELTA_FLUSH_MS, 50 ms). Seven of them
# still fit the test cluster's 1.5 s soft limit.
PIECE_GAP_MS = 150


async def test_echo_round_trip_streams_the_reply(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect(client="echo-user")
    stream = unique("room")
    text = 'Hello, Switchboard! Ünïcödé ✓ and "quotes" \\ too.'
    ack = await client.send(stream, "echo", text, options={"chunks": 4}, id="m-1")
    assert ack == {
        "type": "ack",
        "id": "m-1",
        "event_id": ack["event_id"],
        "seq": ack["seq"],
        "duplicate": False,
    }
    assert isinstance(ack["event_id"], str) and ack["event_id"]
    assert ack["seq"] == 1, "a new stream starts at seq 1"

    events = await collect_run(client, stream, "m-1")
    assert_contiguous(events)
    message, deltas, done = events[0], events[1:-1], events[-1]
    assert message["type"] == "event"
    assert message["stream"] == stream
    assert message["kind"] == "message"
    assert message["seq"] == ack["seq"]
    assert message["id"] == ack["event_id"]
    assert message["from"] == "client:echo-user"
    assert message["cause"] == {"client": "echo-user", "message": "m-1", "prev": None}
    assert message["data"] == {"text": text, "agent": "echo"}
    ts(message)  # ISO 8601

    # Four pieces at once: the first is appended on its own, the rest coalesced.
    assert 2 <= len(deltas) < 4
    for event in (*deltas, done):
        assert event["from"] == "agent:echo"
        assert event["cause"] == {"client": "echo-user", "message": "m-1", "prev": message["id"]}
        assert event["stream"] == stream
    assert reply_text(deltas, done) == text
    assert done["kind"] == "reply.done"
    assert done["data"]["status"] == "ok"
    assert done["data"]["run"].startswith("r")

    # The client's reply collector saw the same run.
    collected_deltas, collected_done = await client.reply("m-1", timeout=1)
    assert collected_deltas == deltas and collected_done == done

    # Exactly one reply.done: the next event appended to the stream comes right after it.
    marker = await client.publish(stream, {"marker": True})
    assert marker["seq"] == done["seq"] + 1
    assert (await client.next_event(stream))["seq"] == marker["seq"]
    assert client.seq_anomalies == []


@pytest.mark.parametrize(
    ("text", "chunks", "expected_pieces"),
    [("abcdefghijklmnopqrstuvwxyz0123", 7, 7), ("abc", 10, 3), ("one piece", 1, 1)],
)
async def test_chunks_option_sets_the_number_of_deltas(
    connect: Connect, unique: Callable[[str], str], text: str, chunks: int, expected_pieces: int
) -> None:
    client = await connect()
    stream = unique("chunks")
    # Pieces further apart than SWITCHBOARD_DELTA_FLUSH_MS (50) are not coalesced.
    options = {"chunks": chunks, "chunk_delay_ms": PIECE_GAP_MS}
    ack = await client.send(stream, "echo", text, options=options)
    deltas, done = await client.reply(ack["id"])
    assert len(deltas) == expected_pieces
    assert all(delta["data"]["text"] for delta in deltas), "no empty pieces"
    assert reply_text(deltas, done) == text


async def test_latency_option_delays_the_first_piece(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("latency")
    ack = await client.send(stream, "echo", "slow start", options={"latency_ms": 400})
    events = await collect_run(client, stream, ack["id"])
    message, first_delta = events[0], events[1]
    # A lower bound only (server timestamps): the backend cannot answer before its latency.
    assert ts(first_delta) - ts(message) >= timedelta(milliseconds=400)
    assert reply_text(*split_run(events, ack["id"])) == "slow start"


async def test_duplicate_send_gets_the_original_ack_and_starts_nothing(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect(client="dup-sender")
    stream = unique("dup")
    first = await client.send(stream, "echo", "only once", options={"latency_ms": 300}, id="d-1")
    # While the run is in flight, and with different content: the id alone decides.
    again = await client.send(stream, "echo", "something else", id="d-1")
    assert again == {**first, "duplicate": True}

    events = await collect_run(client, stream, "d-1")
    assert [e["kind"] for e in events].count("message") == 1
    deltas, done = split_run(events, "d-1")
    assert reply_text(deltas, done) == "only once"
    late = await client.send(stream, "echo", "only once", id="d-1")
    assert late == {**first, "duplicate": True}

    marker = await client.publish(stream, {"marker": True})
    assert marker["seq"] == done["seq"] + 1, "the duplicates appended nothing"
    assert (await client.next_event(stream))["seq"] == marker["seq"]

    # The message and its run are created in one script, so one run record means one run.
    db = switchboard.redis()
    runs = [
        key
        for key in db.scan_iter(match=f"{switchboard.key_prefix}:run:*", count=1000)
        if db.type(key) == b"hash"
        and db.hmget(key, "client", "message_id") == [b"dup-sender", b"d-1"]
    ]
    assert len(runs) == 1, runs


async def test_message_ids_are_per_client(connect: Connect, unique: Callable[[str], str]) -> None:
    stream = unique("ids")
    alice, bob = await connect(client="ids-alice"), await connect(client="ids-bob")
    first = await alice.send(stream, "echo", "from alice", id="same")
    second = await bob.send(stream, "echo", "from bob", id="same")
    assert not first["duplicate"] and not second["duplicate"]
    assert second["seq"] != first["seq"]
    assert reply_text(*await bob.reply("same")) == "from bob"
    assert reply_text(*await alice.reply("same")) == "from alice"


async def test_a_run_reaches_every_subscriber(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("shared-run")
    watchers = [await connect() for _ in range(2)]
    # One more that takes events through the callback instead of the buffer.
    called: list[Event] = []
    finished = asyncio.Event()

    def on_event(event: Event) -> None:
        called.append(event)
        if event["kind"] == "reply.done":
            finished.set()

    unbuffered = await connect(buffer_events=False, on_event=on_event)
    for watcher in (*watchers, unbuffered):
        await watcher.subscribe(stream)
    sender = await connect(client="run-sender")
    options = {"chunks": 3, "chunk_delay_ms": PIECE_GAP_MS}  # apart enough not to be coalesced
    ack = await sender.send(stream, "echo", "everyone sees this", options=options)
    sent = await collect_run(sender, stream, ack["id"])
    for watcher in watchers:
        seen = await collect_run(watcher, stream, ack["id"])
        assert seen == sent
        assert watcher.seq_anomalies == []
    assert len(sent) == 5 and sent[0]["seq"] == ack["seq"]
    async with asyncio.timeout(10):
        await finished.wait()
    assert called == sent
    assert unbuffered.buffered(stream) == []


async def test_prev_is_recorded_as_the_causal_parent(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("prev")
    first = await client.send(stream, "echo", "first")
    await client.reply(first["id"])
    second = await client.send(stream, "echo", "second", prev=first["event_id"])
    events = await collect_run(client, stream, second["id"])
    message = next(e for e in events if e["id"] == second["event_id"])
    assert message["cause"]["prev"] == first["event_id"]


async def test_cancel_ends_a_slow_run_as_cancelled(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("cancel")
    # Stalls for its whole soft limit, so the cancel lands while it is still running.
    ack = await client.send(stream, "echo", "never finished", options={"latency_ms": 600_000})
    await client.cancel(ack["id"])
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "cancelled"
    assert reply_text(deltas, done) == ""
    with pytest.raises(SwitchboardError) as finished:
        await client.cancel(ack["id"])
    assert finished.value.code == "bad_request"
    assert finished.value.frame["id"] == ack["id"]


async def test_cancel_of_an_unknown_id_is_not_found(connect: Connect) -> None:
    client = await connect()
    with pytest.raises(SwitchboardError) as unknown:
        await client.cancel("never-sent")
    assert (unknown.value.code, unknown.value.status) == ("not_found", 404)
    assert unknown.value.frame["id"] == "never-sent"
    assert (await client.ping())["type"] == "pong"


async def test_cancel_of_a_publish_is_refused(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    ack = await client.publish(unique("cancel-publish"), {"x": 1})
    with pytest.raises(SwitchboardError) as refused:
        await client.cancel(ack["id"])
    assert refused.value.code == "bad_request"


async def test_model_timeout_falls_back_to_a_degraded_reply(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("timeout")
    ack = await client.send(stream, "echo", "stalls", options={"fail": "timeout"})
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    assert done["data"]["detail"]["reason"] == "timeout"
    assert reply_text(deltas, done) == FALLBACK_TEXT
    # It waited for the soft limit before giving up (a lower bound: cannot flake).
    assert ts(done) - ts(events[0]) >= timedelta(seconds=SOFT_LIMIT_S)


async def test_persistent_model_error_degrades_after_retries(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("error")
    ack = await client.send(stream, "echo", "always fails", options={"fail": "error"})
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    assert done["data"]["detail"]["reason"] == "model_error"
    assert reply_text(deltas, done) == FALLBACK_TEXT


async def test_transient_model_error_is_retried_without_duplicating_text(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("error-once")
    text = "second time lucky"
    # Pieces apart enough not to be coalesced: each of the five is one delta.
    options = {"fail": "error_once", "chunks": 5, "chunk_delay_ms": PIECE_GAP_MS}
    ack = await client.send(stream, "echo", text, options=options)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == text
    assert len(deltas) == 5


async def test_concurrent_runs_on_one_stream_each_get_one_done(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("many")
    texts = [f"message number {n}" for n in range(6)]
    acks = [await client.send(stream, "echo", text, options={"chunks": 3}) for text in texts]
    last = acks[-1]["seq"]
    events = []
    pending = {ack["id"] for ack in acks}
    while pending:
        event = await client.next_event(stream, timeout=15)
        events.append(event)
        if event["kind"] == "reply.done":
            pending.discard(event["cause"]["message"])
    assert_contiguous(events)
    assert events[0]["seq"] == acks[0]["seq"] and last in [e["seq"] for e in events]
    for ack, text in zip(acks, texts, strict=True):
        assert reply_text(*split_run(events, ack["id"])) == text
    assert client.seq_anomalies == []
