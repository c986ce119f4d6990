"""Celery tasks: thin wrappers that load by id and call orchestration.services."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from orchestration import services
from orchestration.runs import RunStore
from realtime.redis_clients import sync_client

SOFT_LIMIT_S = settings.SWITCHBOARD["RUN_DEADLINE_S"] + 5
HARD_LIMIT_S = SOFT_LIMIT_S + 10


def _store() -> RunStore:
    global _run_store
    if _run_store is None:
        _run_store = RunStore(sync_client())
    return _run_store


_run_store: RunStore | None = None


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
    store = _store()
    outcome = services.execute_step(store, run_id, step, self.request.retries)
    if outcome.retry_in_s is not None:
        raise self.retry(countdown=outcome.retry_in_s)
    if outcome.next_step is not None:
        run_step.apply_async(args=[run_id, outcome.next_step])
        services.hand_over(store, run_id, outcome)


@shared_task(name="switchboard.runs.sweep", ignore_result=True, time_limit=60)
def sweep_runs() -> int:
    """Ends overdue runs and redelivers steps whose worker died; returns how many ended."""
    return services.sweep_runs(_store()).ended
