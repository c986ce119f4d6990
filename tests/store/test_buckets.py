"""Token buckets on a real Redis: bursts, refill, all-or-nothing across buckets, honest waits."""

from __future__ import annotations

import time

import redis

from streams.buckets import NEVER, Bucket, SyncBuckets


def test_a_burst_is_allowed_then_the_wait_is_told(r: redis.Redis) -> None:
    buckets = SyncBuckets(r)
    client = Bucket("test:bucket:client", rate_per_s=10, burst=3)
    assert [buckets.take([client]) for _ in range(3)] == [0, 0, 0]
    wait = buckets.take([client])
    assert 0 < wait <= 100  # one token at 10/s: at most 100 ms away


def test_tokens_come_back_at_the_rate(r: redis.Redis) -> None:
    buckets = SyncBuckets(r)
    fast = Bucket("test:bucket:fast", rate_per_s=1000, burst=1)
    assert buckets.take([fast]) == 0
    deadline = time.monotonic() + 2
    while buckets.take([fast]) != 0:  # a millisecond later there is one again
        assert time.monotonic() < deadline


def test_several_buckets_pay_together_or_not_at_all(r: redis.Redis) -> None:
    buckets = SyncBuckets(r)
    client = Bucket("test:bucket:{c}:c", rate_per_s=1, burst=5)
    tenant = Bucket("test:bucket:{c}:t", rate_per_s=1, burst=1)
    assert buckets.take([client, tenant]) == 0
    assert buckets.take([client, tenant]) > 0  # the tenant is short
    # The client's bucket was not charged for the refused message.
    assert float(r.hget("test:bucket:{c}:c", "tokens")) >= 3.99


def test_a_cost_beyond_the_burst_can_never_be_paid(r: redis.Redis) -> None:
    assert SyncBuckets(r).take([Bucket("test:bucket:big", 5, 2)], cost=3) == NEVER


def test_an_idle_bucket_expires(r: redis.Redis) -> None:
    SyncBuckets(r).take([Bucket("test:bucket:idle", rate_per_s=100, burst=10)])
    assert 0 < r.pttl("test:bucket:idle") <= 1000 + 10
