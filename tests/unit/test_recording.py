"""Traffic recording in the gateway (realtime/recording.py): what is recorded, what is left
out, and what it costs when a tenant is not recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from realtime.protocol import (
    Cancel,
    Ping,
    Presence,
    Publish,
    Receipt,
    Send,
    Subscribe,
    Unsubscribe,
)
from realtime.recording import (
    FLUSH_S,
    RECHECK_S,
    Recorder,
    RecordingConfig,
    frame_record,
    label,
    sample_point,
)
from streams import keys

CONFIG = RecordingConfig(id="rec1", salt="salt", rate=1.0)
REDACTED = RecordingConfig(id="rec1", salt="salt", rate=1.0, redact_text=True)


def test_config_round_trips_and_bad_values_read_as_off() -> None:
    config = RecordingConfig(id="a", salt="b", rate=0.25, redact_text=True, max_len=10)
    assert RecordingConfig.loads(config.dumps()) == config
    assert RecordingConfig.loads(config.dumps().encode()) == config
    assert RecordingConfig.loads(None) is None
    assert RecordingConfig.loads(b"not json") is None
    assert RecordingConfig.loads(b'{"rate": 1}') is None


def test_sampling_is_per_connection_and_about_the_rate() -> None:
    points = [sample_point(f"{n:012x}") for n in range(4000)]
    assert all(0 <= p < 1 for p in points)
    share = sum(p < 0.1 for p in points) / len(points)
    assert 0.07 < share < 0.13
    assert sample_point("abc") == sample_point("abc")


def test_labels_are_stable_per_recording_and_hide_the_value() -> None:
    assert label("s1", "client:alice") == label("s1", "client:alice")
    assert label("s1", "client:alice") != label("s2", "client:alice")
    assert "alice" not in label("s1", "client:alice")


def test_frames_keep_their_fields_with_ids_hashed_and_prev_dropped() -> None:
    send = Send("m1", "room", "echo", "hello", {"chunks": 2}, "event-7")
    record = frame_record(send, CONFIG)
    assert record == {
        "type": "send",
        "id": label("salt", "msg:m1"),
        "stream": "room",
        "agent": "echo",
        "text": "hello",
        "options": {"chunks": 2},
    }
    # A cancel names its send by the same hashed id.
    assert frame_record(Cancel("m1"), CONFIG) == {"type": "cancel", "id": record["id"]}
    assert frame_record(Publish("p1", "room", {"a": 1}), CONFIG)["data"] == {"a": 1}
    assert frame_record(Subscribe("room", 5), CONFIG) == {
        "type": "subscribe",
        "stream": "room",
        "since": 5,
    }
    assert frame_record(Subscribe("room", None), CONFIG) == {"type": "subscribe", "stream": "room"}
    assert frame_record(Subscribe("room", 5, compact=True), CONFIG)["compact"] is True
    assert frame_record(Unsubscribe("room"), CONFIG) == {"type": "unsubscribe", "stream": "room"}
    assert frame_record(Receipt("room", 3), CONFIG) == {
        "type": "receipt",
        "stream": "room",
        "seq": 3,
    }
    assert frame_record(Presence("room"), CONFIG) == {"type": "presence", "stream": "room"}
    assert frame_record(Ping(), CONFIG) == {"type": "ping"}


def test_redaction_keeps_lengths_only() -> None:
    send = frame_record(Send("m1", "room", "echo", "secret words", {}, None), REDACTED)
    assert send["text"] == "x" * len("secret words")
    assert "options" not in send
    data = {"card": "4111"}
    published = frame_record(Publish("p1", "room", data), REDACTED)
    assert published["data"] == "x" * len(orjson.dumps(data))


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.reads = 0  # pipelines of switch reads
        self.added: list[tuple[str, dict[str, Any]]] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.queued: list[tuple[str, dict[str, Any]]] = []
        self.gets: list[str] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def xadd(self, key: str, fields: dict[str, Any], maxlen: int, approximate: bool) -> None:
        assert approximate and maxlen > 0
        self.queued.append((key, orjson.loads(fields["e"])))

    def get(self, name: str) -> None:
        self.gets.append(name)

    async def execute(self) -> list[Any]:
        self.redis.added.extend(self.queued)
        if not self.gets:
            return []
        self.redis.reads += 1
        return [self.redis.values.get(name) for name in self.gets]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    # Let the background refresh and flush tasks run (the flush waits FLUSH_S).
    await asyncio.sleep(FLUSH_S * 3)


def test_recorder_reads_the_switch_at_most_once_per_recheck_and_records_sampled_frames() -> None:
    redis, clock = FakeRedis(), Clock()

    async def scenario() -> None:
        recorder = Recorder(lambda: redis, clock)
        # Off: the first frame asks Redis once, in the background; later ones ask nothing.
        for _ in range(100):
            recorder.frame("acme", "alice", "conn1", Ping())
        await _settle()
        assert redis.reads == 1
        for _ in range(100):
            recorder.frame("acme", "alice", "conn1", Ping())
        await _settle()
        assert redis.reads == 1 and redis.added == []
        # record_traffic starts: seen after RECHECK_S at most.
        redis.values[keys.recording("acme")] = CONFIG.dumps().encode()
        clock.now += RECHECK_S
        recorder.frame("acme", "alice", "conn1", Ping())  # triggers the refresh
        await _settle()
        assert redis.reads == 2
        recorder.frame("acme", "alice", "conn1", Ping())
        recorder.opened("acme", "bob", "conn2", resumed=True)
        recorder.frame("acme", "bob", "conn2", Send("m1", "room", "echo", "hi", {}, None))
        recorder.closed("conn2", 1000)
        recorder.closed("conn1", 1006)
        await _settle()
        events = [entry for _, entry in redis.added]
        assert [key for key, _ in redis.added] == [keys.recording_log("acme")] * 5
        assert [e["event"] for e in events] == ["frame", "open", "frame", "close", "close"]
        assert {e["conn"] for e in events[1:4]} == {label("salt", "conn:conn2")}
        assert events[0]["conn"] == events[4]["conn"] == label("salt", "conn:conn1")
        assert events[1]["client"] == label("salt", "client:bob")
        assert events[1]["resumed"] is True
        assert events[2]["frame"]["text"] == "hi"
        assert (events[3]["code"], events[4]["code"]) == (1000, 1006)
        assert all(e["rec"] == "rec1" and e["ts"] > 0 for e in events)
        assert "alice" not in str(events) and "bob" not in str(events)
        # record_traffic ends: frames stop being recorded once it is seen. The frame that
        # finds the view stale still goes by it (record_traffic drops entries stamped
        # after its stop).
        del redis.values[keys.recording("acme")]
        clock.now += RECHECK_S
        recorder.frame("acme", "carol", "conn3", Ping())
        await _settle()
        assert len(redis.added) == 6
        recorder.frame("acme", "carol", "conn3", Ping())
        recorder.closed("conn3", 1000)
        await _settle()
        assert len(redis.added) == 6 and redis.reads == 3

    asyncio.run(scenario())


@pytest.mark.parametrize("rate, recorded", [(0.0001, False), (1.0, True)])
def test_recorder_samples_whole_connections(rate: float, recorded: bool) -> None:
    redis, clock = FakeRedis(), Clock()
    config = RecordingConfig(id="r", salt="s", rate=rate)
    redis.values[keys.recording("acme")] = config.dumps().encode()

    async def scenario() -> int:
        recorder = Recorder(lambda: redis, clock)
        recorder.frame("acme", "alice", "conn-x", Ping())
        await _settle()
        for _ in range(3):
            recorder.frame("acme", "alice", "conn-x", Ping())
        recorder.closed("conn-x", 1000)
        await _settle()
        return len(redis.added)

    expected = 4 if recorded else 0  # three frames and the close, or nothing
    if not recorded:
        assert sample_point("conn-x") >= rate
    assert asyncio.run(scenario()) == expected
