"""StreamCursor (realtime/sequencing.py): each seq delivered once, in order, none skipped."""

from __future__ import annotations

import random

import pytest

from realtime.sequencing import StreamCursor


def ev(seq: int) -> str:
    return f"e{seq}"


def evs(*seqs: int) -> list[str]:
    return [ev(seq) for seq in seqs]


def started(next_seq: int = 1, max_pending: int = 1024) -> StreamCursor:
    cursor = StreamCursor(max_pending=max_pending)
    assert cursor.start_at(next_seq) == []
    return cursor


def test_in_order_events_pass_straight_through() -> None:
    cursor = started()
    for seq in range(1, 6):
        assert cursor.offer(seq, ev(seq)) == [ev(seq)]
        assert cursor.missing() is None
    assert cursor.next_seq == 6
    assert cursor.pending == {}


def test_duplicates_are_dropped_delivered_or_pending() -> None:
    cursor = started()
    assert cursor.offer(1, ev(1)) == evs(1)
    assert cursor.offer(1, "again") == []
    assert cursor.offer(3, ev(3)) == []
    assert cursor.offer(3, "again") == []  # a second copy while still waiting
    assert cursor.offer(2, ev(2)) == evs(2, 3)  # the first copy of 3 is the one kept
    assert cursor.offer(2, "again") == []
    assert cursor.offer(3, "again") == []


def test_out_of_order_events_wait_for_the_gap() -> None:
    cursor = started()
    assert cursor.offer(3, ev(3)) == []
    assert cursor.offer(5, ev(5)) == []
    assert cursor.missing() == (1, 2)
    assert cursor.offer(2, ev(2)) == []
    assert cursor.missing() == (1, 1)
    assert cursor.offer(1, ev(1)) == evs(1, 2, 3)
    assert cursor.missing() == (4, 4)
    assert cursor.offer(4, ev(4)) == evs(4, 5)
    assert cursor.missing() is None


def test_missing_names_only_the_first_gap() -> None:
    cursor = started(10)
    cursor.offer(12, ev(12))
    cursor.offer(20, ev(20))
    assert cursor.missing() == (10, 11)
    cursor.offer(10, ev(10))
    assert cursor.offer(11, ev(11)) == evs(11, 12)
    assert cursor.missing() == (13, 19)


def test_before_start_nothing_is_delivered_or_missing() -> None:
    cursor = StreamCursor()
    assert cursor.offer(7, ev(7)) == []
    assert cursor.offer(5, ev(5)) == []
    assert cursor.missing() is None  # the catch-up read, not a repair, fills the start


def test_start_at_delivers_buffered_events_and_drops_stale_ones() -> None:
    cursor = StreamCursor()
    for seq in (2, 3, 5, 6):
        cursor.offer(seq, ev(seq))
    # The catch-up read delivered 1..4 itself: 2 and 3 are stale, 5 and 6 follow.
    assert cursor.start_at(5) == evs(5, 6)
    assert cursor.pending == {}
    assert cursor.offer(3, ev(3)) == []
    assert cursor.offer(7, ev(7)) == evs(7)


def test_start_at_leaves_a_gap_for_repair() -> None:
    cursor = StreamCursor()
    for seq in (1, 2, 6):
        cursor.offer(seq, ev(seq))
    assert cursor.start_at(4) == []
    assert cursor.pending == {6: ev(6)}
    assert cursor.missing() == (4, 5)


def test_skip_to_gives_up_on_pruned_events() -> None:
    cursor = started()
    cursor.offer(8, ev(8))
    cursor.offer(9, ev(9))
    assert cursor.missing() == (1, 7)
    # The log no longer holds 1..4: go on from the first retained one.
    assert cursor.skip_to(5) == []
    assert cursor.missing() == (5, 7)
    assert cursor.skip_to(8) == evs(8, 9)
    assert cursor.next_seq == 10


def test_skip_to_never_goes_backwards() -> None:
    cursor = started(10)
    assert cursor.skip_to(3) == []
    assert cursor.next_seq == 10
    assert cursor.offer(9, ev(9)) == []


def test_overflow_drops_and_asks_for_a_repair() -> None:
    cursor = started(max_pending=3)
    for seq in (5, 6, 7):
        assert cursor.offer(seq, ev(seq)) == []
    assert cursor.offer(8, ev(8)) == []
    assert cursor.overflowed
    assert 8 not in cursor.pending
    assert cursor.missing() == (1, 4)


def test_event_dropped_on_overflow_is_asked_for_after_the_gap_closes() -> None:
    """The dropped event must be re-read even when no later event arrives to reveal it."""
    cursor = started(max_pending=3)
    for seq in (5, 6, 7, 8):
        cursor.offer(seq, ev(seq))
    delivered = []
    for seq in range(1, 5):  # the repair read of (1, 4)
        delivered += cursor.offer(seq, ev(seq))
    assert delivered == evs(1, 2, 3, 4, 5, 6, 7)
    assert cursor.missing() == (8, 8)
    assert cursor.offer(8, ev(8)) == evs(8)
    assert cursor.missing() is None
    assert not cursor.overflowed


def test_full_window_still_takes_the_next_seq() -> None:
    """Refusing the event a repair reads for the gap would make the repair loop forever."""
    cursor = started(max_pending=2)
    cursor.offer(3, ev(3))
    cursor.offer(4, ev(4))
    assert cursor.missing() == (1, 2)
    assert cursor.offer(1, ev(1)) == evs(1)
    assert cursor.offer(2, ev(2)) == evs(2, 3, 4)
    assert cursor.missing() is None


@pytest.mark.parametrize("seed", range(40))
def test_randomized_delivery_is_complete_ordered_and_once(seed: int) -> None:
    """A live path that reorders, duplicates and loses events, a catch-up read racing
    the subscription, and repairs driven only by missing(): the client still sees every
    seq exactly once, in order. Fixed seeds keep failures reproducible."""
    rng = random.Random(seed)
    total = rng.randint(1, 300)
    log = {seq: ev(seq) for seq in range(1, total + 1)}
    cursor = StreamCursor(max_pending=rng.choice([2, 4, 16, 1024]))
    delivered: list[str] = []

    def repair() -> None:
        # What the consumer's repair loop does: read the named range from the log.
        for _ in range(10 * total + 10):
            gap = cursor.missing()
            if gap is None:
                return
            first, last = gap
            for seq in range(first, min(last, total) + 1):
                delivered.extend(cursor.offer(seq, log[seq]))
        raise AssertionError("repair did not converge")

    # Live notifications: roughly in order, shuffled within a small window, some twice,
    # some lost (never the last, whose loss no cursor could notice without the head).
    live = list(range(1, total + 1))
    for start in range(0, total, 5):
        window = live[start : start + rng.randint(1, 8)]
        rng.shuffle(window)
        live[start : start + len(window)] = window
    live = [seq for seq in live if seq == total or rng.random() > 0.1]
    live += rng.sample(range(1, total + 1), k=total // 5)  # late duplicates
    # The subscription hears live events before its catch-up read of 1..head finishes.
    head = rng.randint(0, total)
    early = live[: rng.randint(0, len(live))]
    for seq in early:
        assert cursor.offer(seq, log[seq]) == []
    delivered.extend(log[seq] for seq in range(1, head + 1))
    delivered.extend(cursor.start_at(head + 1))
    late = live[len(early) :]
    for seq in late:
        delivered.extend(cursor.offer(seq, log[seq]))
        if rng.random() < 0.3:
            repair()
    repair()
    assert delivered == [log[seq] for seq in range(1, total + 1)]
    assert cursor.pending == {}
