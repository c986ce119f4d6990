"""What a run step does, independent of Celery: claim, call the model, append, finish."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from orchestration.agents import (
    Agent,
    PythonStep,
    Step,
    StepContext,
    UnknownAgent,
    get_agent,
    render_prompt,
)
from orchestration.coalesce import Coalescer
from orchestration.reasons import degraded_message
from orchestration.runs import Fenced, LeaseKeeper, Run, RunFinished, RunStore
from realtime import logcontext, metrics
from realtime.buckets import SyncBuckets
from workers import limits
from workers.backends import ModelCancelled, ModelError, ModelRequest, ModelTimeout, get_backend

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
    # Log lines of the step name its tenant and message too (within the task's scope).
    logcontext.update(tenant=run.tenant, event=run.message_event)
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
        return _fall_back(store, run, agent, step_index, "deadline")
    try:
        context = step_context(run, agent, step_index)
        prompt = render_prompt(step.prompt, context) if isinstance(step, Step) else ""
    except Exception:
        logger.exception(
            "step's prompt failed tenant=%s run=%s step=%s", run.tenant, run.run_id, step_index
        )
        return _fall_back(store, run, agent, step_index, "internal")
    if isinstance(step, PythonStep):
        return _execute_python(store, run, agent, step_index, context, lost)
    waited = _take_budgets(store, run, agent, step_index, prompt, lost)
    if waited == "lost":
        return _abandoned(run, step_index)
    if waited == "rate_limited":
        return _fall_back(store, run, agent, step_index, "rate_limited")
    time_for_call = _time_for_call(run)  # again: the budget may have been waited for
    if time_for_call < step.min_budget_s:
        return _fall_back(store, run, agent, step_index, "deadline")
    call_budget = min(step.soft_limit_s, time_for_call)
    deadline = time.monotonic() + call_budget
    backend = get_backend(step.backend)
    overrides = run.agent_config if step.backend != "simulated" else {}
    request = ModelRequest(
        model=overrides.get("model") or step.model,
        prompt=prompt,
        options=run.options,
        attempt=retries_so_far + 1,
        cancelled=lost,
        api_key_env=overrides.get("api_key_env", ""),
        base_url=overrides.get("base_url", ""),
    )
    # A retried call regenerates from the start; what earlier attempts already emitted is
    # skipped so the client never sees a character twice. A hidden step emits nothing.
    to_skip = run.emitted - run.step_base if step.visible else 0
    # Pieces are appended in coalesced deltas (orchestration/coalesce.py); what is still
    # buffered is appended before the call's outcome is acted on, or dropped if the run
    # stopped needing it. A hidden step's pieces are only collected, for the next step.
    coalescer = _coalescer()
    produced: list[str] = []
    started = time.monotonic()

    def called(outcome: str) -> None:
        metrics.model_call(step.backend, outcome, time.monotonic() - started)

    try:
        for piece in backend.stream(request, deadline):
            if lost.is_set():
                # A backend that does not watch the event is still stopped here, at its
                # next piece, without a write.
                raise ModelCancelled()
            if to_skip:
                dropped = min(to_skip, len(piece))
                piece, to_skip = piece[dropped:], to_skip - dropped
            produced.append(piece)
            if step.visible and (text := coalescer.add(piece)):
                store.append_delta(run, text)
            if time.monotonic() > deadline:
                raise ModelTimeout()
        _append_pending(store, run, coalescer, lost)
    except ModelError as error:
        if lost.is_set():
            called("cancelled")
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
        # A call that ran out its soft limit has had the step's time: the fallback now,
        # not another attempt (however transient a stall is), so the client waits at most
        # the soft limit for an answer.
        spent = isinstance(error, ModelTimeout)
        if error.transient and not spent and retries_so_far < step.max_retries:
            # The provider's Retry-After, when it gave one, is the least wait.
            backoff = max(_backoff_s(retries_so_far), error.retry_after_s or 0.0)
            if _time_for_call(run) > backoff + step.min_budget_s:
                called("error")
                return StepOutcome(retry_in_s=backoff)
        called("timeout" if spent else "fallback")
        reason = "timeout" if spent else "model_error"
        return _fall_back(store, run, agent, step_index, reason, error)
    except (Fenced, RunFinished):
        called("cancelled")
        raise
    except SoftTimeLimitExceeded:
        called("timeout")
        logger.warning("step hit Celery's soft time limit run=%s step=%s", run.run_id, step_index)
        _append_pending(store, run, coalescer, lost)
        return _fall_back(store, run, agent, step_index, "timeout")
    except Exception:
        # A bug or an unclassified backend failure still owes the client its reply.done.
        called("fallback")
        logger.exception("step failed run=%s step=%s", run.run_id, step_index)
        _append_pending(store, run, coalescer, lost)
        return _fall_back(store, run, agent, step_index, "internal")
    called("ok")
    output = "".join(produced)
    if step.visible and run.emitted - run.step_base != len(output):
        # A retry skipped what an earlier attempt streamed: the output is what the client
        # read, from the reply itself.
        output = store.text_of(run.run_id)[run.step_base :]
    return _step_done(store, run, agent, step_index, output)


def step_context(run: Run, agent: Agent, step_index: int) -> StepContext:
    """What step `step_index` of the run sees: the earlier steps' outputs by name."""
    names = agent.step_names()
    outputs = {
        names[index]: run.outputs[index] for index in range(step_index) if index in run.outputs
    }
    previous = run.outputs.get(step_index - 1) if step_index else None
    return StepContext(
        tenant=run.tenant,
        stream=run.stream,
        agent=run.agent,
        run_id=run.run_id,
        message=run.text,
        input=run.text if previous is None else previous,
        outputs=outputs,
        options=run.options,
        depth=run.depth,
        trigger=run.trigger,
    )


def _step_done(
    store: RunStore, run: Run, agent: Agent, step_index: int, output: str, fell_back: str = ""
) -> StepOutcome:
    """A step has its output: hand it to the next step, or end the run."""
    if step_index + 1 < len(agent.steps):
        store.save_output(run, step_index, output, fell_back)
        return StepOutcome(next_step=step_index + 1)
    fell_back = fell_back or run.fell_back
    if fell_back:
        # An earlier step gave its fallback and the pipeline went on.
        reason, _, step_name = fell_back.partition(":")
        detail = {"reason": reason, "message": degraded_message(reason), "step": step_name}
        store.finalize(run.run_id, "degraded", detail, owner=run.owner, run=run)
    else:
        store.finalize(run.run_id, "ok", None, owner=run.owner, run=run)
    return StepOutcome()


def _execute_python(
    store: RunStore,
    run: Run,
    agent: Agent,
    step_index: int,
    context: StepContext,
    lost: threading.Event,
) -> StepOutcome:
    step = agent.steps[step_index]
    assert isinstance(step, PythonStep)
    budget = min(step.soft_limit_s, _time_for_call(run))
    try:
        output = _call_in_thread(step, context, budget, lost, f"{run.run_id}:{step_index}")
    except ModelCancelled:
        return _abandoned(run, step_index)
    except ModelTimeout:
        logger.warning(
            "python step passed its soft limit tenant=%s run=%s step=%s limit=%.3fs",
            run.tenant,
            run.run_id,
            step_index,
            budget,
        )
        return _fall_back(store, run, agent, step_index, "timeout")
    except Exception:
        logger.exception(
            "python step failed tenant=%s run=%s step=%s", run.tenant, run.run_id, step_index
        )
        return _fall_back(store, run, agent, step_index, "internal")
    if step.visible and output and run.emitted == run.step_base:
        # Not on a redelivery that already streamed it.
        store.append_delta(run, output)
    return _step_done(store, run, agent, step_index, output)


def _call_in_thread(
    step: PythonStep, context: StepContext, budget_s: float, lost: threading.Event, label: str
) -> str:
    """Run the step's function with a time limit. Python cannot stop a thread, so one that
    overruns is left to finish in the background (daemon) while the run moves on."""
    result: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            result["value"] = step.run(context)
        except BaseException as error:  # handed to the step's thread, re-raised there
            result["error"] = error
        finally:
            finished.set()

    threading.Thread(target=target, name=f"python-step-{label}", daemon=True).start()
    until = time.monotonic() + budget_s
    while not finished.wait(min(max(until - time.monotonic(), 0), 0.1)):
        if lost.is_set():
            raise ModelCancelled()
        if time.monotonic() >= until:
            raise ModelTimeout()
    if "error" in result:
        raise result["error"]
    value = result.get("value")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(
            f"python step {step.name or step.run!r} returned {type(value).__name__}, not str"
        )
    return value


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


def _take_budgets(
    store: RunStore, run: Run, agent: Agent, step_index: int, prompt: str, lost: threading.Event
) -> str:
    """Take one call's worth from the backend's rate limits (global) and the step's own
    (per tenant), in Redis, waiting for them while the run can afford to. "ok" (paid, or
    not limited), "rate_limited" (they would come back too late to make a useful call
    before the deadline, or never) or "lost" (the run stopped needing the call while it
    waited). The wait never passes the deadline; the lease keeper keeps the lease alive."""
    step = agent.steps[step_index]
    assert isinstance(step, Step)
    budgets = []
    backend_limit = _backend_limits().get(step.backend)
    if backend_limit is not None:
        budgets.append(
            (
                step.backend,
                limits.BackendBudget(_buckets(store), step.backend, backend_limit, prompt),
            )
        )
    if step.rate_limit:
        scope = f"{run.tenant}:{agent.name}:{agent.step_names()[step_index]}"
        step_limit = limits.parse_limits({scope: step.rate_limit})[scope]
        budgets.append(
            (scope, limits.BackendBudget(_buckets(store), scope, step_limit, prompt, kind="step"))
        )
    for scope, budget in budgets:
        while (wait_ms := budget.take()) != 0:
            if limits.decide(wait_ms, _time_for_call(run), step.min_budget_s) == limits.GIVE_UP:
                logger.warning(
                    "model call not started: %s over its rate limit tenant=%s run=%s wait_ms=%s",
                    scope,
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


def _fall_back(
    store: RunStore,
    run: Run,
    agent: Agent,
    step_index: int,
    reason: str,
    error: BaseException | None = None,
) -> StepOutcome:
    """The step cannot answer: its fallback text. The run ends `degraded` with that text
    after whatever was already streamed, or, for a step that continues on fallback, the
    text is its output and the pipeline goes on."""
    step = agent.steps[step_index]
    name = agent.step_names()[step_index]
    if step.continue_on_fallback and step_index + 1 < len(agent.steps):
        if step.visible and step.fallback_text and run.emitted == run.step_base:
            store.append_delta(run, step.fallback_text)
        return _step_done(store, run, agent, step_index, step.fallback_text, f"{reason}:{name}")
    separator = "\n" if run.emitted else ""
    store.append_delta(run, separator + step.fallback_text)
    # `message`: the reason in words for the person reading the reply (orchestration/reasons.py).
    detail = {"reason": reason, "message": degraded_message(reason, error)}
    if len(agent.steps) > 1:
        detail["step"] = name
    store.finalize(run.run_id, "degraded", detail, owner=run.owner, run=run)
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
