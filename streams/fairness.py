"""Fair scheduling of new runs across tenants: deficit round robin over per-tenant queues.

Celery's queue is one FIFO list, so a tenant that sends ten times its share would fill it
and every other tenant would wait behind its backlog. Instead, an accepted `send` puts its
run id on its tenant's own fair queue (a Redis list) and pushes a *ticket* onto the Celery
queue: a `switchboard.run.next` message that names no run. There is one ticket per queued
run, so Celery's length, prefetch and acknowledgements still count real work. The worker
that takes a ticket makes the fair pick (FAIR_POP and FAIR_SETTLE, below), which chooses the run by
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

Redis Cluster: the ring (`FAIR_RING`, its deficits and epochs) is global and lives in a slot
of its own, while each tenant's queue lives in the tenant's slot with its runs. So a pick is
three calls, each in one slot: read the ring's head tenant (LINDEX); FAIR_POP takes the
oldest run off that tenant's queue and leases it, in the tenant's slot; FAIR_SETTLE does the
round robin's bookkeeping in the ring's slot. A send that makes a tenant's queue non-empty
tells the ring after its own script (FAIR_JOIN, which pushes the ticket too, so no worker
takes the ticket before the ring has the tenant). The tenant's queue counts its pushes (an
epoch) and the ring keeps the latest epoch it was told of: FAIR_SETTLE takes a tenant out
only when FAIR_POP saw its queue empty at that epoch or later, so a send racing a pick can
never leave a queued run outside the ring. A sender that dies between its script and the
join leaves exactly that, which the sweep repairs (`reconcile_ring`). Two workers picking at
once may both settle the same head; the ring stays a set of tenants and each queue is
drained, only the turn's exact order is approximate then.

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
from streams.enqueue import RUNS_QUEUE

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


# Ring heads read in one pick at most, beyond the skipped runs: a settle that keeps a tenant
# whose queue it saw empty (a send raced it) sends the pick round once more.
MAX_EMPTY_PER_PICK = 10


def _pop(tenant: str, lease_s: float) -> scripts.FairPop:
    return scripts.FairPop(
        fair_queue_key=keys.fair_queue(tenant),
        fair_state_key=keys.fair_state(tenant),
        leases_key=keys.run_leases(tenant),
        run_prefix=keys.run_prefix(tenant),
        lease_s=lease_s,
    )


def _settle(tenant: str, popped: scripts.Popped) -> scripts.FairSettle:
    return scripts.FairSettle(
        ring=keys.FAIR_RING,
        deficits=keys.FAIR_DEFICITS,
        epochs=keys.FAIR_EPOCHS,
        picked=keys.FAIR_PICKED,
        tenant=tenant,
        live=int(popped.live),
        left=popped.left,
        epoch=popped.epoch,
        weight=popped.weight,
    )


def join_call(tenant: str, epoch: int, message: str) -> scripts.FairJoin:
    """FAIR_JOIN: the tenant's queue went non-empty at `epoch` (with the ticket `message`
    when the broker is the streams' Redis, else "")."""
    return scripts.FairJoin(
        ring=keys.FAIR_RING,
        epochs=keys.FAIR_EPOCHS,
        queue_key=keys.celery_queue(RUNS_QUEUE),
        tenant=tenant,
        epoch=epoch,
        message=message,
    )


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class FairQueue:
    """The fair pick through a blocking client (tests, tools)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def pick(self, lease_s: float) -> Pick:
        skipped = empty = 0
        while skipped < MAX_SKIPPED_PER_PICK and empty < MAX_EMPTY_PER_PICK:
            tenant = _text(self.client.lindex(keys.FAIR_RING, 0))
            if tenant is None:
                break
            popped = _pop(tenant, lease_s).run(self.client)
            _settle(tenant, popped).run(self.client)
            if popped.live:
                return Pick(popped.run_id, skipped)
            if popped.run_id:
                skipped += 1
            else:
                empty += 1
        return Pick(None, skipped)

    def depth(self, tenant: str) -> int:
        """Runs of the tenant waiting for a worker in its fair queue."""
        return int(self.client.llen(keys.fair_queue(tenant)))


class AsyncFairQueue:
    """The worker's side: pick the next run on the model-call runtime."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client

    async def pick(self, lease_s: float) -> Pick:
        skipped = empty = 0
        while skipped < MAX_SKIPPED_PER_PICK and empty < MAX_EMPTY_PER_PICK:
            tenant = _text(await self.client.lindex(keys.FAIR_RING, 0))
            if tenant is None:
                break
            popped = await _pop(tenant, lease_s).run_async(self.client)
            await _settle(tenant, popped).run_async(self.client)
            if popped.live:
                return Pick(popped.run_id, skipped)
            if popped.run_id:
                skipped += 1
            else:
                empty += 1
        return Pick(None, skipped)


def reconcile_ring(client: redis.Redis, tenant: str) -> bool:
    """Put a tenant with queued runs back in the ring if it is missing (its sender died
    between its script and FAIR_JOIN); True when it was missing. The sweep's repair."""
    depth = client.llen(keys.fair_queue(tenant))
    if not depth:
        return False
    epoch = int(client.hget(keys.fair_state(tenant), "epoch") or 0)
    return join_call(tenant, epoch, "").run(client)


# --- the same algorithm in plain Python -----------------------------------------------------


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
