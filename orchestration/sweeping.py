"""Sweeping runs, independent of Celery: end overdue runs, redeliver steps whose worker died.

Run deadlines and leases are indexed per tenant (in the tenant's hash slot, so the scripts
that write them stay in one slot on a Redis Cluster); a sweep visits every tenant of the
registry (streams/registry.py) in turn. Executing a step lives in orchestration/steps.py,
on the worker's model-call runtime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from orchestration.tickets import reconcile_tickets
from streams.registry import tenants
from streams.runs import RunStore

logger = logging.getLogger(__name__)


def sweep_overdue_runs(store: RunStore, now: float | None = None) -> int:
    """End every run whose deadline has passed with its one reply.done; returns how many."""
    ended = 0
    now = now if now is not None else time.time()
    for run_id in store.overdue_of(tenants(store.client), now):
        if store.finalize(run_id, "failed", {"reason": "deadline"}):
            ended += 1
            logger.warning("run swept at its deadline run=%s", run_id)
    return ended


def sweep_expired_leases(store: RunStore) -> int:
    """Redeliver every step whose worker stopped renewing its lease; returns how many.

    A step whose run is out of redeliveries is ended with `failed` instead.
    """
    redelivered = 0
    for run_id in store.expired_leases_of(tenants(store.client)):
        result = store.redeliver(run_id)
        if result.outcome == "redelivered":
            redelivered += 1
            logger.warning(
                "step redelivered after its lease ran out tenant=%s run=%s step=%s redelivery=%s",
                result.tenant,
                run_id,
                result.step,
                result.redeliveries,
            )
        elif result.outcome == "exhausted":
            if store.finalize(run_id, "failed", {"reason": "worker_lost"}):
                logger.error(
                    "run failed: its step lost its worker %s times tenant=%s run=%s step=%s",
                    result.redeliveries + 1,
                    result.tenant,
                    run_id,
                    result.step,
                )
    return redelivered


@dataclass(frozen=True, slots=True)
class Swept:
    ended: int  # runs ended at their deadline
    redelivered: int  # steps enqueued again after their lease ran out
    tickets: int = 0  # fair-queue tickets enqueued for queued runs that had none


def sweep_runs(store: RunStore) -> Swept:
    """One sweep, by beat's task and every gateway: deadlines first (a run past its deadline
    is ended, not redelivered), then expired leases, then lost tickets (tickets.py)."""
    return Swept(
        ended=sweep_overdue_runs(store),
        redelivered=sweep_expired_leases(store),
        tickets=reconcile_tickets(store.client),
    )
