"""What the suite left in Redis: every key under the configured prefix."""

from __future__ import annotations

import pytest

from .conftest import Switchboard

# Names kombu's Redis transport gives its keys: bindings, unacked bookkeeping, queues.
KOMBU_KEYS = {"unacked", "unacked_index", "unacked_mutex", "switchboard.runs", "celery"}


def _is_broker_key(name: str) -> bool:
    return name.startswith("_kombu.") or name in KOMBU_KEYS or name.startswith("switchboard.")


def _keys_outside_prefix(board: Switchboard) -> list[str]:
    names = sorted(key.decode() for key in board.redis().scan_iter(count=1000))
    prefix = board.key_prefix + ":"
    assert any(name.startswith(prefix) for name in names), "the suite wrote streams"
    return [name for name in names if not name.startswith(prefix)]


@pytest.mark.run_last
def test_every_switchboard_key_is_under_the_prefix(switchboard: Switchboard) -> None:
    outside = [name for name in _keys_outside_prefix(switchboard) if not _is_broker_key(name)]
    assert outside == []


@pytest.mark.run_last
def test_broker_keys_are_under_the_prefix_too(switchboard: Switchboard) -> None:
    assert _keys_outside_prefix(switchboard) == []
