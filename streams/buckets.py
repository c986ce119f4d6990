"""Token buckets held in Redis, so a rate is one limit across every gateway and worker
process (Celery's `rate_limit` is per worker process and cannot be).

A bucket is a hash {tokens, at_ms}: it holds up to `burst` tokens and refills at `rate`
tokens a second, on the Redis clock (process clocks never matter). `take` draws `cost`
from one or several buckets atomically: from all of them, or, when any is short, from
none, answering how long until all could pay — the honest `retry_after_ms` of a 429.
An idle bucket expires once it would be full again, so buckets cost nothing at rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streams import scripts

# The answer when a cost can never be paid (more than a bucket's burst, or a zero rate).
NEVER = -1


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    rate_per_s: float
    burst: int


def _take(buckets: Sequence[Bucket], cost: float) -> scripts.TakeTokens:
    return scripts.TakeTokens(
        buckets=[bucket.key for bucket in buckets],
        cost=cost,
        limits=[limit for bucket in buckets for limit in (bucket.rate_per_s, bucket.burst)],
    )


class AsyncBuckets:
    """Buckets through an asyncio Redis client (gateways)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def take(self, buckets: Sequence[Bucket], cost: float = 1) -> int:
        """0 when paid; else ms to wait (NEVER: this cost cannot be paid at all)."""
        return await _take(buckets, cost).run_async(self.client)


class SyncBuckets:
    """Buckets through a blocking Redis client (Celery workers)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def take(self, buckets: Sequence[Bucket], cost: float = 1) -> int:
        return _take(buckets, cost).run(self.client)


def retry_after_ms(wait_ms: int, floor_ms: int = 1) -> int:
    """A wait as a client should be told it: at least `floor_ms`, whole milliseconds."""
    return max(floor_ms, math.ceil(wait_ms))
