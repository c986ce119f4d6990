"""Copying the data plane between deployments (streams/redis_copy.py) on real Redis servers:
every key under the prefix with its type, value and time to live, to another single Redis
and to a Redis Cluster; what says a deployment is not still (live leases, and run messages
other than tickets in the broker's lists: orchestration/tickets.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from orchestration.tickets import run_messages_in_redis, runs_queue_lists
from project.conf import conf
from streams import keys
from streams.enqueue import (
    MAINTENANCE_QUEUE,
    RUN_NEXT_TASK,
    RUN_STEP_TASK,
    RUNS_QUEUE,
    celery_message,
)
from streams.redis_copy import (
    _match_all,
    copy_keys,
    count_keys,
    first_key,
    live_writers,
    open_data_plane,
)
from tests.conftest import neighbour_database

TENANTS = [f"t{i}" for i in range(9)]  # over every master of a 3-master cluster


@pytest.fixture
def target_url(store_redis_url: str) -> Iterator[str]:
    """Another database of the same Redis, flushed before and after (the store suite's
    own -1, less 4: tests/conftest.py neighbour_database)."""
    url = neighbour_database(store_redis_url, -4)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        yield url
        client.flushdb()


def fill(r: redis.Redis) -> dict[str, str]:
    """One key of every type the data plane writes, some with a time to live, and one key
    outside the prefix; returns key -> type."""
    written = {}
    for slug in TENANTS:
        seq, log = keys.stream_seq(slug, "room"), keys.stream_log(slug, "room")
        r.set(seq, 3)
        for n in range(1, 4):
            r.xadd(log, {"e": json.dumps({"seq": n})}, id=f"{n}-0")
        session = keys.session(slug, "s1")
        r.hset(session, mapping={"client": "alice", "s:room": 2})
        r.expire(session, 600)
        dedupe = keys.client_message(slug, "alice", "m1")
        r.set(dedupe, "3 e1", ex=3600)
        r.zadd(keys.run_deadlines(slug), {f"r{'0' * 32}.{slug}": time.time() + 60})
        r.lpush(keys.fair_queue(slug), "a", "b")
        written.update(
            {seq: "string", log: "stream", session: "hash", dedupe: "string"}
            | {keys.run_deadlines(slug): "zset", keys.fair_queue(slug): "list"}
        )
    r.sadd(keys.TENANTS, *TENANTS)
    written[keys.TENANTS] = "set"
    r.set("not-ours", "x")
    return written


def test_every_key_is_copied_with_its_value_and_time_to_live(
    r: redis.Redis, store_redis_url: str, target_url: str
) -> None:
    written = fill(r)
    source, target = open_data_plane(store_redis_url), open_data_plane(target_url)
    report = copy_keys(source, target, conf().key_prefix, batch=7)

    assert report.keys == len(written) and report.vanished == 0
    assert dict(report.by_type) == {
        kind: list(written.values()).count(kind) for kind in set(written.values())
    }
    copied = redis.Redis.from_url(target_url)
    assert copied.exists("not-ours") == 0
    for name, kind in written.items():
        if kind == "set":  # a set's serialized order is its hash table's, not its value
            assert copied.smembers(name) == r.smembers(name)
        else:
            assert copied.dump(name) == r.dump(name), name
    slug = TENANTS[0]
    assert 590 <= copied.ttl(keys.session(slug, "s1")) <= 600
    assert 3590 <= copied.ttl(keys.client_message(slug, "alice", "m1")) <= 3600
    assert copied.ttl(keys.stream_seq(slug, "room")) == -1
    # Running it again writes the same over the same.
    again = copy_keys(source, target, conf().key_prefix)
    assert again.keys == report.keys and count_keys(target, conf().key_prefix) == len(written)


def test_a_copy_to_a_cluster_puts_each_key_on_its_slot(
    r: redis.Redis, store_redis_url: str, redis_cluster_url: str
) -> None:
    prefix = conf().key_prefix
    cluster = RedisCluster.from_url(redis_cluster_url)
    for node in cluster.get_primaries():
        for name in cluster.get_redis_connection(node).scan_iter(match=f"{prefix}:*"):
            cluster.delete(name)
    written = fill(r)
    try:
        target = open_data_plane(redis_cluster_url)
        assert isinstance(target, RedisCluster)
        assert first_key(target, prefix) is None
        report = copy_keys(open_data_plane(store_redis_url), target, prefix)
        assert report.keys == len(written)
        assert count_keys(target, prefix) == len(written)
        for slug in TENANTS:
            assert cluster.get(keys.stream_seq(slug, "room")) == b"3"
            assert cluster.xlen(keys.stream_log(slug, "room")) == 3
            assert cluster.hget(keys.session(slug, "s1"), "s:room") == b"2"
        # And back to one Redis: the same keys from every master.
        r.flushdb()
        back = copy_keys(target, open_data_plane(store_redis_url), prefix)
        assert back.keys == len(written) and r.exists("not-ours") == 0
    finally:
        for node in cluster.get_primaries():
            for name in cluster.get_redis_connection(node).scan_iter(match=f"{prefix}:*"):
                cluster.delete(name)
        cluster.close()


def test_a_prefix_is_matched_as_itself_not_as_a_pattern() -> None:
    assert _match_all("sb") == "sb:*"
    assert _match_all("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\:*"


def test_live_leases_say_the_deployment_is_not_still(r: redis.Redis, store_redis_url: str) -> None:
    client = open_data_plane(store_redis_url)
    assert live_writers(client) == []
    now_s = float(r.time()[0])
    r.zadd(keys.GATEWAY_LEASES, {"lapsed": (now_s - 5) * 1000, "live": (now_s + 30) * 1000})
    r.sadd(keys.TENANTS, "acme")
    r.zadd(keys.run_leases("acme"), {"r1.acme": now_s - 5, "r2.acme": now_s + 30})
    assert live_writers(client) == [
        "1 gateway process(es) with a live lease",
        "1 run(s) whose step a worker holds",
    ]


def test_run_messages_other_than_tickets_are_counted(r: redis.Redis) -> None:
    queue = runs_queue_lists()[0]
    _, ticket = celery_message(RUN_NEXT_TASK, [], RUNS_QUEUE)
    _, step = celery_message(RUN_STEP_TASK, ["r1.acme", 1], RUNS_QUEUE)
    r.lpush(queue, ticket, ticket, step)
    r.lpush(keys.celery_queue(MAINTENANCE_QUEUE), step)  # not the runs queue
    unacked, _ = keys.celery_unacked()
    r.hset(unacked, "tag-1", json.dumps([json.loads(step), "", RUNS_QUEUE]))
    r.hset(unacked, "tag-2", json.dumps([json.loads(ticket), "", RUNS_QUEUE]))
    r.hset(unacked, "tag-3", json.dumps([json.loads(step), "", MAINTENANCE_QUEUE]))
    assert run_messages_in_redis(r) == 2
