"""bench/seed_night.py: its load generators, and its reading of the gateways' delivery-lag
histogram between scrapes."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

from bench.seed_night import (
    GATEWAY_LAG,
    GATEWAY_LONG_TURNS,
    bucket_quantiles,
    generator_parts,
    histogram_between,
    machine_share,
    parse_args,
    storm_by_part,
    verdict,
)


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
        ("loadgen-storm-1-0", "reconnecting", "0/1"),
    ]
    split = parse_args(["--clients", "50000", "--storm-procs", "2"])
    assert generator_parts(split, 0, 2)[2:] == [
        ("loadgen-storm-0-0", "reconnecting", "0/2"),
        ("loadgen-storm-0-1", "reconnecting", "1/2"),
    ]
    together = parse_args(["--clients", "50000", "--no-storm-apart"])
    assert generator_parts(together, 1, 2) == [
        ("loadgen-2", "all", "0/2"),
        ("loadgen-3", "all", "1/2"),
    ]


def test_each_histogram_is_read_apart_from_the_same_scrapes() -> None:
    before = {GATEWAY_LAG: {0.1: 0.0, float("inf"): 0.0}, GATEWAY_LONG_TURNS: {}}
    after = {GATEWAY_LAG: {0.1: 4.0, float("inf"): 4.0}, GATEWAY_LONG_TURNS: {0.05: 2.0}}
    assert histogram_between(GATEWAY_LAG, before, after)["count"] == 4
    assert histogram_between(GATEWAY_LONG_TURNS, before, after) == {
        "count": 2,
        "p50": 50.0,
        "p99": 50.0,
        "p99.9": 50.0,
    }
    assert histogram_between(GATEWAY_LAG, None, after) == {"count": 0}


def test_the_storms_lag_is_told_apart_by_the_generator_that_took_it(tmp_path: Path) -> None:
    """The reconnecting clients' generators replay the storm's resumes, and their loop's
    lateness is in each lag they take: the steady readers' figures are given apart."""
    storm_from = 100.0

    def raw(
        name: str, lags: list[float], late: list[float], merged: tuple[float, float] | None = None
    ) -> Path:
        """`lags` with their own stamps; `merged`: one more message's (latest, soonest)."""
        path = tmp_path / f"{name}-raw.json"
        samples = {
            "event_lag": [[storm_from + 1 + i, v] for i, v in enumerate(lags)],
            "event_lag_own": [[storm_from + 1 + i, v] for i, v in enumerate(lags)],
            # As read: the loop's lateness added to each.
            "event_lag_read": [[storm_from + 1 + i, v + max(late)] for i, v in enumerate(lags)],
            "loop_lag": [[storm_from + 1 + i, v] for i, v in enumerate(late)],
        }
        if merged is not None:
            samples["event_lag"].append([storm_from + 9, merged[0]])
            samples["event_lag_merged_soonest"] = [[storm_from + 9, merged[1]]]
        path.write_text(json.dumps(samples))
        return path

    outputs = [
        raw("loadgen-0", [5.0, 6.0], [1.0]),
        raw("loadgen-1", [7.0], [1.0]),
        # A message that waited in the socket while its generator was late: stamped 700 ms
        # after its event, and there at the soonest 40 ms after it.
        raw("loadgen-storm-0-0", [90.0], [800.0], merged=(700.0, 40.0)),
        tmp_path / "loadgen-2-raw.json",  # a generator that wrote nothing
    ]
    found = storm_by_part(outputs, storm_from)
    assert found["steady"]["event_lag"]["count"] == 3
    assert found["steady"]["event_lag"]["max"] == 7.0
    assert found["reconnecting"]["event_lag"]["max"] == 700.0
    assert found["reconnecting"]["event_lag_own"]["max"] == 90.0
    assert found["reconnecting"]["event_lag_soonest"]["count"] == 2
    assert found["reconnecting"]["event_lag_soonest"]["max"] == 90.0
    assert found["reconnecting"]["event_lag_read"]["max"] == 890.0
    assert found["reconnecting"]["loop_lag"]["max"] == 800.0


def test_the_machines_share_in_the_storm_counts_stolen_time_apart() -> None:
    times = namedtuple("times", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = times(100, 0, 50, 1000, 10, 0, 5, 20, 0, 0)
    # 200 s of the cores: 90 running, 80 idle, 10 waiting on disks, 20 stolen.
    after = times(160, 0, 70, 1080, 20, 0, 15, 40, 0, 0)
    assert machine_share(before, after) == {"busy_pct": 45.0, "steal_pct": 10.0}


def test_the_verdict_is_met_at_the_latest_stamps_and_undecided_between_the_bounds() -> None:
    def night(latest_storm_p99: float, soonest_storm_p99: float, lost: int = 0) -> dict:
        def stats(p99: float) -> dict:
            return {"count": 1000, "p50": 3.0, "p99": p99, "p99.9": p99 * 2}

        return {
            "lost": lost,
            "duplicates": 0,
            "clients": 10,
            "connections_opened": 10,
            "latency_ms": {
                "event_lag": stats(40.0),
                "event_lag_storm": stats(latest_storm_p99),
                "event_lag_soonest": stats(35.0),
                "event_lag_soonest_storm": stats(soonest_storm_p99),
            },
        }

    assert verdict(night(latest_storm_p99=120.0, soonest_storm_p99=90.0)) is True
    # The storm's window counts, not only the night's: its upper bound over the target
    # with its lower bound within leaves the run unable to tell.
    assert verdict(night(latest_storm_p99=390.0, soonest_storm_p99=90.0)) is None
    assert verdict(night(latest_storm_p99=390.0, soonest_storm_p99=300.0)) is False
    assert verdict(night(latest_storm_p99=120.0, soonest_storm_p99=90.0, lost=1)) is False
