"""What a run step does on the model-call runtime: claim, call the model, append, finish.

One coroutine per step (workers/runtime.py runs thousands at once). The order of a step:

1. claim the run in Redis (a fresh owner token and lease) and *admit* itself: the Celery
   message that brought it may now be acknowledged, since from here the lease protects it;
2. hold it in `InFlight`, which renews its lease with everyone else's and stops it when the
   run is ended elsewhere;
3. if an earlier attempt of this step already streamed text (a retry, a redelivery), void
   that text with `reply.restart`: a reply is one model output, never a splice of two;
4. call the model within the step's soft limit and the run's deadline, retrying transient
   errors with backoff (and the provider's Retry-After) while the run can afford it;
5. hand the run to its next step's task, or write its one reply.done.

Redis writes ride out a Redis restart: a write that fails on a lost connection is tried
again with backoff until the run's deadline, and a write whose answer was lost is recognised
when tried again (an append already made, a run already finished or handed over).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents import (
    DEFAULT_MODELS,
    Agent,
    AnyStep,
    PythonStep,
    Step,
    StepContext,
    UnknownAgent,
    get_agent,
    render_prompt,
)
from ops import logcontext, metrics
from orchestration import failover
from orchestration.coalesce import Coalescer
from orchestration.inflight import DRAIN, Held, InFlight
from orchestration.tool_steps import call_with_tools, with_tools_ran
from project.conf import conf
from streams.rate_limits import BackendLimit, parse_limits
from streams.reasons import degraded_message
from streams.runs import AsyncRunStore, Fenced, Run, RunFinished, StaleOffset
from streams.usage import call_usage, with_usage
from workers import quotas
from workers.backends import (
    BlockingModelBackend,
    ModelBackend,
    ModelError,
    ModelRequest,
    ModelTimeout,
    get_backend,
    open_stream,
)

logger = logging.getLogger(__name__)

# Kept back from the run's deadline for the fallback and the reply.done: a call cut off by
# the deadline still answers `degraded` before the sweeper would end the run `failed`.
FINISH_RESERVE_S = 0.2
# How long a claim is retried through a Redis outage before the step gives up and leaves its
# message to Celery (the run's deadline is unknown until the claim answers).
CLAIM_RETRY_S = 30.0
# The most a call's usage write may hold its step (it is accounting, not the reply).
USAGE_WRITE_S = 2.0
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """How a step ended, for callers and tests: `next_step` queued for the run, or
    `handed_back` (a draining worker gave its unfinished step to another), or neither (the
    run finished, or no longer needed this step)."""

    next_step: int | None = None
    handed_back: bool = False


async def execute_step(
    store: AsyncRunStore,
    inflight: InFlight,
    run_id: str,
    step_index: int,
    retries_so_far: int = 0,
    admit: Callable[[Any], None] | None = None,
) -> StepOutcome:
    """Run one step of a run to its end. `admit` is called once the step no longer needs
    its Celery message (claimed, or found to have nothing to do)."""
    admit = admit or (lambda value: None)
    run = await durably(
        lambda: store.claim(run_id, step_index, retries_so_far), time.time() + CLAIM_RETRY_S
    )
    admit(run is not None)
    if run is None:
        logger.info("step skipped: run finished or gone run=%s step=%s", run_id, step_index)
        return StepOutcome()
    # Log lines of the step name its run, tenant and message (this task's context only).
    with logcontext.bound(run=run_id, tenant=run.tenant, event=run.message_event):
        return await _execute_held(store, inflight, run, step_index, retries_so_far)


async def _execute_held(
    store: AsyncRunStore, inflight: InFlight, run: Run, step_index: int, retries_so_far: int
) -> StepOutcome:
    held = inflight.hold(run)
    step = _Step(store, run, step_index, retries_so_far)
    try:
        return await step.execute()
    except asyncio.CancelledError:
        if held.stop_reason == DRAIN:
            return await _hand_back(store, held, step_index)
        if held.stop_reason:
            step.abandoned()
            return StepOutcome()
        raise
    except Fenced:
        logger.warning(
            "step fenced: a newer attempt owns tenant=%s run=%s step=%s",
            run.tenant,
            run.run_id,
            step_index,
        )
        return StepOutcome()
    except RunFinished:
        return StepOutcome()
    finally:
        inflight.release(held)


async def _hand_back(store: AsyncRunStore, held: Held, step_index: int) -> StepOutcome:
    """A draining worker gives its unfinished step to another worker at once, rather than
    leave it until its lease lapses. The new attempt voids what this one streamed."""
    run = held.run
    try:
        handed = await store.hand_over(run, step_index)
    except Exception:
        # The lease still lapses and the sweeper redelivers the step: slower, as safe.
        logger.warning(
            "could not hand back step tenant=%s run=%s step=%s",
            run.tenant,
            run.run_id,
            step_index,
            exc_info=True,
        )
        return StepOutcome()
    logger.info(
        "step handed back on shutdown tenant=%s run=%s step=%s handed=%s",
        run.tenant,
        run.run_id,
        step_index,
        handed,
    )
    return StepOutcome(handed_back=handed)


async def durably(write: Callable[[], Awaitable[T]], until: float) -> T:
    """A Redis write that rides out a lost connection (a Redis restart): tried again with
    backoff until `until` (epoch seconds). Every write here is idempotent or fenced."""
    delay = 0.05
    while True:
        try:
            return await write()
        except REDIS_ERRORS:
            if time.time() + delay >= until:
                raise
            logger.warning("redis write failed; retrying in %.2fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class _Step:
    """One claimed step of one run: the model call and the writes it owes."""

    def __init__(self, store: AsyncRunStore, run: Run, index: int, retries_so_far: int) -> None:
        self.store = store
        self.run = run
        self.index = index
        self.retries = retries_so_far
        self.agent: Agent | None = None
        # The model of the step's chain being tried (orchestration/failover.py), and the
        # retries spent on it: each model of the chain gets the step's max_retries.
        self.candidate = failover.Candidate(backend="")
        self.model_retries = retries_so_far
        self.has_fallbacks = False

    async def execute(self) -> StepOutcome:
        run = self.run
        try:
            agent = self.agent = get_agent(run.agent)
            step = agent.steps[self.index]
        except (UnknownAgent, IndexError):
            await self.finalize("failed", {"reason": "agent not available"})
            return StepOutcome()
        if (step.visible and run.emitted != run.step_base) or self.showed_tool_events():
            await self.restart("redelivered")
        # Deadline propagation: a call that cannot get its minimum useful time is not started.
        if self.time_for_call() < step.min_budget_s:
            return await self.fall_back("deadline")
        try:
            context = step_context(run, agent, self.index)
            prompt = render_prompt(step.prompt, context) if isinstance(step, Step) else ""
        except Exception:
            logger.exception(
                "step's prompt failed tenant=%s run=%s step=%s", run.tenant, run.run_id, self.index
            )
            return await self.fall_back("internal")
        if isinstance(step, PythonStep):
            return await self.execute_python(step, context)
        return await self.execute_model(step, prompt)

    # --- model steps -----------------------------------------------------------------------

    async def execute_model(self, step: Step, prompt: str) -> StepOutcome:
        """The step's models in order (orchestration/failover.py) until one answers, the
        chain is spent (the step's fallback text) or the run is ended elsewhere (Fenced,
        RunFinished, cancelled: raised to the caller)."""
        if not await self.take_budgets(step, prompt):
            return await self.fall_back("rate_limited")
        candidates = failover.chain(step, self.run.agent_config)
        self.has_fallbacks = len(candidates) > 1
        failure: failover.Failure | None = None
        for candidate in candidates:
            if failure is not None:
                if not failover.fails_over(failure) or not await self.fail_over(
                    step, candidate, failure
                ):
                    break
            self.candidate = candidate
            if not await self.take_backend_budget(candidate.backend, prompt):
                failure = failover.Failure("rate_limited")
                continue
            answered = await self.attempt_model(step, prompt)
            if isinstance(answered, StepOutcome):
                return answered
            failure = answered
        assert failure is not None
        return await self.fall_back(failure.reason, failure.error)

    async def attempt_model(self, step: Step, prompt: str) -> StepOutcome | failover.Failure:
        """Attempts of one model of the chain until it answers (the step is done) or fails
        (its retries spent, an error not worth a retry, the run's time short)."""
        while True:
            if self.time_for_call() < step.min_budget_s:
                return failover.Failure("deadline")
            started = time.monotonic()
            try:
                output = await self.call_model(step, prompt)
            except ModelError as error:
                self.log_failed_call(error, started)
                backoff = self.retry_backoff(step, error)
                if backoff is None:
                    spent = isinstance(error, ModelTimeout)
                    self.called(step, "timeout" if spent else "fallback", started)
                    return failover.failure_of(error)
                self.called(step, "error", started)
                await self.next_attempt(step, backoff)
                continue
            except (Fenced, RunFinished, asyncio.CancelledError):
                self.called(step, "cancelled", started)
                raise
            except Exception:
                # A bug or an unclassified backend failure still owes the client its reply.
                self.called(step, "fallback", started)
                logger.exception("step failed run=%s step=%s", self.run.run_id, self.index)
                return failover.Failure("internal")
            self.called(step, "ok", started)
            return await self.done(output)

    async def fail_over(
        self, step: Step, candidate: failover.Candidate, failure: failover.Failure
    ) -> bool:
        """Make ready to try the next model after `failure`: False when the run has no time
        left to start it (the step gives its fallback for the earlier failure). What the
        failed model streamed is voided: a reply is one model output, never a splice."""
        if self.time_for_call() < step.min_budget_s:
            return False
        failed = self.candidate
        logger.warning(
            "model fails over tenant=%s run=%s step=%s from=%s:%s to=%s:%s reason=%s",
            self.run.tenant,
            self.run.run_id,
            self.index,
            failed.backend,
            failed.model,
            candidate.backend,
            candidate.model,
            failure.reason,
        )
        metrics.model_failover(failed.backend, failure.reason)
        # Each model gets the step's retries; the attempt count goes on across the chain.
        self.retries += 1
        self.model_retries = 0
        if (step.visible and self.run.emitted != self.run.step_base) or self.showed_tool_events():
            await self.restart("failover")
        return True

    def log_failed_call(self, error: ModelError, started: float) -> None:
        logger.warning(
            "model call failed tenant=%s run=%s step=%s attempt=%s transient=%s after=%.3fs: %s",
            self.run.tenant,
            self.run.run_id,
            self.index,
            self.retries + 1,
            error.transient,
            time.monotonic() - started,
            error,
        )

    def retry_backoff(self, step: Step, error: ModelError) -> float | None:
        """How long to wait before another attempt, or None: the step falls back now."""
        # A call that ran out its soft limit has had the step's time: the fallback now, not
        # another attempt, so the client waits at most the soft limit.
        spent = isinstance(error, ModelTimeout)
        if not error.transient or spent or self.model_retries >= step.max_retries:
            return None
        # The provider's Retry-After, when it gave one, is the least wait.
        backoff = max(_backoff_s(self.model_retries), error.retry_after_s or 0.0)
        if self.time_for_call() <= backoff + step.min_budget_s:
            return None  # no time left for a useful attempt after the wait
        return backoff

    async def next_attempt(self, step: Step, backoff: float) -> None:
        """Wait, then void what the failed attempt streamed: a reply is one model output."""
        await asyncio.sleep(backoff)
        self.retries += 1
        self.model_retries += 1
        if (step.visible and self.run.emitted != self.run.step_base) or self.showed_tool_events():
            await self.restart("retry")

    async def call_model(self, step: Step, prompt: str) -> str:
        """One attempt: stream the model's pieces into the reply (coalesced), within the
        step's soft limit and the run's deadline. Returns the step's whole output."""
        budget = min(step.soft_limit_s, self.time_for_call())
        request = self.model_request(step, prompt)
        coalescer = _coalescer()
        emitted_before, output = self.run.emitted, None
        try:
            if step.tools:
                output = await call_with_tools(self, step, prompt, coalescer)
            else:
                output = await self.stream_pieces(step, request, budget, coalescer)
        except TimeoutError:
            # What was produced before the limit is kept: the fallback follows it.
            await self.append_pending(coalescer)
            raise ModelTimeout() from None
        except ModelError:
            await self.append_pending(coalescer)
            raise
        except asyncio.CancelledError:
            request.cancelled.set()
            raise
        finally:
            # A failed call's text is only known by what it appended. A step with tools
            # counts each of its turns itself (orchestration/tool_steps.py).
            received = len(output) if output is not None else self.run.emitted - emitted_before
            if not step.tools:
                await self.record_usage(step, request, len(prompt), received, output is not None)
        await self.append_pending(coalescer)
        return output

    def model_backend(self) -> ModelBackend | BlockingModelBackend:
        """The backend of the model of the chain being tried."""
        return backend_of(self.candidate)

    def model_request(self, step: Step, prompt: str) -> ModelRequest:
        """The call as the backend gets it: the model of the chain being tried, with its
        key and endpoint (for the step's own model, the tenant's overrides: failover.chain)."""
        candidate = self.candidate
        return ModelRequest(
            model=candidate.model,
            prompt=prompt,
            options=self.run.options,
            attempt=self.retries + 1,
            api_key_env=candidate.api_key_env,
            base_url=candidate.base_url,
        )

    async def stream_pieces(
        self, step: Step, request: ModelRequest, budget: float, coalescer: Coalescer
    ) -> str:
        """The model's pieces, appended as the coalescer lets them go; raises TimeoutError
        past the soft limit. Returns every piece, appended or still pending."""
        backend = backend_of(self.candidate)
        produced: list[str] = []
        loop = asyncio.get_running_loop()
        # The soft limit times the model, not Redis: only waits for the next piece count
        # against it, so a write riding out a Redis restart does not use the model's time
        # (the run's deadline still bounds everything).
        limit_at = loop.time() + budget
        last_moment = loop.time() + self.time_for_call()
        pieces: AsyncIterator[str] = open_stream(backend, request, time.monotonic() + budget)
        async with aclosing(pieces):  # type: ignore[type-var]
            while True:
                try:
                    async with asyncio.timeout_at(limit_at):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                produced.append(piece)
                if step.visible and (text := coalescer.add(piece)):
                    began = loop.time()
                    await self.append(text)
                    limit_at = min(limit_at + loop.time() - began, last_moment)
        return "".join(produced)

    async def append_pending(self, coalescer: Coalescer) -> None:
        if text := coalescer.flush():
            await self.append(text)

    async def take_budgets(self, step: Step, prompt: str) -> bool:
        """One call's worth from the step's own rate limit (per tenant), in Redis, waiting
        for it while the run can afford to. False: it would come back too late for a useful
        call before the deadline, or never. The step is charged once, whatever number of
        models its chain tries; each model's backend is charged by take_backend_budget."""
        run = self.run
        assert self.agent is not None
        if not step.rate_limit:
            return True
        scope = f"{run.tenant}:{self.agent.name}:{self.agent.step_names()[self.index]}"
        step_limit = parse_limits({scope: step.rate_limit})[scope]
        budget = quotas.BackendBudget(self.store.buckets, scope, step_limit, prompt, kind="step")
        return await self.wait_for_budget(step, scope, budget)

    async def take_backend_budget(self, backend: str, prompt: str) -> bool:
        """One call's worth from the backend's rate limits (global, every tenant's calls to
        the provider): each model of a step's chain pays its own backend's, as it is tried.
        False: this model cannot be started in time (the chain moves on)."""
        assert self.agent is not None
        backend_limit = _backend_limits().get(backend)
        if backend_limit is None:
            return True
        budget = quotas.BackendBudget(self.store.buckets, backend, backend_limit, prompt)
        return await self.wait_for_budget(self.agent.steps[self.index], backend, budget)

    async def wait_for_budget(
        self, step: AnyStep, scope: str, budget: quotas.BackendBudget
    ) -> bool:
        """Take `budget`, waiting while it comes back early enough for a useful call."""
        while (wait_ms := await budget.take()) != 0:
            if quotas.decide(wait_ms, self.time_for_call(), step.min_budget_s) == quotas.GIVE_UP:
                logger.warning(
                    "model call not started: %s over its rate limit tenant=%s run=%s wait_ms=%s",
                    scope,
                    self.run.tenant,
                    self.run.run_id,
                    wait_ms,
                )
                return False
            await asyncio.sleep(wait_ms / 1000)
        return True

    async def record_usage(
        self,
        step: Step,
        request: ModelRequest,
        prompt_chars: int,
        output_chars: int,
        finished: bool,
    ) -> None:
        """Count one call's tokens (reported by the backend, else estimated) on the run, the
        tenant's budget counters and the metrics. A call that failed before producing
        anything, and that no usage was reported for (refused, unreachable), counts nothing.
        Accounting never fails the step: a Redis error is logged, the call goes uncounted."""
        reported = request.usage
        said = reported.prompt_tokens is not None or reported.completion_tokens is not None
        if not (finished or said or output_chars):
            return
        usage = call_usage(
            reported.prompt_tokens, reported.completion_tokens, prompt_chars, output_chars
        )
        run = self.run
        # The model of the chain that was called (failover may have moved on from the step's).
        model = metrics.model_label(self.candidate.backend, request.model)
        metrics.tokens_used(run.tenant, run.agent, model, usage)
        try:
            async with asyncio.timeout(USAGE_WRITE_S):
                await self.store.add_usage(run, usage)
        except Exception:  # TimeoutError included
            logger.warning(
                "token usage not counted tenant=%s run=%s tokens=%s",
                run.tenant,
                run.run_id,
                usage.total,
                exc_info=True,
            )

    def called(self, step: Step, outcome: str, started: float) -> None:
        metrics.model_call(self.candidate.backend, outcome, time.monotonic() - started)

    # --- tool calls (orchestration/tool_steps.py) ------------------------------------------

    def showed_tool_events(self) -> bool:
        """Whether this step's earlier attempt wrote tool events that no restart voided."""
        return self.run.tool_step == self.index

    def tool_context(self) -> StepContext:
        assert self.agent is not None
        return step_context(self.run, self.agent, self.index)

    async def append_tool_event(
        self, kind: str, data: dict[str, Any], tools_ran: list[str] | None = None
    ) -> None:
        """A tool.call or tool.result, fenced like a delta; a write whose answer was lost
        on the connection is recognised when tried again, never made twice."""
        run = self.run
        expected = run.tool_events + 1
        tried = False

        async def write() -> int:
            nonlocal tried
            try:
                return await self.store.append_tool_event(run, kind, data, tools_ran)
            except StaleOffset as stale:
                if tried and stale.stored == expected:
                    run.tool_events = expected
                    run.tool_step = run.step
                    if tools_ran is not None:
                        run.tools_ran = list(tools_ran)
                    return 0
                raise
            finally:
                tried = True

        await durably(write, run.deadline)

    # --- Python steps ----------------------------------------------------------------------

    async def execute_python(self, step: PythonStep, context: StepContext) -> StepOutcome:
        run = self.run
        budget = min(step.soft_limit_s, self.time_for_call())
        try:
            async with asyncio.timeout(budget):
                output = await _run_python(step, context)
        except TimeoutError:
            logger.warning(
                "python step passed its soft limit tenant=%s run=%s step=%s limit=%.3fs",
                run.tenant,
                run.run_id,
                self.index,
                budget,
            )
            return await self.fall_back("timeout")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "python step failed tenant=%s run=%s step=%s", run.tenant, run.run_id, self.index
            )
            return await self.fall_back("internal")
        if step.visible and output:
            await self.append(output)
        return await self.done(output)

    # --- the writes ------------------------------------------------------------------------

    def time_for_call(self) -> float:
        """What a call may use: the time left before the run's deadline, less what the
        fallback and reply.done need."""
        return self.run.seconds_left() - FINISH_RESERVE_S

    async def append(self, text: str) -> None:
        run = self.run
        expected = run.emitted + len(text)
        tried = False

        async def write() -> int:
            nonlocal tried
            try:
                return await self.store.append_delta(run, text)
            except StaleOffset as stale:
                # Our earlier try went through but its answer was lost on the connection.
                if tried and stale.stored == expected:
                    run.emitted = expected
                    return 0
                raise
            finally:
                tried = True

        await durably(write, run.deadline)

    async def restart(self, reason: str) -> None:
        """Void what this step streamed so far; the reply starts again at offset 0 with what
        the steps before it streamed."""
        run = self.run
        kept = (await durably(lambda: self.store.text_of(run.run_id), run.deadline))[
            : run.step_base
        ]
        attempt = run.attempt + self.retries
        await durably(lambda: self.store.restart_reply(run, attempt, reason, kept), run.deadline)
        logger.info(
            "reply restarted reason=%s tenant=%s run=%s step=%s attempt=%s",
            reason,
            run.tenant,
            run.run_id,
            self.index,
            attempt,
        )

    async def finalize(self, status: str, detail: Any) -> None:
        run = self.run
        detail = with_tools_ran(detail, run.tools_ran)
        detail = with_usage(detail, run.usage)
        await durably(lambda: self.store.finalize(run, status, detail), run.deadline + 60)

    async def done(self, output: str, fell_back: str = "") -> StepOutcome:
        """The step has its output: hand it to the next step, or end the run."""
        run, agent = self.run, self.agent
        assert agent is not None
        if self.index + 1 < len(agent.steps):
            await durably(
                lambda: self.store.save_output(run, self.index, output, fell_back), run.deadline
            )
            if not await durably(lambda: self.store.hand_over(run, self.index + 1), run.deadline):
                # Taken over (or ended) since the output was saved: its new owner goes on.
                raise Fenced(run.run_id)
            return StepOutcome(next_step=self.index + 1)
        fell_back = fell_back or run.fell_back
        if fell_back:
            # An earlier step gave its fallback and the pipeline went on.
            reason, _, step_name = fell_back.partition(":")
            detail = {"reason": reason, "message": degraded_message(reason), "step": step_name}
            await self.finalize("degraded", self.with_answering_model(detail))
        else:
            await self.finalize("ok", self.with_answering_model(None))
        return StepOutcome()

    def with_answering_model(self, detail: dict[str, Any] | None) -> dict[str, Any] | None:
        """The reply.done's detail, saying which model answered when the last step has
        fallback models (`detail.model`); unchanged for a step with one model."""
        if not self.has_fallbacks:
            return detail
        default = DEFAULT_MODELS.get(self.candidate.backend)
        model = failover.answered_by(self.candidate, default(conf()) if default else "")
        return {**(detail or {}), "model": model}

    async def fall_back(self, reason: str, error: BaseException | None = None) -> StepOutcome:
        """The step cannot answer: its fallback text. The run ends `degraded` with that text
        after whatever was already streamed, or, for a step that continues on fallback, the
        text is its output and the pipeline goes on."""
        run, agent = self.run, self.agent
        assert agent is not None
        step = agent.steps[self.index]
        name = agent.step_names()[self.index]
        logger.info(
            "step falls back reason=%s tenant=%s run=%s step=%s left=%.3fs",
            reason,
            run.tenant,
            run.run_id,
            self.index,
            run.seconds_left(),
        )
        if step.continue_on_fallback and self.index + 1 < len(agent.steps):
            if step.visible and step.fallback_text:
                await self.append(step.fallback_text)
            return await self.done(step.fallback_text, f"{reason}:{name}")
        separator = "\n" if run.emitted else ""
        await self.append(separator + step.fallback_text)
        # `message`: the reason in words for whoever reads the reply (streams/reasons.py).
        detail = {"reason": reason, "message": degraded_message(reason, error)}
        if len(agent.steps) > 1:
            detail["step"] = name
        await self.finalize("degraded", detail)
        return StepOutcome()

    def abandoned(self) -> None:
        """The run stopped needing this step (cancelled, ended by the sweeper, taken over by
        a newer attempt): whoever did that owns its reply.done, so nothing is written."""
        logger.info(
            "model call abandoned: the run is no longer this step's tenant=%s run=%s step=%s",
            self.run.tenant,
            self.run.run_id,
            self.index,
        )


async def _run_python(step: PythonStep, context: StepContext) -> str:
    """A Python step's function: awaited when it is a coroutine function, otherwise run in
    the runtime's bounded thread pool (never on the loop). Python cannot stop a thread, so
    one that overruns its soft limit is left to finish in the background, holding its
    pool thread until it does."""
    if inspect.iscoroutinefunction(step.run):
        value = await step.run(context)
    else:
        value = await asyncio.get_running_loop().run_in_executor(None, step.run, context)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(
            f"python step {step.name or step.run!r} returned {type(value).__name__}, not str"
        )
    return value


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


def backend_of(candidate: failover.Candidate) -> ModelBackend | BlockingModelBackend:
    """The backend a model of the chain names; an unknown name is that model's
    configuration at fault (it fails over), not a bug of the step."""
    try:
        return get_backend(candidate.backend)
    except KeyError:
        raise ModelError(
            f"no model backend named {candidate.backend!r}",
            False,
            summary="model not configured",
            misconfigured=True,
        ) from None


def _coalescer() -> Coalescer:
    config = conf()
    return Coalescer(config.delta_flush_chars, config.delta_flush_ms / 1000)


_limits_cache: tuple[object, dict[str, BackendLimit]] | None = None


def _backend_limits() -> dict[str, BackendLimit]:
    global _limits_cache
    raw = conf().backend_limits
    if _limits_cache is None or _limits_cache[0] is not raw:
        _limits_cache = (raw, parse_limits(raw))
    return _limits_cache[1]


def _backoff_s(retries_so_far: int) -> float:
    return conf().model_retry_backoff_s * (2**retries_so_far)
