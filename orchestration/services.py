"""What a run step does, independent of Celery: claim, call the model, append, finish."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from celery.exceptions import SoftTimeLimitExceeded

from orchestration.agents import Step, UnknownAgent, get_agent
from orchestration.runs import Fenced, LeaseKeeper, Run, RunFinished, RunStore
from workers.backends import ModelError, ModelRequest, get_backend

logger = logging.getLogger(__name__)

# A model call is not started with less time than this left before the run's deadline.
MIN_CALL_BUDGET_S = 0.05


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What the task wrapper must do next: nothing, retry after a delay, or run a step
    (then `hand_over` with `owner` once that step's task is queued)."""

    retry_in_s: float | None = None
    next_step: int | None = None
    owner: str = field(default="", compare=False)


def execute_step(store: RunStore, run_id: str, step_index: int, retries_so_far: int) -> StepOutcome:
    run = store.claim(run_id, step_index, retries_so_far)
    if run is None:
        logger.info("step skipped: run finished or gone run=%s step=%s", run_id, step_index)
        return StepOutcome()
    try:
        with LeaseKeeper(store, run):
            outcome = _execute_claimed(store, run, step_index, retries_so_far)
        if outcome.retry_in_s is not None:
            # The retry waits out its backoff in this worker's memory: the lease covers the
            # wait, so only a worker that dies meanwhile has the step redelivered.
            store.renew_lease(run, extra_s=outcome.retry_in_s)
        if outcome.next_step is not None:
            return StepOutcome(next_step=outcome.next_step, owner=run.owner)
        return outcome
    except Fenced:
        logger.warning(
            "step fenced: a newer attempt owns tenant=%s run=%s step=%s",
            run.tenant,
            run_id,
            step_index,
        )
        return StepOutcome()
    except RunFinished:
        return StepOutcome()


def hand_over(store: RunStore, run_id: str, outcome: StepOutcome) -> None:
    """After the next step's task is queued: the run waits for it without a lease. Done
    after the enqueue, so a worker that dies in between has the finished step redelivered
    (it regenerates nothing new and enqueues the next step again), never a lost run."""
    if outcome.owner:
        store.hand_over(run_id, outcome.owner)


def _execute_claimed(
    store: RunStore, run: Run, step_index: int, retries_so_far: int
) -> StepOutcome:
    try:
        agent = get_agent(run.agent)
        step = agent.steps[step_index]
    except (UnknownAgent, IndexError):
        store.finalize(run.run_id, "failed", {"reason": "agent not available"}, owner=run.owner)
        return StepOutcome()
    seconds_left = run.seconds_left()
    if seconds_left < MIN_CALL_BUDGET_S:
        return _fall_back(store, run, step, "deadline")
    call_budget = min(step.soft_limit_s, seconds_left)
    deadline = time.monotonic() + call_budget
    backend = get_backend(step.backend)
    request = ModelRequest(
        model=step.model, prompt=run.text, options=run.options, attempt=retries_so_far + 1
    )
    # A retried call regenerates from the start; what earlier attempts already emitted is
    # skipped so the client never sees a character twice.
    to_skip = run.emitted - run.step_base
    started = time.monotonic()
    try:
        for piece in backend.stream(request, deadline):
            if to_skip:
                dropped = min(to_skip, len(piece))
                piece, to_skip = piece[dropped:], to_skip - dropped
            if piece:
                store.append_delta(run, piece)
            if time.monotonic() > deadline:
                raise ModelError("model call passed its soft time limit", transient=False)
    except ModelError as error:
        elapsed = time.monotonic() - started
        logger.warning(
            "model call failed tenant=%s run=%s step=%s attempt=%s transient=%s after=%.3fs: %s",
            run.tenant,
            run.run_id,
            step_index,
            run.attempt,
            error.transient,
            elapsed,
            error,
        )
        if error.transient and retries_so_far < step.max_retries:
            backoff = _backoff_s(retries_so_far)
            if run.seconds_left() > backoff + MIN_CALL_BUDGET_S:
                return StepOutcome(retry_in_s=backoff)
        reason = "timeout" if "time limit" in str(error) else "model_error"
        return _fall_back(store, run, step, reason)
    except (Fenced, RunFinished):
        raise
    except SoftTimeLimitExceeded:
        logger.warning("step hit Celery's soft time limit run=%s step=%s", run.run_id, step_index)
        return _fall_back(store, run, step, "timeout")
    except Exception:
        # A bug or an unclassified backend failure still owes the client its reply.done.
        logger.exception("step failed run=%s step=%s", run.run_id, step_index)
        return _fall_back(store, run, step, "internal")
    if step_index + 1 < len(agent.steps):
        return StepOutcome(next_step=step_index + 1)
    store.finalize(run.run_id, "ok", None, owner=run.owner, run=run)
    return StepOutcome()


def _fall_back(store: RunStore, run: Run, step: Step, reason: str) -> StepOutcome:
    """The degraded answer: the step's fallback text after whatever was already streamed."""
    separator = "\n" if run.emitted else ""
    store.append_delta(run, separator + step.fallback_text)
    store.finalize(run.run_id, "degraded", {"reason": reason}, owner=run.owner, run=run)
    return StepOutcome()


def _backoff_s(retries_so_far: int) -> float:
    from django.conf import settings

    return settings.SWITCHBOARD["MODEL_RETRY_BACKOFF_S"] * (2**retries_so_far)


def sweep_overdue_runs(store: RunStore, now: float | None = None) -> int:
    """End every run whose deadline has passed with its one reply.done; returns how many."""
    ended = 0
    for run_id in store.overdue(now if now is not None else time.time()):
        if store.finalize(run_id, "failed", {"reason": "deadline"}):
            ended += 1
            logger.warning("run swept at its deadline run=%s", run_id)
    return ended


def sweep_expired_leases(store: RunStore) -> int:
    """Redeliver every step whose worker stopped renewing its lease; returns how many.

    A step whose run is out of redeliveries is ended with `failed` instead.
    """
    redelivered = 0
    for run_id in store.expired_leases():
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


def sweep_runs(store: RunStore) -> Swept:
    """One sweep, by beat's task and every gateway: deadlines first (a run past its deadline
    is ended, not redelivered), then expired leases."""
    return Swept(ended=sweep_overdue_runs(store), redelivered=sweep_expired_leases(store))
