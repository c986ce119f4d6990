"""Fair scheduling of new runs across tenants: deficit round robin over per-tenant queues.

Celery's queue is one FIFO list, so a tenant that sends ten times its share would fill it
and every other tenant would wait behind its backlog. Instead, an accepted `send` puts its
run id on its tenant's own fair queue (a Redis list) and pushes a *ticket* onto the Celery
queue: a `switchboard.run.next` message that names no run. There is one ticket per queued
run, so Celery's length, prefetch and acknowledgements still count real work. The worker
that takes a ticket runs FAIR_PICK, which chooses the run by deficit round robin across the
tenants that have runs waiting, and then executes that run's first step as usual.

Deficit round robin (DRR): the tenants with queued runs form a ring. The tenant at the head
has a deficit (picks it may still take this turn); on reaching the head with less than one
pick left it gets its quantum, its weight (`Tenant.weight`, at least 1). Each pick costs
one; a tenant whose deficit falls below one goes to the tail; a tenant whose queue empties
leaves the ring and forfeits what it had left, so idle time is never saved up for a later
burst. With weights 3 and 1 the picks go A A A B A A A B ...; with equal weights they
alternate, however long one tenant's queue is. Runs are charged per pick, not per second of
model time.

The pick holds a lease: in the same script it sets the run's `lease` (and its score in the
lease set) exactly as a claim would, while the run stays `queued`. The worker then claims
the run (CLAIM_STEP), which replaces that lease with its own. A worker that dies between
the two leaves a queued run with an expiring lease, and the lease sweeper redelivers it
like any lost step (REDELIVER_STEP), as a direct `switchboard.run.step` message.

A ticket lost without its run (a task that took it failed on a dead Redis connection) is
replaced by the sweep: orchestration/tickets.py counts runs queued against tickets pending
and enqueues the difference.

Later steps of a multi-step run, retries and redeliveries keep addressing their run
directly (`switchboard.run.step`): the run was admitted once, and fairness is about who
gets admitted next.

`DeficitRoundRobin` below is the same algorithm in plain Python, step for step, for tests
and for reasoning; `tests/store/test_fairness.py` checks the two give the same picks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis

from streams import keys

# Runs popped and skipped (already finished, or past their deadline) in one pick at most.
# The ticket is spent either way; a skipped run needs none (the sweeper ends it).
MAX_SKIPPED_PER_PICK = 100


def quantum(weight: int | str | None) -> int:
    """A tenant's picks per turn: its weight, never below 1 (a weight of 0 would starve)."""
    try:
        return max(1, int(weight or 1))
    except (TypeError, ValueError):
        return 1


# The fair pick. Runs in one script: the ring, the deficits, the tenant's queue and the
# run's pick lease change together or not at all.
# KEYS: fair_ring, fair_deficits, fair_weights, run_leases
# ARGV: queue_key_prefix, run_key_prefix, lease_s, max_skipped
# Returns {RUN_ID, skipped} picked; {'', skipped} nothing (left) to pick.
FAIR_PICK = """
local ring, deficits, weights, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queue_prefix, run_prefix = ARGV[1], ARGV[2]
local lease_s, max_skipped = tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local skipped = 0
while true do
  local tenant = redis.call('LINDEX', ring, 0)
  if not tenant then return {'', skipped} end
  local queue = queue_prefix .. tenant
  local deficit = tonumber(redis.call('HGET', deficits, tenant)) or 0
  if deficit < 1 then
    -- At the head with no pick left: this turn's quantum.
    deficit = deficit + math.max(1, math.floor(tonumber(redis.call('HGET', weights, tenant)) or 1))
  end
  local run_id = redis.call('RPOP', queue)
  local live = false
  if run_id then
    local run = redis.call('HMGET', run_prefix .. run_id, 'status', 'deadline')
    -- A run cancelled or ended by the sweeper while queued, or already past its deadline
    -- (the deadline sweep ends it), costs no worker and no pick.
    live = run[1] == 'queued' and (tonumber(run[2]) or 0) > now
  end
  if redis.call('LLEN', queue) == 0 then
    -- Nothing more queued: the tenant leaves the ring and forfeits its deficit.
    redis.call('LPOP', ring)
    redis.call('HDEL', deficits, tenant)
  else
    if live then deficit = deficit - 1 end
    if deficit < 1 then redis.call('RPUSH', ring, redis.call('LPOP', ring)) end
    redis.call('HSET', deficits, tenant, deficit)
  end
  if live then
    -- The pick lease: the run stays queued until its claim, which replaces the lease.
    local run_key = run_prefix .. run_id
    local lease = string.format('%.3f', math.floor((now + lease_s) * 1000) / 1000)
    redis.call('HSET', run_key, 'step', 0, 'lease', lease)
    redis.call('ZADD', leases_key, lease, run_id)
    return {run_id, skipped}
  end
  if run_id then
    skipped = skipped + 1
    if skipped >= max_skipped then return {'', skipped} end
  end
end
"""


@dataclass(frozen=True, slots=True)
class Pick:
    run_id: str | None  # None: no run was waiting
    skipped: int  # finished or overdue runs dropped from the queues on the way


def _pick_keys() -> list[str]:
    return [keys.FAIR_RING, keys.FAIR_DEFICITS, keys.FAIR_WEIGHTS, keys.RUN_LEASES]


def _picked(answer: list[bytes | str | int]) -> Pick:
    run_id, skipped = answer
    text = run_id.decode() if isinstance(run_id, bytes) else str(run_id)
    return Pick(text or None, int(skipped))


class FairQueue:
    """The fair pick through a blocking client (tests, tools)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._pick = client.register_script(FAIR_PICK)

    def pick(self, lease_s: float) -> Pick:
        return _picked(
            self._pick(
                keys=_pick_keys(),
                args=[keys.fair_queue(""), keys.run(""), lease_s, MAX_SKIPPED_PER_PICK],
            )
        )

    def depth(self, tenant: str) -> int:
        """Runs of the tenant waiting for a worker in its fair queue."""
        return int(self.client.llen(keys.fair_queue(tenant)))


# --- the same algorithm in plain Python -----------------------------------------------------


class AsyncFairQueue:
    """The worker's side: pick the next run on the model-call runtime."""

    def __init__(self, client: aredis.Redis) -> None:
        self._pick = client.register_script(FAIR_PICK)

    async def pick(self, lease_s: float) -> Pick:
        return _picked(
            await self._pick(
                keys=_pick_keys(),
                args=[keys.fair_queue(""), keys.run(""), lease_s, MAX_SKIPPED_PER_PICK],
            )
        )


@dataclass
class DeficitRoundRobin:
    """FAIR_PICK without Redis: `push` is ACCEPT_SEND's part, `pick` the worker's.

    Every run here is live (the script's skipping of finished runs is not modelled).
    """

    ring: deque[str] = field(default_factory=deque)
    deficits: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    queues: dict[str, deque[str]] = field(default_factory=dict)

    def push(self, tenant: str, run_id: str, weight: int = 1) -> None:
        queue = self.queues.setdefault(tenant, deque())
        queue.append(run_id)
        if len(queue) == 1:  # it was empty, so the tenant was not in the ring
            self.ring.append(tenant)
        self.weights[tenant] = weight

    def pick(self) -> str | None:
        if not self.ring:
            return None
        tenant = self.ring[0]
        deficit = self.deficits.get(tenant, 0)
        if deficit < 1:
            deficit += quantum(self.weights.get(tenant))
        queue = self.queues[tenant]
        run_id = queue.popleft()
        if not queue:
            self.ring.popleft()
            self.deficits.pop(tenant, None)
        else:
            deficit -= 1
            if deficit < 1:
                self.ring.rotate(-1)
            self.deficits[tenant] = deficit
        return run_id
