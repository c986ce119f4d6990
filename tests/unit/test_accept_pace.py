"""realtime/accept_pace.py: a gateway's accepts as a token bucket on its own clock."""

from __future__ import annotations

import pytest

from realtime.accept_pace import AcceptPace


def test_a_burst_is_taken_at_once_and_the_rest_at_the_rate() -> None:
    pace = AcceptPace(rate_per_s=100, burst=10, now=0.0)
    assert pace.allowance(0.0) == 10
    pace.took(10, 0.0)
    assert pace.allowance(0.0) == 0
    assert pace.wait_s(0.0) == pytest.approx(0.01)
    assert pace.allowance(0.05) == 5  # 50 ms at 100 a second
    pace.took(3, 0.05)
    assert pace.allowance(0.05) == 2
    assert pace.allowance(10.0) == 10, "never more than the burst, however long idle"


def test_taking_more_than_allowed_leaves_none_not_a_debt() -> None:
    """Counted past the allowance, the bucket is empty and waits one token's time; it
    does not hold the port closed to pay off the excess."""
    pace = AcceptPace(rate_per_s=10, burst=2, now=0.0)
    pace.took(5, 0.0)
    assert pace.allowance(0.0) == 0
    assert pace.wait_s(0.0) == pytest.approx(0.1)
    assert pace.allowance(0.1) == 1


def test_a_clock_that_goes_back_neither_refills_nor_drains() -> None:
    pace = AcceptPace(rate_per_s=10, burst=5, now=10.0)
    pace.took(5, 10.0)
    assert pace.allowance(9.0) == 0
    assert pace.allowance(10.2) == 2


def test_a_rate_of_zero_never_limits() -> None:
    pace = AcceptPace(rate_per_s=0, burst=100, now=0.0)
    assert not pace.limited
    pace.took(10_000, 0.0)
    assert pace.allowance(0.0) == 100
    assert pace.wait_s(0.0) == 0.0
