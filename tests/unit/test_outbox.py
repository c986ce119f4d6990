"""A connection's outbound buffer (realtime/outbox.py): bounded in frames and in bytes."""

from __future__ import annotations

import pytest

from realtime.outbox import Outbox, OutboxFull


def test_empty_outbox() -> None:
    outbox = Outbox(max_frames=2, max_bytes=100)
    assert len(outbox) == 0
    assert outbox.pending_bytes == 0
    assert outbox.pop() is None


def test_frames_come_out_in_order_and_free_their_bytes() -> None:
    outbox = Outbox(max_frames=10, max_bytes=100)
    for frame in ("a", "bb", "ccc"):
        outbox.push(frame)
    assert (len(outbox), outbox.pending_bytes) == (3, 6)
    assert outbox.pop() == "a"
    assert (len(outbox), outbox.pending_bytes) == (2, 5)
    assert [outbox.pop(), outbox.pop(), outbox.pop()] == ["bb", "ccc", None]
    assert (len(outbox), outbox.pending_bytes) == (0, 0)


def test_frame_bound() -> None:
    outbox = Outbox(max_frames=3, max_bytes=1_000)
    for _ in range(3):
        outbox.push("x")
    with pytest.raises(OutboxFull):
        outbox.push("x")
    assert (len(outbox), outbox.pending_bytes) == (3, 3)  # the refused frame left no trace
    outbox.pop()
    outbox.push("y")  # room again once the writer drained one
    assert len(outbox) == 3


def test_byte_bound_is_inclusive() -> None:
    outbox = Outbox(max_frames=100, max_bytes=10)
    outbox.push("x" * 6)
    outbox.push("x" * 4)  # exactly at the bound
    with pytest.raises(OutboxFull):
        outbox.push("x")
    assert outbox.pending_bytes == 10
    assert outbox.pop() == "x" * 6
    outbox.push("y" * 6)
    assert outbox.pending_bytes == 10


def test_a_frame_larger_than_the_whole_buffer_is_refused_even_when_empty() -> None:
    outbox = Outbox(max_frames=100, max_bytes=10)
    with pytest.raises(OutboxFull):
        outbox.push("x" * 11)
    assert (len(outbox), outbox.pending_bytes) == (0, 0)
    assert outbox.pop() is None


def test_refusal_says_what_is_waiting() -> None:
    outbox = Outbox(max_frames=1, max_bytes=100)
    outbox.push("abc")
    with pytest.raises(OutboxFull, match="1 frames, 3 bytes"):
        outbox.push("d")
