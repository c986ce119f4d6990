"""Backend rate limits (streams/rate_limits.py, workers/quotas.py): configuration, estimates
and the wait policy."""

from __future__ import annotations

import pytest

from streams import keys
from streams.buckets import NEVER
from streams.rate_limits import BackendLimit, BadLimits, parse_limits
from workers.quotas import GIVE_UP, WAIT, buckets_for, decide, estimated_tokens


def test_limits_parse_per_backend() -> None:
    assert parse_limits({"openai": {"rpm": 500, "tpm": 90_000}, "local": {"rpm": 60}}) == {
        "openai": BackendLimit(rpm=500, tpm=90_000),
        "local": BackendLimit(rpm=60, tpm=None),
    }
    assert parse_limits({}) == {}
    assert parse_limits(None) == {}


@pytest.mark.parametrize(
    "raw",
    [
        {"openai": 500},
        {"openai": {"rpm": 0}},
        {"openai": {"rpm": -1}},
        {"openai": {"rpm": 1.5}},
        {"openai": {"rpm": "500"}},
        {"openai": {"rpm": True}},
        {"openai": {"rps": 5}},
    ],
)
def test_nonsense_limits_are_refused_not_ignored(raw: dict[str, object]) -> None:
    with pytest.raises(BadLimits):
        parse_limits(raw)


@pytest.mark.parametrize(
    ("prompt", "tokens"), [("", 1), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)]
)
def test_estimated_tokens_are_a_quarter_of_the_characters(prompt: str, tokens: int) -> None:
    assert estimated_tokens(prompt) == tokens


def test_each_limit_is_a_bucket_holding_a_minutes_worth() -> None:
    found = buckets_for("openai", BackendLimit(rpm=600, tpm=60_000))
    assert [(bucket.key, bucket.rate_per_s, bucket.burst, unit) for bucket, unit in found] == [
        (f"{keys.PREFIX}:backend:openai:rpm", 10.0, 600, "requests"),
        (f"{keys.PREFIX}:backend:openai:tpm", 1000.0, 60_000, "tokens"),
    ]
    assert [unit for _, unit in buckets_for("b", BackendLimit(tpm=100))] == ["tokens"]
    assert buckets_for("b", BackendLimit()) == []


@pytest.mark.parametrize(
    ("wait_ms", "seconds_left", "min_budget_s", "expected"),
    [
        (100, 10.0, 0.5, WAIT),
        (9_500, 10.0, 0.5, WAIT),  # exactly the minimum budget left after the wait
        (9_501, 10.0, 0.5, GIVE_UP),
        (60_000, 30.0, 0.5, GIVE_UP),  # a minute's refill against a 30 s deadline
        (1, 0.4, 0.5, GIVE_UP),  # no useful call fits any more
        (NEVER, 3600.0, 0.5, GIVE_UP),  # a cost above the bucket: it never comes
    ],
)
def test_a_step_waits_for_its_budget_only_while_a_useful_call_still_fits(
    wait_ms: int, seconds_left: float, min_budget_s: float, expected: str
) -> None:
    assert decide(wait_ms, seconds_left, min_budget_s) == expected
