"""Celery tasks: thin wrappers that load by id and call orchestration.services."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings

from orchestration import services, triggers
from orchestration.fairness import FairQueue
from orchestration.runs import RunStore
from realtime import logcontext
from realtime.redis_clients import sync_client

logger = logging.getLogger(__name__)

SOFT_LIMIT_S = settings.SWITCHBOARD["RUN_DEADLINE_S"] + 5
HARD_LIMIT_S = SOFT_LIMIT_S + 10


def _store() -> RunStore:
    global _run_store
    if _run_store is None:
        _run_store = RunStore(sync_client())
    return _run_store


def _fair_queue() -> FairQueue:
    global _fair
    if _fair is None:
        _fair = FairQueue(sync_client())
    return _fair


_run_store: RunStore | None = None
_fair: FairQueue | None = None


def _step(store: RunStore, run_id: str, step: int, retries: int) -> float | None:
    """Execute one step and queue what follows it; returns the retry delay, if any."""
    # Log lines name the run (and, once it is claimed, its tenant); reset after the step,
    # as the pool process goes on to other runs.
    with logcontext.bound(run=run_id):
        outcome = services.execute_step(store, run_id, step, retries)
        if outcome.retry_in_s is not None:
            return outcome.retry_in_s
        if outcome.next_step is not None:
            run_step.apply_async(args=[run_id, outcome.next_step])
            services.hand_over(store, run_id, outcome)
        return None


@shared_task(
    name="switchboard.run.step",
    bind=True,
    # Backstops behind the run's own deadline: Celery interrupts, then kills, a stuck step.
    soft_time_limit=SOFT_LIMIT_S,
    time_limit=HARD_LIMIT_S,
    max_retries=None,
    ignore_result=True,
)
def run_step(self, run_id: str, step: int) -> None:  # type: ignore[no-untyped-def]
    retry_in_s = _step(_store(), run_id, step, self.request.retries)
    if retry_in_s is not None:
        raise self.retry(countdown=retry_in_s)


@shared_task(
    name="switchboard.run.next",
    soft_time_limit=SOFT_LIMIT_S,
    time_limit=HARD_LIMIT_S,
    ignore_result=True,
)
def run_next() -> None:
    """A ticket: run the first step of whichever queued run is fairly next
    (orchestration/fairness.py). From then on the run is addressed by id."""
    store = _store()
    picked = _fair_queue().pick(store.lease_s)
    if picked.run_id is None:
        # A spare ticket (a requeued or restored message): its run was started by another.
        logger.info("ticket found no queued run skipped=%s", picked.skipped)
        return
    retry_in_s = _step(store, picked.run_id, 0, 0)
    if retry_in_s is not None:
        # Not self.retry: that would queue another ticket, not this run.
        run_step.apply_async(args=[picked.run_id, 0], countdown=retry_in_s, retries=1)


@shared_task(name="switchboard.runs.sweep", ignore_result=True, time_limit=60)
def sweep_runs() -> int:
    """Ends overdue runs and redelivers steps whose worker died; returns how many ended."""
    return services.sweep_runs(_store()).ended


@shared_task(
    name="switchboard.agents.trigger",
    ignore_result=True,
    # A few Redis round trips and at most one database read per subscriber.
    soft_time_limit=30,
    time_limit=60,
)
def trigger_subscribers(run_id: str, event_id: str) -> None:
    """An agent's reply.done that other agents subscribe to: start each of them once
    (orchestration/triggers.py). Queued by FINALIZE_RUN with the event itself."""
    with logcontext.bound(run=run_id, event=event_id):
        triggers.start_subscribers(_store(), run_id, event_id)


@shared_task(
    name="switchboard.agents.trigger_published",
    ignore_result=True,
    soft_time_limit=30,
    time_limit=60,
)
def trigger_published_subscribers(
    tenant: str, stream: str, event_id: str, client: str, message_id: str, data: Any
) -> None:
    """A client's published event that agents subscribe to: start each of them once
    (orchestration/triggers.py). Queued by APPEND_EVENT with the event itself."""
    with logcontext.bound(tenant=tenant, event=event_id):
        triggers.start_published_subscribers(
            _store(), tenant, stream, event_id, client, message_id, data
        )
