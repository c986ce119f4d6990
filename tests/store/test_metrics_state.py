"""The scrape-time gauges (ops/metrics.py's RedisStateCollector) against a real Redis."""

from __future__ import annotations

from typing import Any

import redis

from ops.metrics import FAIR_TENANTS_EXPORTED, RedisStateCollector
from project.launcher import free_port
from streams import keys

QUEUES = ["switchboard.runs", "switchboard.maintenance"]


def scrape(collector: RedisStateCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_an_idle_cluster_reads_as_zeros(r: redis.Redis) -> None:
    values = scrape(RedisStateCollector(r, r, lambda: QUEUES))
    assert values[("switchboard_state_up", ())] == 1
    assert values[("switchboard_runs_unfinished", ())] == 0
    assert values[("switchboard_runs_leased", ())] == 0
    assert values[("switchboard_fair_queue_tenants", ())] == 0
    assert values[("switchboard_fair_queue_runs", ())] == 0
    for queue in QUEUES:
        assert values[("switchboard_queue_depth", (("queue", queue),))] == 0
    assert values[("switchboard_queue_unacked", ())] == 0
    assert not [key for key in values if key[0] == "switchboard_fair_queue_depth"]


def test_queues_and_runs_are_read_and_the_tenants_bounded(r: redis.Redis) -> None:
    # Run indexes are per tenant; the registry says which tenants to read.
    r.sadd(keys.TENANTS, "acme", "globex")
    r.zadd(keys.run_deadlines("acme"), {"r1": 1, "r2": 2})
    r.zadd(keys.run_deadlines("globex"), {"r3": 3})
    r.zadd(keys.run_leases("globex"), {"r2": 2})
    tenants = [f"t{index:02d}" for index in range(FAIR_TENANTS_EXPORTED + 5)]
    for depth, tenant in enumerate(tenants, start=1):
        r.rpush(keys.FAIR_RING, tenant)
        r.lpush(keys.fair_queue(tenant), *[f"run-{i}" for i in range(depth)])
    r.lpush(keys.celery_queue("switchboard.runs"), "m1", "m2", "m3", "m4")
    r.hset(keys.celery_queue("unacked"), mapping={"tag1": "x", "tag2": "y"})

    values = scrape(RedisStateCollector(r, r, lambda: QUEUES))
    assert values[("switchboard_state_up", ())] == 1
    assert values[("switchboard_runs_unfinished", ())] == 3
    assert values[("switchboard_runs_leased", ())] == 1
    assert values[("switchboard_fair_queue_tenants", ())] == len(tenants)
    assert values[("switchboard_fair_queue_runs", ())] == sum(range(1, len(tenants) + 1))
    assert values[("switchboard_queue_depth", (("queue", "switchboard.runs"),))] == 4
    assert values[("switchboard_queue_depth", (("queue", "switchboard.maintenance"),))] == 0
    assert values[("switchboard_queue_unacked", ())] == 2
    # One series per tenant for the deepest only, each with its own depth.
    per_tenant = {
        dict(labels)["tenant"]: value
        for (name, labels), value in values.items()
        if name == "switchboard_fair_queue_depth"
    }
    deepest = tenants[-FAIR_TENANTS_EXPORTED:]
    assert per_tenant == {tenant: tenants.index(tenant) + 1 for tenant in deepest}


def test_without_a_redis_broker_the_celery_queues_are_left_out(r: redis.Redis) -> None:
    values = scrape(RedisStateCollector(r, None, lambda: QUEUES))
    assert values[("switchboard_state_up", ())] == 1
    assert not [key for key in values if key[0].startswith("switchboard_queue_")]


def test_a_redis_that_does_not_answer_gives_a_scrape_that_says_so() -> None:
    gone = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    values = scrape(RedisStateCollector(gone, gone, lambda: QUEUES))
    assert values == {("switchboard_state_up", ()): 0}
