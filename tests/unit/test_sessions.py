"""The pure parts of sessions: what a position is when frames are still buffered, and what
a checkpoint must write."""

from __future__ import annotations

import orjson

from realtime.reconnecting import backoff_delay
from realtime.sessions import delivered_positions, position_changes, undelivered_floor


def event(stream: str, seq: int | None, kind: str = "published") -> str:
    body = {"type": "event", "stream": stream, "kind": kind, "data": {}}
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body).decode()


def test_the_floor_is_the_lowest_buffered_seq_of_each_stream() -> None:
    frames = [
        '{"type":"ack","id":"m1","event_id":"e","seq":3,"duplicate":false}',
        event("a", 7),
        event("b", 2),
        event("a", 8),
        event("a", None, kind="join"),  # no seq: says nothing of positions
        '{"type":"pong"}',
    ]
    assert undelivered_floor(frames) == {"a": 7, "b": 2}


def test_buffered_events_hold_a_position_back_to_just_before_them() -> None:
    cursors = {"a": 8, "b": 5, "c": 4}
    assert delivered_positions(cursors, {"a": 7, "b": 2}) == {"a": 6, "b": 1, "c": 4}


def test_a_buffered_event_of_a_stream_no_longer_subscribed_changes_nothing() -> None:
    assert delivered_positions({"a": 3}, {"gone": 1}) == {"a": 3}


def test_changes_are_new_or_moved_positions_and_streams_left() -> None:
    saved = {"a": 3, "b": 5, "old": 9}
    current = {"a": 3, "b": 6, "new": 0}
    assert position_changes(saved, current) == ({"b": 6, "new": 0}, ["old"])


def test_nothing_changed_means_nothing_to_write() -> None:
    assert position_changes({"a": 1}, {"a": 1}) == ({}, [])


def test_backoff_is_full_jitter_capped() -> None:
    delays = [backoff_delay(attempt, 0.1, 2.0) for attempt in range(12) for _ in range(50)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert max(backoff_delay(0, 0.1, 2.0) for _ in range(200)) <= 0.1
    assert max(delays) > 1.0  # the cap is reached, not just the first step
