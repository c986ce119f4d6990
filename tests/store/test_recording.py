"""Traffic recording against a real Redis: the gateway's Recorder appends what the
recorder (`record_traffic`'s TrafficRecorder) switched on, and the recorder copies it into
a trace and switches it off."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest
import redis
import redis.asyncio as aredis

from loadtest.record import LEASE_S, RecordingBusy, TrafficRecorder, new_config
from loadtest.trace import read_trace
from realtime.protocol import Ping, Send
from realtime.recording import FLUSH_S, Recorder
from streams import keys

TENANT = "acme"


def gateway_traffic(url: str, frames: int) -> None:
    """A gateway process's recorder seeing one connection open, send and close."""

    async def main() -> None:
        client = aredis.Redis.from_url(url)
        recorder = Recorder(lambda: client)
        try:
            recorder.frame(TENANT, "alice", "conn-1", Ping())  # learns the switch
            for _ in range(50):
                await asyncio.sleep(0.01)
                if recorder.config(TENANT) is not None:
                    break
            recorder.opened(TENANT, "bob", "conn-2", resumed=False)
            for n in range(frames):
                recorder.frame(
                    TENANT, "bob", "conn-2", Send(f"m{n}", "room", "echo", "hi", {}, None)
                )
            recorder.closed("conn-2", 1000)
            await asyncio.sleep(FLUSH_S * 4)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_recording_is_copied_into_a_trace_and_switched_off(
    r: redis.Redis, store_redis_url: str
) -> None:
    out = io.StringIO()
    recorder = TrafficRecorder(r, TENANT, new_config(1.0, False, 1000), out)
    recorder.start()
    assert 0 < r.pttl(keys.recording(TENANT)) <= LEASE_S * 1000
    # A gateway that has not yet seen an earlier recording end: its entries are skipped.
    stale = {"rec": "older", "event": "frame", "ts": 0, "conn": "c", "frame": {"type": "ping"}}
    r.xadd(keys.recording_log(TENANT), {"e": orjson.dumps(stale)})
    with pytest.raises(RecordingBusy):
        TrafficRecorder(r, TENANT, new_config(1.0, False, 1000), io.StringIO()).start()

    gateway_traffic(store_redis_url, frames=3)
    result = recorder.run(duration_s=30, max_frames=3, should_stop=lambda: False)

    assert result.stopped_by == "frames" and result.frames == 3 and result.dropped_other == 1
    assert not r.exists(keys.recording(TENANT)), "the switch is off"
    assert not r.exists(keys.recording_log(TENANT)), "the stream is freed"
    trace = read_trace(out.getvalue().splitlines())
    assert trace.header["tenant"] == TENANT
    (bob,) = trace.connections
    assert [frame["type"] for _, frame in bob.frames] == ["send"] * 3
    assert "alice" not in out.getvalue() and "bob" not in out.getvalue()


def test_a_stopped_recording_keeps_what_came_before_the_stop(
    r: redis.Redis, store_redis_url: str
) -> None:
    out = io.StringIO()
    recorder = TrafficRecorder(r, TENANT, new_config(1.0, True, 1000), out)
    recorder.start()
    gateway_traffic(store_redis_url, frames=2)
    result = recorder.run(duration_s=None, max_frames=None, should_stop=lambda: True)
    assert result.stopped_by == "signal"
    trace = read_trace(out.getvalue().splitlines())
    (bob,) = trace.connections
    assert [frame["text"] for _, frame in bob.frames] == ["xx", "xx"]  # redacted
    assert bob.closed_at is not None and bob.close_code == 1000
    assert not r.exists(keys.recording(TENANT))
