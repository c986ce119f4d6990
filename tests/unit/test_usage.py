"""Token usage arithmetic (streams/usage.py): the estimate, a call's usage from what the
provider reported, a run's sum, reply.done's detail, and when budgets reset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from streams.usage import (
    DAY,
    MONTH,
    Budgets,
    Usage,
    call_usage,
    counter_expires_at,
    day_label,
    day_resets_at,
    estimate_tokens,
    exhausted,
    iso,
    month_label,
    month_resets_at,
    token_count,
    usage_from_detail,
    usage_of,
    with_usage,
)


@pytest.mark.parametrize(
    ("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)]
)
def test_the_estimate_is_a_quarter_of_the_characters_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_a_call_uses_what_was_reported_and_estimates_only_what_was_not() -> None:
    assert call_usage(12, 7, 400, 400) == Usage(12, 7, estimated=False)
    assert call_usage(None, None, 10, 3) == Usage(3, 1, estimated=True)
    # A provider that said one part only: the other is estimated, and the whole says so.
    assert call_usage(12, None, 400, 9) == Usage(12, 3, estimated=True)
    assert call_usage(None, 0, 8, 99) == Usage(2, 0, estimated=True)


def test_a_runs_usage_adds_up_its_calls_and_is_estimated_if_any_was() -> None:
    total = Usage(10, 5) + Usage(3, 2, estimated=True) + Usage(1, 1)
    assert total == Usage(14, 8, estimated=True)
    assert total.total == 22
    assert total.as_detail() == {
        "prompt_tokens": 14,
        "completion_tokens": 8,
        "total": 22,
        "estimated": True,
    }


def test_reply_done_detail_gains_the_usage_and_keeps_what_it_said() -> None:
    usage = Usage(2, 3)
    assert with_usage(None, None) is None
    assert with_usage({"reason": "timeout"}, None) == {"reason": "timeout"}
    assert with_usage(None, usage) == {"usage": usage.as_detail()}
    assert with_usage({"reason": "timeout", "message": "timeout"}, usage) == {
        "reason": "timeout",
        "message": "timeout",
        "usage": usage.as_detail(),
    }


def test_a_runs_usage_is_read_back_from_its_hash() -> None:
    assert usage_of({"tenant": "acme"}) is None
    assert usage_of({"usage_prompt": "4", "usage_completion": "6"}) == Usage(4, 6)
    assert usage_of({"usage_prompt": "4", "usage_completion": "6", "usage_est": "1"}) == Usage(
        4, 6, estimated=True
    )


@pytest.mark.parametrize(
    ("value", "count"),
    [(5, 5), (0, 0), (-1, None), (True, None), ("5", None), (None, None), (1.5, None)],
)
def test_a_providers_count_is_taken_only_when_it_is_a_count(value: object, count: int) -> None:
    assert token_count(value) == count


def test_a_providers_huge_count_is_bounded() -> None:
    assert token_count(10**30) == 10**12


def test_history_reads_a_reply_dones_usage_only_when_well_formed() -> None:
    good = {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "estimated": True}}
    assert usage_from_detail(good) == Usage(3, 4, estimated=True)
    assert usage_from_detail({"usage": {"prompt_tokens": "3"}}) is None
    assert usage_from_detail({"reason": "timeout"}) is None
    assert usage_from_detail(None) is None


# --- periods and resets -------------------------------------------------------------------


def test_the_day_resets_at_the_next_utc_midnight() -> None:
    assert day_resets_at(datetime(2026, 12, 4, 14, 5, tzinfo=UTC)) == datetime(
        2026, 12, 5, tzinfo=UTC
    )
    # Midnight itself belongs to the day it starts.
    assert day_resets_at(datetime(2026, 12, 5, tzinfo=UTC)) == datetime(2026, 12, 6, tzinfo=UTC)
    # A moment given in another zone is the same instant: its UTC day counts.
    tokyo = timezone(timedelta(hours=9))
    assert day_resets_at(datetime(2026, 12, 5, 8, 0, tzinfo=tokyo)) == datetime(
        2026, 12, 5, tzinfo=UTC
    )
    assert day_label(datetime(2026, 12, 5, 8, 0, tzinfo=tokyo)) == "20261204"


@pytest.mark.parametrize(
    ("now", "reset"),
    [
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 1, 31, 12, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC)),
    ],
)
def test_the_month_resets_on_the_first_of_the_next_utc_month(
    now: datetime, reset: datetime
) -> None:
    assert month_resets_at(now) == reset


def test_counters_are_named_by_utc_period_and_kept_past_its_end() -> None:
    now = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert (day_label(now), month_label(now)) == ("20261231", "202612")
    new_year = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert counter_expires_at(DAY, now) > new_year
    assert counter_expires_at(MONTH, now) > new_year


def test_a_refusal_says_which_budget_and_how_long_until_it_resets() -> None:
    now = datetime(2026, 12, 4, 23, 59, 30, tzinfo=UTC)
    budgets = Budgets(daily=100, monthly=1000)
    spent = exhausted(DAY, budgets, now)
    assert (spent.period, spent.budget) == (DAY, 100)
    assert iso(spent.resets_at) == "2026-12-05T00:00:00Z"
    assert spent.retry_after_ms(now) == 30_000
    monthly = exhausted(MONTH, budgets, now)
    assert (monthly.budget, iso(monthly.resets_at)) == (1000, "2027-01-01T00:00:00Z")
    # Never 0, even at the very instant it resets.
    assert spent.retry_after_ms(spent.resets_at) == 1
    assert not Budgets().any and Budgets(monthly=1).any
