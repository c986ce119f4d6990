"""bench/seed_night.py's reading of the gateways' delivery-lag histogram between scrapes."""

from __future__ import annotations

from bench.seed_night import bucket_quantiles


def test_quantiles_of_the_events_between_two_scrapes_are_bucket_upper_bounds() -> None:
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, 1.0: 10.0, float("inf"): 10.0}
    # 1,000 more events: 900 within 1 ms, 95 within 10 ms, 4 within 100 ms, 1 within 1 s.
    after = {0.001: 910.0, 0.01: 1005.0, 0.1: 1009.0, 1.0: 1010.0, float("inf"): 1010.0}
    found = bucket_quantiles(before, after)
    assert found == {"count": 1000, "p50": 1.0, "p99": 10.0, "p99.9": 100.0}


def test_a_missing_scrape_gives_no_figures() -> None:
    assert bucket_quantiles(None, {1.0: 5.0}) == {"count": 0}
    assert bucket_quantiles({1.0: 5.0}, None) == {"count": 0}
    assert bucket_quantiles({1.0: 5.0}, {1.0: 5.0})["p99"] is None
