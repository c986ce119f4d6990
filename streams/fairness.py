"""Fair scheduling of new runs across tenants: deficit round robin over per-tenant queues.

Celery's queue is one FIFO list, so a tenant that sends ten times its share would fill it
and every other tenant would wait behind its backlog. Instead, an accepted `send` puts its
run id on its tenant's own fair queue (a Redis list) and pushes a *ticket* onto the Celery
queue: a `switchboard.run.next` message that names no run. There is one ticket per queued
run, so Celery's length, prefetch and acknowledgements still count real work. The worker
that takes a ticket runs FAIR_PICK (streams/lua/fair_pick.lua), which chooses the run by
deficit round robin across the tenants that have runs waiting, and then executes that
run's first step as usual.

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

from streams import keys, scripts

# Runs popped and skipped (already finished, or past their deadline) in one pick at most.
# The ticket is spent either way; a skipped run needs none (the sweeper ends it).
MAX_SKIPPED_PER_PICK = 100


def quantum(weight: int | str | None) -> int:
    """A tenant's picks per turn: its weight, never below 1 (a weight of 0 would starve)."""
    try:
        return max(1, int(weight or 1))
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True, slots=True)
class Pick:
    run_id: str | None  # None: no run was waiting
    skipped: int  # finished or overdue runs dropped from the queues on the way


def _pick(lease_s: float) -> scripts.FairPick:
    return scripts.FairPick(
        ring=keys.FAIR_RING,
        deficits=keys.FAIR_DEFICITS,
        weights=keys.FAIR_WEIGHTS,
        leases_key=keys.RUN_LEASES,
        queue_prefix=keys.fair_queue(""),
        run_prefix=keys.run(""),
        lease_s=lease_s,
        max_skipped=MAX_SKIPPED_PER_PICK,
    )


def _picked(answer: tuple[str, int]) -> Pick:
    run_id, skipped = answer
    return Pick(run_id or None, skipped)


class FairQueue:
    """The fair pick through a blocking client (tests, tools)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def pick(self, lease_s: float) -> Pick:
        return _picked(_pick(lease_s).run(self.client))

    def depth(self, tenant: str) -> int:
        """Runs of the tenant waiting for a worker in its fair queue."""
        return int(self.client.llen(keys.fair_queue(tenant)))


# --- the same algorithm in plain Python -----------------------------------------------------


class AsyncFairQueue:
    """The worker's side: pick the next run on the model-call runtime."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client

    async def pick(self, lease_s: float) -> Pick:
        return _picked(await _pick(lease_s).run_async(self.client))


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
