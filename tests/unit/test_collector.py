"""The gateway's collector tuning: applied once per process, and only when asked."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ops import collector


@pytest.fixture
def untuned() -> Iterator[None]:
    saved = gc.get_threshold()
    collector._tuned = False
    yield
    collector._tuned = False
    gc.unfreeze()
    gc.set_threshold(*saved)


def test_the_young_threshold_is_raised_once_and_what_exists_is_frozen(untuned: None) -> None:
    _, middle, old = gc.get_threshold()
    assert collector.tune_for_long_lived_connections(50_000) is True
    assert gc.get_threshold() == (50_000, middle, old)
    assert gc.get_freeze_count() > 0
    assert collector.tune_for_long_lived_connections(1_000) is False  # once per process
    assert gc.get_threshold()[0] == 50_000


def test_zero_leaves_the_collector_as_python_sets_it(untuned: None) -> None:
    before = gc.get_threshold()
    assert collector.tune_for_long_lived_connections(0) is False
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_each_collection_is_timed_by_generation_and_taken_once() -> None:
    now = iter([10.0, 10.004, 20.0, 20.25])
    pauses = collector.PauseLog(clock=lambda: next(now))
    pauses.on_collection("start", {"generation": 0})
    pauses.on_collection("stop", {"generation": 0, "collected": 3, "uncollectable": 0})
    pauses.on_collection("start", {"generation": 2})
    pauses.on_collection("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    taken = pauses.take()
    assert [generation for generation, _ in taken] == [0, 2]
    assert [round(seconds, 6) for _, seconds in taken] == [0.004, 0.25]
    assert pauses.take() == []


def test_pauses_not_taken_are_bounded_the_oldest_dropped() -> None:
    ticks = iter(range(100))
    pauses = collector.PauseLog(clock=lambda: float(next(ticks)), capacity=3)
    for generation in range(5):
        pauses.on_collection("start", {"generation": generation})
        pauses.on_collection("stop", {"generation": generation})
    assert [generation for generation, _ in pauses.take()] == [2, 3, 4]
