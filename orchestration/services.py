"""What a run step does, independent of Celery: claim, call the model, append, finish."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from celery.exceptions import SoftTimeLimitExceeded

from orchestration.agents import Step, UnknownAgent, get_agent
from orchestration.coalesce import Coalescer
from orchestration.runs import Fenced, LeaseKeeper, Run, RunFinished, RunStore
from realtime.buckets import SyncBuckets
from workers import limits
from workers.backends import ModelCancelled, ModelError, ModelRequest, get_backend

logger = logging.getLogger(__name__)

# Kept back from the run's deadline for the fallback and the reply.done: a call cut off by
# the deadline still answers `degraded` before the sweeper would end the run `failed`.
FINISH_RESERVE_S = 0.2


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
    # Set by the lease keeper once the run is no longer this step's (cancelled, swept,
    # fenced): the model call and any wait for its backend's budget are abandoned.
    lost = threading.Event()
    try:
        with LeaseKeeper(store, run, lost=lost, check_s=_cancel_check_s()):
            outcome = _execute_claimed(store, run, step_index, retries_so_far, lost)
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
    store: RunStore, run: Run, step_index: int, retries_so_far: int, lost: threading.Event
) -> StepOutcome:
    try:
        agent = get_agent(run.agent)
        step = agent.steps[step_index]
    except (UnknownAgent, IndexError):
        store.finalize(run.run_id, "failed", {"reason": "agent not available"}, owner=run.owner)
        return StepOutcome()
    # Deadline propagation: a call that cannot get its minimum useful time is not started.
    if _time_for_call(run) < step.min_budget_s:
        return _fall_back(store, run, step, "deadline")
    waited = _take_backend_budget(store, run, step, lost)
    if waited == "lost":
        return _abandoned(run, step_index)
    if waited == "rate_limited":
        return _fall_back(store, run, step, "rate_limited")
    time_for_call = _time_for_call(run)  # again: the budget may have been waited for
    if time_for_call < step.min_budget_s:
        return _fall_back(store, run, step, "deadline")
    call_budget = min(step.soft_limit_s, time_for_call)
    deadline = time.monotonic() + call_budget
    backend = get_backend(step.backend)
    request = ModelRequest(
        model=step.model,
        prompt=run.text,
        options=run.options,
        attempt=retries_so_far + 1,
        cancelled=lost,
    )
    # A retried call regenerates from the start; what earlier attempts already emitted is
    # skipped so the client never sees a character twice.
    to_skip = run.emitted - run.step_base
    # Pieces are appended in coalesced deltas (orchestration/coalesce.py); what is still
    # buffered is appended before the call's outcome is acted on, or dropped if the run
    # stopped needing it.
    coalescer = _coalescer()
    started = time.monotonic()
    try:
        for piece in backend.stream(request, deadline):
            if lost.is_set():
                # A backend that does not watch the event is still stopped here, at its
                # next piece, without a write.
                raise ModelCancelled()
            if to_skip:
                dropped = min(to_skip, len(piece))
                piece, to_skip = piece[dropped:], to_skip - dropped
            if text := coalescer.add(piece):
                store.append_delta(run, text)
            if time.monotonic() > deadline:
                raise ModelError("model call passed its soft time limit", transient=False)
        _append_pending(store, run, coalescer, lost)
    except ModelError as error:
        if lost.is_set():
            coalescer.discard()
            return _abandoned(run, step_index)
        _append_pending(store, run, coalescer, lost)
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
            if _time_for_call(run) > backoff + step.min_budget_s:
                return StepOutcome(retry_in_s=backoff)
        reason = "timeout" if "time limit" in str(error) else "model_error"
        return _fall_back(store, run, step, reason)
    except (Fenced, RunFinished):
        raise
    except SoftTimeLimitExceeded:
        logger.warning("step hit Celery's soft time limit run=%s step=%s", run.run_id, step_index)
        _append_pending(store, run, coalescer, lost)
        return _fall_back(store, run, step, "timeout")
    except Exception:
        # A bug or an unclassified backend failure still owes the client its reply.done.
        logger.exception("step failed run=%s step=%s", run.run_id, step_index)
        _append_pending(store, run, coalescer, lost)
        return _fall_back(store, run, step, "internal")
    if step_index + 1 < len(agent.steps):
        return StepOutcome(next_step=step_index + 1)
    store.finalize(run.run_id, "ok", None, owner=run.owner, run=run)
    return StepOutcome()


def _coalescer() -> Coalescer:
    from django.conf import settings

    config = settings.SWITCHBOARD
    return Coalescer(config.get("DELTA_FLUSH_CHARS", 64), config.get("DELTA_FLUSH_MS", 50) / 1000)


def _append_pending(store: RunStore, run: Run, coalescer: Coalescer, lost: threading.Event) -> None:
    """Append what the coalescer still holds, unless the run stopped needing this step
    (then it is dropped: whoever took the run over writes its reply)."""
    if lost.is_set():
        coalescer.discard()
    elif text := coalescer.flush():
        store.append_delta(run, text)


def _time_for_call(run: Run) -> float:
    """What a model call may use: the time left before the run's deadline, less what the
    fallback and reply.done need."""
    return run.seconds_left() - FINISH_RESERVE_S


def _abandoned(run: Run, step_index: int) -> StepOutcome:
    """The run stopped needing this step (cancelled, ended by the sweeper, taken over by a
    newer attempt): whoever did that owns its reply.done, so nothing is written."""
    logger.info(
        "model call abandoned: the run is no longer this step's tenant=%s run=%s step=%s",
        run.tenant,
        run.run_id,
        step_index,
    )
    return StepOutcome()


def _take_backend_budget(store: RunStore, run: Run, step: Step, lost: threading.Event) -> str:
    """Take one call's worth from the backend's rate limits (global, in Redis), waiting for
    it while the run can afford to. "ok" (paid, or the backend is not limited),
    "rate_limited" (it would come back too late to make a useful call before the deadline,
    or never) or "lost" (the run stopped needing the call while it waited). The wait
    never passes the deadline; the lease keeper keeps the lease alive meanwhile."""
    limit = _backend_limits().get(step.backend)
    if limit is None:
        return "ok"
    budget = limits.BackendBudget(_buckets(store), step.backend, limit, run.text)
    while (wait_ms := budget.take()) != 0:
        if limits.decide(wait_ms, _time_for_call(run), step.min_budget_s) == limits.GIVE_UP:
            logger.warning(
                "model call not started: backend %s over its rate limit tenant=%s run=%s "
                "wait_ms=%s",
                step.backend,
                run.tenant,
                run.run_id,
                wait_ms,
            )
            return "rate_limited"
        if lost.wait(wait_ms / 1000):
            return "lost"
    return "ok"


_limits_cache: tuple[object, dict[str, limits.BackendLimit]] | None = None
_buckets_cache: tuple[object, SyncBuckets] | None = None


def _backend_limits() -> dict[str, limits.BackendLimit]:
    global _limits_cache
    from django.conf import settings

    raw = settings.SWITCHBOARD.get("BACKEND_LIMITS") or {}
    if _limits_cache is None or _limits_cache[0] is not raw:
        _limits_cache = (raw, limits.parse_limits(raw))
    return _limits_cache[1]


def _buckets(store: RunStore) -> SyncBuckets:
    """Buckets over the store's client: the worker's sync Redis client (the runs' Redis)."""
    global _buckets_cache
    client = store.client
    if _buckets_cache is None or _buckets_cache[0] is not client:
        _buckets_cache = (client, SyncBuckets(client))
    return _buckets_cache[1]


def _cancel_check_s() -> float:
    from django.conf import settings

    return settings.SWITCHBOARD.get("CANCEL_CHECK_S", 0.5)


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
