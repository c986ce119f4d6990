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

# KEYS: the buckets. ARGV: cost, then rate_per_s and burst for each bucket in KEYS order.
# Returns 0 when every bucket paid, else the milliseconds until all of them could.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cost = tonumber(ARGV[1])
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1])
  if tokens == nil then
    tokens = burst
  else
    local elapsed = math.max(0, now - tonumber(state[2]))
    tokens = math.min(burst, tokens + elapsed * rate / 1000)
  end
  levels[i] = tokens
  if tokens < cost then
    if cost > burst or rate <= 0 then
      wait = -1
    elseif wait >= 0 then
      wait = math.max(wait, math.ceil((cost - tokens) * 1000 / rate))
    end
  end
end
if wait ~= 0 then return wait end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local left = levels[i] - cost
  redis.call('HSET', key, 'tokens', tostring(left), 'at', now)
  local refill_ms = math.ceil((burst - left) * 1000 / math.max(rate, 0.001)) + 1000
  redis.call('PEXPIRE', key, refill_ms)
end
return 0
"""

# The answer when a cost can never be paid (more than a bucket's burst, or a zero rate).
NEVER = -1


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    rate_per_s: float
    burst: int


def _args(buckets: Sequence[Bucket], cost: float) -> tuple[list[str], list[Any]]:
    keys = [bucket.key for bucket in buckets]
    args: list[Any] = [cost]
    for bucket in buckets:
        args += [bucket.rate_per_s, bucket.burst]
    return keys, args


class AsyncBuckets:
    """Buckets through an asyncio Redis client (gateways)."""

    def __init__(self, client: Any) -> None:
        self._take = client.register_script(TAKE)

    async def take(self, buckets: Sequence[Bucket], cost: float = 1) -> int:
        """0 when paid; else ms to wait (NEVER: this cost cannot be paid at all)."""
        keys, args = _args(buckets, cost)
        return int(await self._take(keys=keys, args=args))


class SyncBuckets:
    """Buckets through a blocking Redis client (Celery workers)."""

    def __init__(self, client: Any) -> None:
        self._take = client.register_script(TAKE)

    def take(self, buckets: Sequence[Bucket], cost: float = 1) -> int:
        keys, args = _args(buckets, cost)
        return int(self._take(keys=keys, args=args))


def retry_after_ms(wait_ms: int, floor_ms: int = 1) -> int:
    """A wait as a client should be told it: at least `floor_ms`, whole milliseconds."""
    return max(floor_ms, math.ceil(wait_ms))
