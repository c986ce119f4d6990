"""Celery tasks: thin wrappers that take ids and call orchestration's services (steps go
to the worker's model-call runtime through orchestration/dispatch.py)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from ops import logcontext
from orchestration import dispatch, sweeping, triggers
from streams.enqueue import (
    PUBLISHED_TRIGGER_TASK,
    RUN_NEXT_TASK,
    RUN_STEP_TASK,
    SWEEP_TASK,
    TRIGGER_TASK,
)
from streams.redis_clients import sync_client
from streams.runs import RunStore

logger = logging.getLogger(__name__)

# Dispatchers return once their step is claimed (orchestration/dispatch.py); the step itself
# is bounded by its run's deadline on the model-call runtime. These limits are backstops for
# a dispatcher that cannot reach Redis, enforced where the pool supports them.
DISPATCH_SOFT_LIMIT_S = 60
DISPATCH_HARD_LIMIT_S = 90


def _store() -> RunStore:
    global _run_store
    if _run_store is None:
        _run_store = RunStore(sync_client())
    return _run_store


_run_store: RunStore | None = None


@shared_task(
    name=RUN_STEP_TASK,
    bind=True,
    soft_time_limit=DISPATCH_SOFT_LIMIT_S,
    time_limit=DISPATCH_HARD_LIMIT_S,
    ignore_result=True,
)
def run_step(self, run_id: str, step: int) -> None:
    """Run one step of a run on this worker's model-call runtime. `retries` (the message's
    header) carries the model retries a redelivered step had already spent."""
    with logcontext.bound(run=run_id):
        dispatch.run_step(run_id, step, self.request.retries or 0)


@shared_task(
    name=RUN_NEXT_TASK,
    soft_time_limit=DISPATCH_SOFT_LIMIT_S,
    time_limit=DISPATCH_HARD_LIMIT_S,
    ignore_result=True,
)
def run_next() -> None:
    """A ticket: run the first step of whichever queued run is fairly next
    (streams/fairness.py). From then on the run is addressed by id."""
    dispatch.run_next()


@shared_task(name=SWEEP_TASK, ignore_result=True, time_limit=60)
def sweep_runs() -> int:
    """Ends overdue runs and redelivers steps whose worker died; returns how many ended."""
    return sweeping.sweep_runs(_store()).ended


@shared_task(
    name=TRIGGER_TASK,
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
    name=PUBLISHED_TRIGGER_TASK,
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
