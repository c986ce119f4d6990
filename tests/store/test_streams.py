"""The gateway's StreamStore (streams/log.py) and its Lua scripts on a real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
import redis
from django.conf import settings
from pytest_django.fixtures import Settings

import agents
from realtime.protocol import Publish, Send
from streams import keys
from streams import log as streams_module
from streams.enqueue import RUN_NEXT_TASK, RUN_STEP_TASK, RUNS_QUEUE
from streams.log import StreamStore
from streams.runs import RunStore
from tests.store.conftest import CLIENT, TENANT, Streams, count_pipelines, log_events

TRICKY_DATA = {
    "text": 'quote " backslash \\ newline \n nul \x00 é 中 🎉 \u2028',
    "list": [1, 2.5, None, True],
}


def next_message(pubsub: redis.client.PubSub, timeout: float = 5.0) -> str:
    """The next published notification on the subscribed channel (waits, never sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message is not None and message["type"] == "message":
            return message["data"].decode()
    raise AssertionError("no notification published")


def subscribed(r: redis.Redis, stream: str, tenant: str = TENANT) -> redis.client.PubSub:
    pubsub = r.pubsub()
    pubsub.subscribe(keys.stream_channel(tenant, stream))
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


def test_channels_name_the_test_database(store_redis_url: str) -> None:
    database = redis.connection.parse_url(store_redis_url).get("db", 0)
    assert keys.stream_channel("acme", "room") == f"{keys.PREFIX}:{database}:e:{{acme}}:room"


def test_publish_assigns_gapless_seqs_per_tenant_and_stream(
    streams: Streams, r: redis.Redis
) -> None:
    got: dict[tuple[str, str], list[int]] = {}
    for index in range(12):
        tenant = ("acme", "globex")[index % 2]
        stream = ("a", "b", "a")[index % 3]
        appended = streams.publish(stream, f"m{index}", {"n": index}, tenant=tenant)
        assert not appended.duplicate
        got.setdefault((tenant, stream), []).append(appended.seq)
    for (tenant, stream), seqs in got.items():
        assert seqs == list(range(1, len(seqs) + 1))
        assert streams.run(lambda store, t=tenant, s=stream: store.head(t, s)) == len(seqs)
        assert [event["seq"] for event in log_events(r, stream, tenant)] == seqs


def test_concurrent_publishes_get_distinct_gapless_seqs(streams: Streams, r: redis.Redis) -> None:
    async def many(store: StreamStore) -> list[Any]:
        frames = [Publish(f"m{index}", "busy", index) for index in range(60)]
        return await asyncio.gather(*(store.publish(TENANT, CLIENT, frame) for frame in frames))

    appended = streams.run(many)
    assert sorted(item.seq for item in appended) == list(range(1, 61))
    events = log_events(r, "busy")
    assert [event["seq"] for event in events] == list(range(1, 61))
    by_seq = {item.seq: item.event_id for item in appended}
    assert all(event["id"] == by_seq[event["seq"]] for event in events)


def test_duplicate_publish_returns_the_original_and_appends_nothing(
    streams: Streams, r: redis.Redis
) -> None:
    first = streams.publish("room", "m-1", {"v": 1})
    again = streams.publish("room", "m-1", {"v": 2})
    assert (again.seq, again.event_id, again.duplicate) == (first.seq, first.event_id, True)
    events = log_events(r, "room")
    assert len(events) == 1
    assert events[0]["data"] == {"v": 1}
    ttl = r.ttl(keys.client_message(TENANT, CLIENT, "m-1"))
    assert 0 < ttl <= settings.SWITCHBOARD["DEDUPE_TTL_S"]


def test_message_ids_are_per_client_and_per_tenant(streams: Streams) -> None:
    assert streams.publish("room", "m-1").seq == 1
    assert not streams.publish("room", "m-1", client="bob").duplicate
    assert not streams.publish("room", "m-1", tenant="globex").duplicate
    # A client id that ends like another's key prefix must not collide with it.
    assert not streams.publish("room", "1:m-1", client="alice:1").duplicate
    assert streams.publish("room", "m-1").duplicate


def test_duplicate_publishes_no_notification(streams: Streams, r: redis.Redis) -> None:
    pubsub = subscribed(r, "room")
    try:
        streams.publish("room", "m-1", "first")
        assert next_message(pubsub).startswith("1\n")
        streams.publish("room", "m-1", "again")
        streams.publish("room", "m-2", "second")
        # Notifications arrive in order, so the duplicate would have come before this one.
        assert next_message(pubsub).startswith("2\n")
    finally:
        pubsub.close()


def test_stored_text_is_the_published_notification(streams: Streams, r: redis.Redis) -> None:
    pubsub = subscribed(r, "room/1")
    try:
        streams.publish("room/1", "warmup")
        next_message(pubsub)
        appended = streams.publish("room/1", 'id"with\\quotes', TRICKY_DATA)
        notification = next_message(pubsub)
    finally:
        pubsub.close()
    seq_text, _, event_text = notification.partition("\n")
    assert int(seq_text) == appended.seq == 2
    [(_, fields)] = r.xrange(keys.stream_log(TENANT, "room/1"), min="2-0", max="2-0")
    assert fields[b"e"].decode() == event_text  # stored once, sent as is: never re-encoded
    event = json.loads(event_text)
    assert event == {
        "type": "event",
        "stream": "room/1",
        "seq": 2,
        "id": appended.event_id,
        "kind": "published",
        "from": f"client:{CLIENT}",
        "cause": {"client": CLIENT, "message": 'id"with\\quotes', "prev": None},
        "ts": event["ts"],
        "data": TRICKY_DATA,
    }


def test_retention_trims_old_events(streams: Streams, r: redis.Redis) -> None:
    # MAXLEN ~ trims whole stream nodes (100 entries by default): enough events that some
    # must go, while at least the retention window is always kept.
    total, retention = 250, 10
    for index in range(total):
        streams.publish("trimmed", f"m{index}", index, retention=retention)
    first = streams.run(lambda store: store.first_retained(TENANT, "trimmed"))
    assert first is not None and 1 < first <= total - retention + 1
    seqs = streams.read("trimmed", 1, total)
    assert seqs == list(range(first, total + 1))
    assert r.xlen(keys.stream_log(TENANT, "trimmed")) == len(seqs)
    assert streams.run(lambda store: store.head(TENANT, "trimmed")) == total


def test_read_returns_what_the_log_holds_across_pages(
    streams: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams_module, "READ_PAGE", 3)
    assert streams.read("empty", 1, 10) == []
    assert streams.run(lambda store: store.first_retained(TENANT, "empty")) is None
    assert streams.run(lambda store: store.head(TENANT, "empty")) == 0
    for index in range(10):
        streams.publish("paged", f"m{index}", index)
    assert streams.read("paged", 1, 10) == list(range(1, 11))
    assert streams.read("paged", 2, 9) == list(range(2, 10))
    assert streams.read("paged", 9, 50) == [9, 10]
    assert streams.read("paged", 5, 5) == [5]
    assert streams.read("paged", 6, 5) == []
    assert streams.read("paged", 11, 20) == []


def test_a_subscriptions_first_reads_made_together_share_a_pipeline(streams: Streams) -> None:
    """head_and_read: the head, and what follows `since` up to min(head, since + page);
    reads made together go in one pipeline, each with its own answer."""
    for index in range(10):
        streams.publish("opened", f"m{index}", index)

    async def together(store: StreamStore) -> tuple[list[Any], int]:
        pipelines = count_pipelines(store.client)
        answers = await asyncio.gather(
            store.head_and_read(TENANT, "opened", None, 4),
            store.head_and_read(TENANT, "opened", 3, 4),
            store.head_and_read(TENANT, "opened", 8, 4),
            store.head_and_read(TENANT, "opened", 10, 4),
            store.head_and_read(TENANT, "never", 0, 4),
        )
        return list(answers), len(pipelines)

    answers, pipelines = streams.run(together)
    assert [(head, [seq for seq, _ in events]) for head, events in answers] == [
        (10, []),
        (10, [4, 5, 6, 7]),
        (10, [9, 10]),
        (10, []),
        (0, []),
    ]
    assert json.loads(answers[1][1][0][1])["seq"] == 4
    assert pipelines == 1


def queued_messages(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in r.lrange(keys.celery_queue(RUNS_QUEUE), 0, -1)]


def message_args(message: dict[str, Any]) -> list[Any]:
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {}
    return args


def test_accept_send_creates_the_run_and_queues_one_task(streams: Streams, r: redis.Redis) -> None:
    before = time.time()
    appended = streams.send("room", "m-1", 'héllo "wörld" 🎉', options={"chunks": 2})
    assert (appended.seq, appended.duplicate) == (1, False)
    assert appended.run_id is not None
    run_id = appended.run_id

    [event] = log_events(r, "room")
    assert event["id"] == appended.event_id
    assert event["kind"] == "message"
    assert event["from"] == f"client:{CLIENT}"
    assert event["data"] == {"text": 'héllo "wörld" 🎉', "agent": "echo"}
    assert event["cause"] == {"client": CLIENT, "message": "m-1", "prev": None}

    run = {name.decode(): value.decode() for name, value in r.hgetall(keys.run(run_id)).items()}
    deadline = float(run.pop("deadline"))
    assert run.pop("retention") == str(settings.SWITCHBOARD["STREAM_RETENTION"])
    # Stored rounded to the millisecond: up to 0.5 ms either side of the true moment.
    assert before - 0.001 < float(run.pop("created")) <= time.time() + 0.001
    assert run == {
        "status": "queued",
        "emitted": "0",
        "attempt": "0",
        "message_seq": "1",
        "run": run_id,
        "tenant": TENANT,
        "stream": "room",
        "agent": "echo",
        "client": CLIENT,
        "message_id": "m-1",
        "message_event": appended.event_id,
        "text": 'héllo "wörld" 🎉',
        "options": '{"chunks":2}',
    }
    assert r.ttl(keys.run(run_id)) > settings.SWITCHBOARD["RUN_DEADLINE_S"]
    assert r.zscore(keys.run_deadlines(keys.tenant_of_run(run_id)), run_id) == pytest.approx(
        deadline, abs=0.001
    )

    # The run waits in its tenant's fair queue; the message is a ticket for the next run.
    [message] = queued_messages(r)
    assert message["headers"]["task"] == RUN_NEXT_TASK
    assert message_args(message) == []
    assert message["properties"]["delivery_info"]["routing_key"] == RUNS_QUEUE
    assert r.lrange(keys.fair_queue(TENANT), 0, -1) == [run_id.encode()]
    assert r.lrange(keys.FAIR_RING, 0, -1) == [TENANT.encode()]


def test_without_the_fair_queue_a_send_queues_its_own_step(
    streams: Streams, r: redis.Redis, settings: Settings
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "FAIR_QUEUE": False}
    appended = streams.send("room", "m-1", "hi")
    [message] = queued_messages(r)
    assert message["headers"]["task"] == RUN_STEP_TASK
    assert message_args(message) == [appended.run_id, 0]
    assert message["properties"]["delivery_info"]["routing_key"] == RUNS_QUEUE
    assert not r.exists(keys.fair_queue(TENANT), keys.FAIR_RING)


def test_send_records_the_retention_its_replies_use(streams: Streams, r: redis.Redis) -> None:
    frame = Send("m-1", "room", "echo", "hi", {}, None)
    echo = agents.get_agent("echo")
    appended = streams.run(lambda store: store.accept_send(TENANT, CLIENT, frame, echo, 7))
    assert r.hget(keys.run(appended.run_id or ""), "retention") == b"7"
    run = RunStore(r).claim(appended.run_id or "", 0)
    assert run is not None and run.retention == 7


def test_send_keeps_the_tenants_agent_overrides_with_its_run(
    streams: Streams, r: redis.Redis
) -> None:
    echo = agents.get_agent("echo")

    def send(message_id: str, config: dict[str, str] | None) -> bytes | None:
        frame = Send(message_id, "room", "echo", "hi", {}, None)
        appended = streams.run(
            lambda store: store.accept_send(TENANT, CLIENT, frame, echo, agent_config=config)
        )
        return r.hget(keys.run(appended.run_id or ""), "agent_cfg")  # type: ignore[return-value]

    overrides = {"model": "m", "api_key_env": "ACME_KEY"}
    assert json.loads(send("m-1", overrides) or "") == overrides
    # None and {} add nothing: runs without overrides look as they always did.
    assert send("m-2", None) is None
    assert send("m-3", {}) is None


def test_send_with_prev_names_its_causal_parent(streams: Streams, r: redis.Redis) -> None:
    streams.send("room", "m-1", "hi", prev="e-parent")
    assert log_events(r, "room")[0]["cause"]["prev"] == "e-parent"


def test_duplicate_send_starts_nothing(streams: Streams, r: redis.Redis) -> None:
    first = streams.send("room", "m-1", "hello")
    again = streams.send("room", "m-1", "hello again")
    assert (again.seq, again.event_id, again.duplicate) == (first.seq, first.event_id, True)
    assert again.run_id is None
    assert len(queued_messages(r)) == 1
    assert len(log_events(r, "room")) == 1
    assert first.run_id is not None
    runs = [key.decode() for key in r.scan_iter(match=keys.run_prefix(TENANT) + "*")]
    assert runs == [keys.run(first.run_id)]
    assert r.zcard(keys.run_deadlines(TENANT)) == 1


def test_send_reusing_a_publish_id_is_a_duplicate(streams: Streams, r: redis.Redis) -> None:
    published = streams.publish("room", "m-1", "data")
    sent = streams.send("room", "m-1", "hello")
    assert (sent.seq, sent.event_id, sent.duplicate, sent.run_id) == (
        published.seq,
        published.event_id,
        True,
        None,
    )
    assert queued_messages(r) == []


def test_messages_and_publishes_share_one_sequence(streams: Streams, r: redis.Redis) -> None:
    seqs = [
        streams.publish("room", "p1").seq,
        streams.send("room", "s1", "x").seq,
        streams.publish("room", "p2").seq,
        streams.send("room", "s2", "y").seq,
    ]
    assert seqs == [1, 2, 3, 4]
    assert [event["kind"] for event in log_events(r, "room")] == [
        "published",
        "message",
        "published",
        "message",
    ]
    # One ticket per send; the runs wait in the tenant's fair queue.
    assert [message["headers"]["task"] for message in queued_messages(r)] == [RUN_NEXT_TASK] * 2
    assert r.llen(keys.fair_queue(TENANT)) == 2
