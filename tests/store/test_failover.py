"""Failover across models on a real Redis (orchestration/steps.py, failover.py): a step
whose model fails tries its fallback models in order, each with the step's retries and its
own backend's rate limit; text a failed model streamed is voided with reply.restart; the
reply.done names the model that answered; a bad request does not fail over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from pytest_django.fixtures import Settings

from agents import Agent, FallbackModel, Step
from orchestration.steps import StepOutcome
from streams.buckets import SyncBuckets
from streams.rate_limits import BackendLimit
from streams.runs import RunStore
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers import backends
from workers.backends import ModelError, ModelRequest
from workers.quotas import buckets_for

FALLBACK = "no model could answer"


class ScriptedBackend:
    """A model whose behaviour is its model name: "fail500" (a transient provider error),
        "bad400" (a permanent one), "cut" (two pieces, then a transient error), "stall" (one
    piece, then nothing until the soft limit), anything else
        streamed back in two pieces. Records (model, attempt) of every call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, int]] = []

    async def astream(self, request: ModelRequest) -> AsyncIterator[str]:
        self.calls.append((request.model, request.attempt))
        if request.model == "fail500":
            raise ModelError("server error", True, status=500, summary="provider error 500")
        if request.model == "bad400":
            raise ModelError("bad request", False, status=400, summary="provider error 400")
        if request.model == "stall":
            yield "a start "
            await asyncio.Event().wait()  # until the step's soft limit cancels it
        if request.model == "cut":
            yield "half "
            yield "an answer"
            raise ModelError("connection lost mid-stream", True)
        middle = len(request.model) // 2
        yield request.model[:middle]
        yield request.model[middle:]


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> tuple[ScriptedBackend, ScriptedBackend]:
    made = ScriptedBackend("model-a"), ScriptedBackend("model-b")
    for backend in made:
        monkeypatch.setitem(backends._backends, backend.name, backend)
    return made


def agent(
    register: Callable[..., Agent],
    model: str,
    *fallbacks: FallbackModel,
    deadline_s: float = 30.0,
    **step: Any,
) -> None:
    register(
        "failing",
        Step(
            backend="model-a",
            model=model,
            fallbacks=fallbacks,
            fallback_text=FALLBACK,
            max_retries=step.pop("max_retries", 1),
            **step,
        ),
        deadline_s=deadline_s,
    )


def run(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    accepted = streams.send("room", "m-1", "hello", agent="failing")
    assert accepted.run_id is not None
    assert execute_step(runs, accepted.run_id, 0, 0) == StepOutcome()
    events = [e for e in log_events(r, "room") if e["kind"].startswith("reply.")]
    [done] = of_kind(events, "reply.done")
    return events, done["data"]


def text_after_last_restart(events: list[dict[str, Any]]) -> str:
    text = ""
    for event in events:
        if event["kind"] == "reply.restart":
            text = ""
        elif event["kind"] == "reply.delta":
            assert event["data"]["offset"] == len(text)
            text += event["data"]["text"]
    return text


def test_a_failing_model_hands_over_to_its_fallback_after_its_retries(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    first, second = models
    agent(register_agent, "fail500", FallbackModel("model-b", "the fallback answers"))
    events, done = run(streams, runs, r)
    assert done["status"] == "ok"
    assert done["text"] == "the fallback answers" == text_after_last_restart(events)
    # Beside the answering model, the usage of the calls that produced something (the test
    # models report none: estimated).
    assert done["detail"] == {
        "model": {"backend": "model-b", "model": "the fallback answers", "fallback": True},
        "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total": 7, "estimated": True},
    }
    # The step's own model had its one retry; the attempt count goes on across the chain.
    assert first.calls == [("fail500", 1), ("fail500", 2)]
    assert second.calls == [("the fallback answers", 3)]
    # Nothing was streamed before the fallback answered: no restart was needed.
    assert of_kind(events, "reply.restart") == []


def test_a_model_that_streamed_before_failing_is_voided_not_spliced(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    agent(register_agent, "cut", FallbackModel("model-b", "whole new answer"), max_retries=0)
    events, done = run(streams, runs, r)
    assert done["status"] == "ok"
    [restart] = of_kind(events, "reply.restart")
    assert restart["data"]["reason"] == "failover"
    voided = [
        e["data"]["text"]
        for e in events
        if e["kind"] == "reply.delta" and e["seq"] < restart["seq"]
    ]
    assert "".join(voided) == "half an answer"
    assert done["text"] == "whole new answer" == text_after_last_restart(events)


def test_a_step_with_no_model_left_gives_its_fallback_text(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    first, second = models
    agent(register_agent, "fail500", FallbackModel("model-b", "fail500"), FallbackModel("nowhere"))
    events, done = run(streams, runs, r)
    assert done["status"] == "degraded"
    assert done["text"] == FALLBACK
    # The chain ended on a backend nobody defined: that model's configuration.
    assert done["detail"] == {"reason": "model_error", "message": "model not configured"}
    assert len(first.calls) == len(second.calls) == 2


def test_a_bad_request_does_not_fail_over(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    first, second = models
    agent(register_agent, "bad400", FallbackModel("model-b", "never asked"))
    _, done = run(streams, runs, r)
    assert (done["status"], done["text"]) == ("degraded", FALLBACK)
    assert done["detail"] == {"reason": "model_error", "message": "provider error 400"}
    assert first.calls == [("bad400", 1)]
    assert second.calls == []


def test_a_model_over_its_backends_rate_limit_is_skipped_for_the_next(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    settings: Settings,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    first, second = models
    # model-a's one request a minute is spent (by other workers, say): it would come back
    # after the run's deadline, so the chain moves on at once to model-b, which pays its own.
    limits = {"model-a": {"rpm": 1}, "model-b": {"rpm": 5}}
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "BACKEND_LIMITS": limits}
    [(spent, _)] = buckets_for("model-a", BackendLimit(rpm=1))
    assert SyncBuckets(r).take([spent], 1) == 0
    agent(register_agent, "never called", FallbackModel("model-b", "the other provider"))
    _, done = run(streams, runs, r)
    assert (done["status"], done["text"]) == ("ok", "the other provider")
    assert first.calls == []
    assert second.calls == [("the other provider", 2)]
    [(paid, _)] = buckets_for("model-b", BackendLimit(rpm=5))
    assert float(r.hget(paid.key, "tokens") or 0) < 4.1


def test_a_step_without_fallbacks_keeps_its_reply_done_as_before(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    agent(register_agent, "plain answer")
    _, done = run(streams, runs, r)
    # No `model` in the detail: only the run's usage (estimated: the test model reports none).
    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total": 5, "estimated": True}
    assert (done["status"], done["text"], done["detail"]) == (
        "ok",
        "plain answer",
        {"usage": usage},
    )


def test_a_model_past_its_soft_limit_hands_the_rest_of_the_time_to_the_next(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    first, _ = models
    agent(register_agent, "stall", FallbackModel("model-b", "in time"), soft_limit_s=0.3)
    started = time.monotonic()
    events, done = run(streams, runs, r)
    assert time.monotonic() - started >= 0.3
    assert (done["status"], done["text"]) == ("ok", "in time")
    # Timed out, not retried: the next model at once, after voiding the stalled start.
    assert first.calls == [("stall", 1)]
    [restart] = of_kind(events, "reply.restart")
    assert restart["data"]["reason"] == "failover"


def test_no_fallback_model_is_started_without_the_time_for_a_useful_call(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    models: Any,
) -> None:
    _, second = models
    # A 1.2 s run: the stalled model takes 0.8 s of it, which leaves less than the 0.5 s a
    # call needs (with the time kept for the reply.done): the fallback text, reason timeout,
    # well before the deadline.
    agent(
        register_agent,
        "stall",
        FallbackModel("model-b", "too late"),
        soft_limit_s=0.8,
        deadline_s=1.2,
    )
    started = time.monotonic()
    events, done = run(streams, runs, r)
    assert time.monotonic() - started < 1.2
    assert done["status"] == "degraded"
    detail = dict(done["detail"])
    assert detail.pop("usage")["estimated"] is True  # the stalled call's start, estimated
    assert detail == {"reason": "timeout", "message": "timeout"}
    assert second.calls == []
    # What the stalled model streamed stays, the fallback text after it (as without a chain).
    assert done["text"] == "a start \n" + FALLBACK
    assert of_kind(events, "reply.restart") == []
