"""bench.capacity's arithmetic: the tenants it spreads over cluster masters, the background
it subtracts and the per-operation costs it derives (no Redis, no processes)."""

from __future__ import annotations

from collections import Counter

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from bench.capacity import Phases, mode_of, per_op, tenant_slugs
from project.redis_cluster import master_index_of_tag, slot_ranges


def test_slot_ranges_cover_every_slot_once() -> None:
    for masters in (1, 2, 3, 5):
        ranges = slot_ranges(masters)
        assert ranges[0][0] == 0 and ranges[-1][1] == REDIS_CLUSTER_HASH_SLOTS - 1
        for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False):
            assert lo == hi + 1


def test_master_of_follows_the_hash_tag() -> None:
    slot = key_slot(b"sb:s:{acme}:room:seq")
    lo, hi = slot_ranges(3)[master_index_of_tag("acme", 3)]
    assert lo <= slot <= hi


def test_tenants_spread_evenly_over_three_masters() -> None:
    slugs = tenant_slugs(6)
    assert len(set(slugs)) == 6
    assert Counter(master_index_of_tag(slug, 3) for slug in slugs) == {0: 2, 1: 2, 2: 2}
    # Interleaved: consecutive clients alternate masters.
    assert [master_index_of_tag(slug, 3) for slug in slugs[:3]] != [
        master_index_of_tag(slugs[0], 3)
    ] * 3


def test_mode_of_a_round() -> None:
    assert mode_of("cluster-3") == "cluster-3"
    assert mode_of("cluster-3.r2") == "cluster-3"


def raw(seconds: float, commands: int, cpu_s: float) -> dict:
    return {
        "seconds": seconds,
        "commands": commands,
        "calls": {"evalsha": commands},
        "cpu_s": cpu_s,
        "cpu_s_all": cpu_s,
        "cpu_s_by_node": {"redis": cpu_s},
        "memory_bytes": 0,
    }


def test_background_is_scaled_to_the_phase_and_subtracted() -> None:
    net = Phases._net(raw(20, 1_000, 0.5), raw(10, 100, 0.1))
    assert net["commands"] == 800
    assert abs(net["cpu_s"] - 0.3) < 1e-9
    assert net["calls"] == {"evalsha": 800}


def phase(ops: int, commands: float, cpu_s: float, **more: object) -> dict:
    data = {
        "commands": commands,
        "cpu_s": cpu_s,
        "cpu_s_all": cpu_s,
        "calls": {},
        "memory_bytes": 0,
    }
    return {"ops": ops, "seconds": 10.0, "data": data, "broker": None, **more}


def test_per_op_and_the_cost_of_a_delta() -> None:
    result = {
        "phases": {
            "connect": phase(100, 900, 0.0015),
            "send": phase(100, 10_000, 0.06, deltas=100),
            "stream": phase(10, 3_000, 0.02, deltas=200),
        }
    }
    costs = per_op(result)
    assert costs["connect"]["commands"] == 9
    assert costs["send"]["commands"] == 100 and round(costs["send"]["cpu_us"]) == 600
    assert costs["streamed_reply"]["commands"] == 300
    # (300 - 100) commands over the 19 deltas a streamed reply has beyond a send's one.
    assert abs(costs["reply_delta"]["commands"] - 200 / 19) < 1e-9
    assert abs(costs["reply_delta"]["cpu_us"] - (2000 - 600) / 19) < 1e-6
