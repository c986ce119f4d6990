"""Agents of several steps (orchestration/steps.py) on a real Redis, without Celery:
each step's output feeds the next, only visible steps stream, each step falls back alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from agents import Agent, PythonStep, Step, StepContext
from orchestration.steps import StepOutcome
from streams import keys
from streams.enqueue import RUN_STEP_TASK
from streams.runs import RunStore
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from tests.store.test_leases import QUEUE, queued_steps
from workers import backends
from workers.backends import ModelError, ModelRequest, ModelTimeout

STREAM = "room"


def start(streams: Streams, agent: str, text: str = "hello", **options: Any) -> str:
    appended = streams.send(STREAM, f"m-{time.monotonic_ns()}", text, agent=agent, options=options)
    assert appended.run_id is not None
    return appended.run_id


def run_to_end(runs: RunStore, run_id: str, steps: int) -> None:
    """Execute the run's steps in order as the Celery tasks would: a finished step queues
    its successor's message as it hands the run over (retries happen inside a step)."""
    runs.client.delete(QUEUE)
    step = 0
    while True:
        outcome = execute_step(runs, run_id, step)
        if outcome.next_step is None:
            assert queued_steps(runs.client) == []
            return
        assert outcome.next_step == step + 1 < steps
        [(args, headers)] = queued_steps(runs.client)
        assert (args, headers["task"]) == ([run_id, step + 1], RUN_STEP_TASK)
        runs.client.delete(QUEUE)  # taken by the worker that runs it
        step = outcome.next_step


def events(r: redis.Redis) -> list[dict[str, Any]]:
    return log_events(r, STREAM)


def the_done(r: redis.Redis) -> dict[str, Any]:
    [done] = of_kind(events(r), "reply.done")
    return done["data"]


class Recording:
    """A model that answers `<model>(<prompt>)` and records each prompt, so a test sees
    what every step was asked."""

    name = "recording"

    def __init__(self) -> None:
        self.prompts: list[tuple[str, str]] = []
        self.requests: list[ModelRequest] = []

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        self.prompts.append((request.model, request.prompt))
        self.requests.append(request)
        if request.model == "broken":
            raise ModelError("the model refused", transient=False)
        if request.model == "stalls":
            raise ModelTimeout("model call passed its soft time limit (stalled)", transient=True)
        if request.model == "busy" and request.attempt == 1:
            raise ModelError("slow down", transient=True, retry_after_s=0.3)
        yield f"{request.model}("
        yield request.prompt
        yield ")"


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Recording:
    recording = Recording()
    monkeypatch.setitem(backends._backends, "recording", recording)
    return recording


def test_each_steps_output_feeds_the_next_and_only_visible_steps_stream(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "chain",
        Step(backend="recording", model="route", name="route", visible=False),
        Step(backend="recording", model="answer", name="answer", prompt="{route} / {message}"),
        PythonStep(
            lambda ctx: f" [checked {len(ctx.outputs['answer'])}]", name="check", visible=True
        ),
    )
    run_id = start(streams, "chain", "hi")
    run_to_end(runs, run_id, 3)

    assert model.prompts == [("route", "hi"), ("answer", "route(hi) / hi")]
    answer = "answer(route(hi) / hi)"
    data = the_done(r)
    # Usage adds up both model steps (the recording backend reports none: estimated, a
    # quarter of the characters rounded up), across the steps' separate claims.
    usage = {"prompt_tokens": 1 + 4, "completion_tokens": 3 + 6, "total": 14, "estimated": True}
    assert (data["status"], data["detail"]) == ("ok", {"usage": usage})
    assert data["text"] == f"{answer} [checked {len(answer)}]"
    deltas = of_kind(events(r), "reply.delta")
    assert "".join(d["data"]["text"] for d in deltas) == data["text"]
    # The hidden step streamed nothing: the reply starts with the answer step's text.
    assert deltas[0]["data"]["text"].startswith("answer(")
    assert {event["kind"] for event in events(r)} == {"message", "reply.delta", "reply.done"}


def test_a_step_sees_every_earlier_output_and_the_run(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    seen: list[StepContext] = []

    def remember(ctx: StepContext) -> str:
        seen.append(ctx)
        return f"<{ctx.input}>"

    register_agent(
        "contexts",
        PythonStep(remember, name="one"),
        PythonStep(remember, name="two"),
        PythonStep(remember, name="three", visible=True),
    )
    run_id = start(streams, "contexts", "msg", temperature=0.2)
    run_to_end(runs, run_id, 3)
    assert [ctx.input for ctx in seen] == ["msg", "<msg>", "<<msg>>"]
    assert seen[2].outputs == {"one": "<msg>", "two": "<<msg>>"}
    assert {ctx.message for ctx in seen} == {"msg"}
    assert seen[0].run_id == run_id and seen[0].stream == STREAM and seen[0].agent == "contexts"
    assert seen[0].options == {"temperature": 0.2}
    assert (seen[0].depth, seen[0].trigger) == (0, None)
    assert the_done(r)["text"] == "<<<msg>>>"


def test_a_failed_step_that_continues_gives_its_fallback_as_output_and_degrades_the_run(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "routed",
        Step(
            backend="recording",
            model="broken",
            name="route",
            visible=False,
            fallback_text="general",
            continue_on_fallback=True,
        ),
        Step(backend="recording", model="answer", name="answer", prompt="topic={route}"),
    )
    run_id = start(streams, "routed")
    run_to_end(runs, run_id, 2)
    assert model.prompts[-1] == ("answer", "topic=general")
    data = the_done(r)
    assert data["status"] == "degraded"
    # The failed call produced nothing and reported nothing: only the answer's call counts.
    assert data["detail"] == {
        "reason": "model_error",
        "message": "model error",
        "step": "route",
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total": 10, "estimated": True},
    }
    assert data["text"] == "answer(topic=general)"


def test_a_failed_step_that_stops_ends_the_run_with_its_fallback(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "stops",
        Step(backend="recording", model="first", name="first"),
        Step(backend="recording", model="broken", name="second", fallback_text="sorry"),
        Step(backend="recording", model="never", name="third"),
    )
    run_id = start(streams, "stops", "x")
    run_to_end(runs, run_id, 3)
    assert [m for m, _ in model.prompts] == ["first", "broken"]
    data = the_done(r)
    assert (data["status"], data["detail"]) == (
        "degraded",
        {
            "reason": "model_error",
            "message": "model error",
            "step": "second",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total": 3, "estimated": True},
        },
    )
    assert data["text"] == "first(x)\nsorry"


def test_a_python_step_that_raises_falls_back(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    def boom(ctx: StepContext) -> str:
        raise RuntimeError("bug in the step")

    register_agent("buggy", PythonStep(boom, name="only", visible=True, fallback_text="oops"))
    run_to_end(runs, start(streams, "buggy"), 1)
    data = the_done(r)
    assert (data["status"], data["text"], data["detail"]) == (
        "degraded",
        "oops",
        {"reason": "internal", "message": "internal error"},
    )


def test_a_python_step_that_returns_no_text_falls_back(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    register_agent("typed", PythonStep(lambda ctx: 42, name="only", fallback_text="bad"))  # type: ignore[arg-type,return-value]
    run_to_end(runs, start(streams, "typed"), 1)
    assert (the_done(r)["status"], the_done(r)["text"]) == ("degraded", "bad")


def test_an_async_python_step_is_awaited_and_bounded_by_its_soft_limit(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    async def shout(ctx: StepContext) -> str:
        await asyncio.sleep(0)
        return ctx.input.upper()

    async def dawdle(ctx: StepContext) -> str:
        await asyncio.sleep(30)
        return "too late"

    register_agent("async-ok", PythonStep(shout, name="only", visible=True))
    run_id = start(streams, "async-ok", text="quiet")
    run_to_end(runs, run_id, 1)
    data = the_done(r)
    assert (data["status"], data["text"]) == ("ok", "QUIET")

    r.delete(*r.keys("*"))
    register_agent(
        "async-slow",
        PythonStep(dawdle, name="only", visible=True, soft_limit_s=0.2, fallback_text="slow"),
    )
    run_id = start(streams, "async-slow")
    run_to_end(runs, run_id, 1)
    data = the_done(r)
    assert (data["status"], data["text"], data["detail"]["reason"]) == (
        "degraded",
        "slow",
        "timeout",
    )


def test_a_python_step_past_its_soft_limit_is_abandoned_with_its_fallback(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    release = threading.Event()

    def stuck(ctx: StepContext) -> str:
        release.wait(10)
        return "too late"

    register_agent(
        "stuck",
        PythonStep(stuck, name="only", visible=True, soft_limit_s=0.2, fallback_text="slow"),
    )
    run_id = start(streams, "stuck")
    # On a thread: the step's loop waits for its executor's stuck thread when it closes.
    worker = threading.Thread(target=run_to_end, args=(runs, run_id, 1), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not of_kind(events(r), "reply.done"):
            assert time.monotonic() < deadline, "the stuck step never fell back"
            time.sleep(0.01)
        # Answered while the step's function is still stuck.
        assert not release.is_set()
        data = the_done(r)
        assert (data["status"], data["text"], data["detail"]) == (
            "degraded",
            "slow",
            {"reason": "timeout", "message": "timeout"},
        )
    finally:
        release.set()
        worker.join(timeout=10)
    assert not worker.is_alive()


def test_a_retry_waits_at_least_the_providers_retry_after(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    register_agent("patient", Step(backend="recording", model="busy", max_retries=2))
    run_id = start(streams, "patient")
    r.delete(QUEUE)
    # Retried within the step, after the wait: nothing is queued, the run claimed once.
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert queued_steps(r) == []
    assert r.hget(keys.run(run_id), "attempt") == b"1"
    # The configured backoff in tests is far below the 0.3 s the provider asked for.
    assert 0.3 in waits
    assert [request.attempt for request in model.requests] == [1, 2]
    # The refused call streamed nothing, so there is nothing to restart.
    assert of_kind(events(r), "reply.restart") == []
    assert the_done(r)["text"] == "busy(hello)"


def test_prompt_templates_leave_unknown_fields_and_stray_braces_alone(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "templated",
        Step(backend="recording", model="m", prompt='{"json": {input}} {nobody} {'),
    )
    run_to_end(runs, start(streams, "templated", "q"), 1)
    [(_, prompt)] = model.prompts
    assert prompt == '{"json": {input}} {nobody} {'


def test_a_prompt_template_fills_input_message_and_outputs(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "filled",
        PythonStep(lambda ctx: "R", name="route"),
        Step(backend="recording", model="m", prompt="{input}|{message}|{route}|{nobody}"),
    )
    run_to_end(runs, start(streams, "filled", "q"), 2)
    assert model.prompts == [("m", "R|q|R|{nobody}")]


def test_tenant_overrides_reach_the_model_call_but_not_the_simulated_backend(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent("overridden", Step(backend="recording", model="code-model"))
    run_id = start(streams, "overridden")
    r.hset(
        keys.run(run_id),
        "agent_cfg",
        '{"model": "tenant-model", "api_key_env": "ACME_KEY", "base_url": "http://llm.local/v1"}',
    )
    run_to_end(runs, run_id, 1)
    [request] = model.requests
    assert (request.model, request.api_key_env, request.base_url) == (
        "tenant-model",
        "ACME_KEY",
        "http://llm.local/v1",
    )


def test_a_step_rate_limit_is_per_tenant_and_falls_back_when_it_cannot_wait(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent(
        "metered",
        Step(backend="recording", model="m", rate_limit={"rpm": 1}, fallback_text="later"),
        deadline_s=2,
    )
    run_to_end(runs, start(streams, "metered", "one"), 1)
    # The second call of the minute would have to wait about 60 s: more than the run has.
    run_to_end(runs, start(streams, "metered", "two"), 1)
    dones = [done["data"] for done in of_kind(events(r), "reply.done")]
    assert [(d["status"], d["text"]) for d in dones] == [
        ("ok", "m(one)"),
        ("degraded", "later"),
    ]
    assert dones[1]["detail"] == {"reason": "rate_limited", "message": "model rate limit reached"}
    assert len(model.prompts) == 1
    # Another tenant's calls of the same step have their own budget.
    other = streams.send(STREAM, "m-other", "three", agent="metered", tenant="globex")
    assert other.run_id is not None
    run_to_end(runs, other.run_id, 1)
    assert model.prompts[-1] == ("m", "three")


def test_a_call_that_ran_out_its_soft_limit_is_not_retried_however_transient(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    model: Recording,
    register_agent: Callable[..., Agent],
) -> None:
    register_agent("stalled", Step(backend="recording", model="stalls", max_retries=3))
    run_id = start(streams, "stalled")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert len(model.prompts) == 1
    data = the_done(r)
    assert (data["status"], data["detail"]) == (
        "degraded",
        {"reason": "timeout", "message": "timeout"},
    )
