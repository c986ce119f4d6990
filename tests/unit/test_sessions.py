"""The pure parts of sessions: what a position is when frames are still buffered, what
a checkpoint must write, and which resume positions are refused."""

from __future__ import annotations

import base64

import orjson
import pytest

from client.connection import encode_positions
from client.reconnecting import backoff_delay
from realtime.sessions import (
    BadPositions,
    delivered_positions,
    parse_positions,
    position_changes,
    resume_problem,
    undelivered_floor,
)


def encode_raw(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


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


# --- resume positions ------------------------------------------------------------------


def test_positions_round_trip_from_the_clients_encoding() -> None:
    raw = encode_positions({"room": 7, "a/b+c": 0})
    assert "=" not in raw
    assert parse_positions(raw, 64 * 1024) == {"room": 7, "a/b+c": 0}
    assert parse_positions(encode_positions({}), 64 * 1024) == {}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "not base64url"),
        ("e30=", "not base64url"),  # padded
        ("a+b/", "not base64url"),  # plain base64's alphabet
        ("abcde", "not base64url"),  # no base64 is 4n + 1 long
        (base64.urlsafe_b64encode(b"not json").decode().rstrip("="), "not a JSON object"),
        (encode_raw(b"[1, 2]"), "must be a JSON object"),
        (encode_raw(b'{"room": -1}'), "non-negative integer"),
        (encode_raw(b'{"room": 1.5}'), "non-negative integer"),
        (encode_raw(b'{"room": true}'), "non-negative integer"),
        (encode_raw(b'{"room": "3"}'), "non-negative integer"),
        (encode_raw(b'{"room": 99999999999999999999999}'), "non-negative integer"),
        (encode_raw(b'{"bad name": 1}'), "invalid stream"),
        (encode_raw(b'{"": 1}'), "invalid stream"),
        (encode_raw('{"caf\u00e9 \u2603": 1}'.encode()), r"invalid stream 'caf\\xe9 \\u2603'"),
    ],
)
def test_malformed_positions_are_refused_naming_the_problem(raw: str, problem: str) -> None:
    with pytest.raises(BadPositions, match=problem):
        parse_positions(raw, 64 * 1024)


def test_positions_longer_than_the_frame_limit_are_refused_before_decoding() -> None:
    raw = encode_positions({f"stream-{i}": i for i in range(200)})
    assert parse_positions(raw, len(raw)) is not None
    with pytest.raises(BadPositions, match="frame limit"):
        parse_positions(raw, len(raw) - 1)
    with pytest.raises(BadPositions, match="frame limit"):
        parse_positions("!" * 100, 99)  # the length alone decides


def test_a_resume_problem_names_a_stream_not_held_or_a_position_beyond_its_head() -> None:
    held = {"room": 3, "other": 1}
    assert resume_problem({"room": 5}, held, {"room": 5}) is None
    assert resume_problem({}, held, {}) is None
    not_held = resume_problem({"elsewhere": 1}, held, {})
    assert not_held is not None and "does not hold" in not_held.detail
    assert not_held.extra == {"stream": "elsewhere"}
    beyond = resume_problem({"room": 6}, held, {"room": 5})
    assert beyond is not None and "beyond its head (5)" in beyond.detail
    assert beyond.extra == {"stream": "room", "head": 5}
    # A stream left unchecked (the token no longer allows it) is not judged by its head.
    assert resume_problem({"other": 9}, held, {}) is None
