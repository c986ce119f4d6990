"""bench/seed_night.py: its load generators, and its reading of the gateways' delivery-lag
histogram between scrapes."""

from __future__ import annotations

from bench.seed_night import bucket_quantiles, generator_parts, parse_args


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


def test_the_storms_clients_get_load_generators_of_their_own() -> None:
    args = parse_args(["--clients", "50000"])
    assert args.client_procs == 4 and args.storm_apart
    assert generator_parts(args, 1, 2) == [
        ("loadgen-2", "steady", "0/2"),
        ("loadgen-3", "steady", "1/2"),
        ("loadgen-storm-1", "reconnecting", "0/1"),
    ]
    together = parse_args(["--clients", "50000", "--no-storm-apart"])
    assert generator_parts(together, 1, 2) == [
        ("loadgen-2", "all", "0/2"),
        ("loadgen-3", "all", "1/2"),
    ]
