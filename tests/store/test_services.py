"""A run step end to end without Celery (orchestration/steps.py) on a real Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from agents import Agent, Step
from orchestration.cancel import _finalize_cancelled
from orchestration.steps import StepOutcome
from orchestration.sweeping import sweep_overdue_runs
from streams import keys
from streams.enqueue import RUNS_QUEUE
from streams.runs import RunStore
from streams.usage import estimate_tokens
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers import backends
from workers.backends import ModelError, ModelRequest, split_evenly

PROMPT = 'Say "héllo" \\ 中文 🎉 twice'


def started(streams: Streams, text: str = PROMPT, agent: str = "echo", **options: Any) -> str:
    appended = streams.send("room", f"m-{time.monotonic_ns()}", text, agent=agent, options=options)
    assert appended.run_id is not None
    return appended.run_id


def done_events(r: redis.Redis) -> list[dict[str, Any]]:
    return of_kind(log_events(r, "room"), "reply.done")


def delta_texts(r: redis.Redis) -> list[str]:
    return [event["data"]["text"] for event in of_kind(log_events(r, "room"), "reply.delta")]


def assert_contiguous(r: redis.Redis) -> None:
    """Each delta continues where the reply stood; a reply.restart starts it again at 0."""
    offset = 0
    for event in log_events(r, "room"):
        if event["kind"] == "reply.restart":
            offset = 0
        elif event["kind"] == "reply.delta":
            assert event["data"]["offset"] == offset
            offset += len(event["data"]["text"])


def test_ok_path_streams_the_echo_and_finishes_once(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = started(streams, chunks=3)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    # The first piece goes out at once; the other two arrive together and are coalesced.
    first, second, third = split_evenly(PROMPT, 3)
    assert delta_texts(r) == [first, second + third]
    assert_contiguous(r)
    [done] = done_events(r)
    # The simulated backend reports its usage: its "tokenizer" is the estimate's rule.
    tokens = estimate_tokens(PROMPT)
    usage = {"prompt_tokens": tokens, "completion_tokens": tokens, "total": 2 * tokens}
    detail = {"usage": {**usage, "estimated": False}}
    assert done["data"] == {"run": run_id, "status": "ok", "text": PROMPT, "detail": detail}
    assert [event["kind"] for event in log_events(r, "room")] == [
        "message",
        "reply.delta",
        "reply.delta",
        "reply.done",
    ]
    # A redelivered message for the finished run does nothing.
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert len(log_events(r, "room")) == 4


@pytest.mark.parametrize("setting", ["DELTA_FLUSH_CHARS", "DELTA_FLUSH_MS"])
def test_coalescing_off_appends_one_delta_per_piece(
    streams: Streams, runs: RunStore, r: redis.Redis, settings: Any, setting: str
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, setting: 0}
    run_id = started(streams, chunks=3)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert delta_texts(r) == split_evenly(PROMPT, 3)
    assert_contiguous(r)


def test_a_fast_200_piece_reply_is_appended_in_few_deltas(
    streams: Streams, runs: RunStore, r: redis.Redis, settings: Any
) -> None:
    # Only the size limit at work, whatever the machine's speed.
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "DELTA_FLUSH_MS": 60_000}
    text = "".join(f"tok{i % 10}" for i in range(200))  # 800 characters, 4 per piece
    run_id = started(streams, text, chunks=200)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    texts = delta_texts(r)
    assert "".join(texts) == text
    assert_contiguous(r)
    # The first piece at once, then at least DELTA_FLUSH_CHARS (64) per delta but the last.
    assert texts[0] == "tok0"
    assert 2 <= len(texts) <= 1 + -(-(len(text) - 4) // 64)
    assert all(len(piece) >= 64 for piece in texts[1:-1])
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", text)


def queued_messages(r: redis.Redis) -> list[bytes]:
    return r.lrange(keys.celery_queue(RUNS_QUEUE), 0, -1)


def test_transient_error_is_retried_in_place_without_duplicating_text(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = started(streams, fail="error_once", chunks=2)
    r.delete(keys.celery_queue(RUNS_QUEUE))
    # The first call fails before any text; the step sleeps its backoff and calls again.
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert queued_messages(r) == []  # retried inside the step: no message is queued
    assert "".join(delta_texts(r)) == PROMPT
    assert_contiguous(r)
    # Nothing had streamed, so there is nothing to void.
    assert of_kind(log_events(r, "room"), "reply.restart") == []
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", PROMPT)


class FlakyBackend:
    """Streams part of the reply, then fails transiently, on the first attempt only; later
    attempts regenerate from the start in differently sized pieces. A blocking backend: it
    runs in the runtime's thread pool (workers.backends.blocking_stream)."""

    name = "flaky"

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        if request.attempt == 1:
            yield from split_evenly(request.prompt, 5)[:2]
            raise ModelError("connection reset", transient=True)
        yield from split_evenly(request.prompt, 3)


@pytest.fixture
def flaky_agent(monkeypatch: pytest.MonkeyPatch, register_agent: Callable[..., Agent]) -> Agent:
    monkeypatch.setitem(backends._backends, "flaky", FlakyBackend())
    return register_agent("flaky", Step(backend="flaky", max_retries=2))


def test_retry_after_partial_output_restarts_the_reply(
    streams: Streams, runs: RunStore, r: redis.Redis, flaky_agent: Agent
) -> None:
    run_id = started(streams, agent=flaky_agent.name)
    r.delete(keys.celery_queue(RUNS_QUEUE))
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert queued_messages(r) == []
    events = log_events(r, "room")
    [restart] = of_kind(events, "reply.restart")
    at = events.index(restart)
    before = [e["data"]["text"] for e in of_kind(events[:at], "reply.delta")]
    after = of_kind(events[at + 1 :], "reply.delta")
    # The first attempt's text went out, then was voided: never spliced with the second's.
    assert "".join(before) == "".join(split_evenly(PROMPT, 5)[:2])
    assert restart["data"] == {"run": run_id, "attempt": 2, "reason": "retry", "step": 0}
    # The new attempt streams the whole reply again from offset 0.
    assert after[0]["data"]["offset"] == 0
    assert "".join(delta["data"]["text"] for delta in after) == PROMPT
    assert_contiguous(r)
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", PROMPT)
    assert events[-1] == done


def test_errors_past_the_retry_budget_answer_degraded(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("fragile", Step(backend="simulated", max_retries=2, fallback_text="no"))
    run_id = started(streams, agent=agent.name, fail="error")
    r.delete(keys.celery_queue(RUNS_QUEUE))
    # Three calls (the first and two retries), all in the one step.
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert queued_messages(r) == []
    assert r.hget(keys.run(run_id), "attempt") == b"1"  # claimed once
    [done] = done_events(r)
    assert done["data"]["status"] == "degraded"
    assert done["data"]["text"] == "no"
    assert done["data"]["detail"] == {"reason": "model_error", "message": "model error"}


def test_timeout_answers_degraded_with_the_steps_fallback(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    fallback = 'Fallback: "busy" — réessayez ✓'
    agent = register_agent(
        "slow", Step(backend="simulated", soft_limit_s=0.05, fallback_text=fallback)
    )
    run_id = started(streams, agent=agent.name, fail="timeout")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert delta_texts(r) == [fallback]
    [done] = done_events(r)
    assert done["data"] == {
        "run": run_id,
        "status": "degraded",
        "text": fallback,
        "detail": {"reason": "timeout", "message": "timeout"},
    }


def test_passed_deadline_answers_degraded_without_calling_the_model(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("late", Step(backend="simulated", fallback_text="late"), deadline_s=0)
    run_id = started(streams, agent=agent.name)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    [done] = done_events(r)
    assert (done["data"]["text"], done["data"]["detail"]) == (
        "late",
        {"reason": "deadline", "message": "no time left before the run's deadline"},
    )


def test_unknown_agent_fails_the_run(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agents

    agent = register_agent("retired", Step(backend="simulated"))
    run_id = started(streams, agent=agent.name)
    monkeypatch.delitem(agents._registry, "retired")  # removed by a deploy mid-run
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    [done] = done_events(r)
    assert done["data"]["status"] == "failed"
    assert done["data"]["detail"] == {"reason": "agent not available"}


def test_multi_step_agent_hands_over_to_the_next_step(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("pipeline", Step(backend="simulated"), Step(backend="simulated"))
    run_id = started(streams, agent=agent.name, chunks=2)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome(next_step=1)
    assert done_events(r) == []
    assert execute_step(runs, run_id, 1, 0) == StepOutcome()
    [done] = done_events(r)
    assert done["data"]["text"] == PROMPT + PROMPT
    assert_contiguous(r)


def test_sweep_ends_overdue_runs_once_with_failed(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    register_agent("patient", Step(backend="simulated"), deadline_s=3600)
    overdue = [started(streams) for _ in range(2)]
    pending = started(streams, agent="patient")
    partial = runs.claim(overdue[0], 0)
    assert partial is not None
    runs.append_delta(partial, "so far")
    now = time.time() + 60  # past the echo runs' 30 s deadline, long before "patient"'s

    assert sweep_overdue_runs(runs, now=now) == 2
    assert sweep_overdue_runs(runs, now=now) == 0
    dones = {done["data"]["run"]: done["data"] for done in done_events(r)}
    assert set(dones) == set(overdue)
    assert all(data["status"] == "failed" for data in dones.values())
    assert all(data["detail"] == {"reason": "deadline"} for data in dones.values())
    assert dones[overdue[0]]["text"] == "so far"
    assert r.hget(keys.run(pending), "status") == b"queued"
    assert runs.overdue(keys.tenant_of_run(pending), now) == []
    assert runs.overdue(keys.tenant_of_run(pending), time.time() + 7200) == [pending]
    # The swept run's worker, still going, can append nothing more.
    assert execute_step(runs, overdue[1], 0, 0) == StepOutcome()
    assert len(done_events(r)) == 2


class BurstThenBackend:
    """Three pieces at once (the first appended, two buffered), then an ending: a
    permanent error, or a stall that only the run's stop ends (a blocking backend waits
    on `request.cancelled`, which the runtime sets when it abandons the call)."""

    name = "burst"

    def __init__(self, ending: str) -> None:
        self.ending = ending
        self.stalled = threading.Event()

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        yield from ("one ", "two ", "three")
        if self.ending == "stall":
            self.stalled.set()
            request.cancelled.wait(600)
            raise backends.ModelCancelled()
        raise ModelError("bad request", transient=False)


def test_buffered_pieces_are_appended_before_the_fallback(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    register_agent: Callable[..., Agent],
) -> None:
    monkeypatch.setitem(backends._backends, "burst", BurstThenBackend("error"))
    agent = register_agent("burst", Step(backend="burst", fallback_text="sorry"))
    run_id = started(streams, agent=agent.name)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert delta_texts(r) == ["one ", "two three", "\nsorry"]
    assert_contiguous(r)
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("degraded", "one two three\nsorry")


class RefusingBackend:
    """A provider that refuses the call, in its own words (which may quote the request)."""

    name = "refusing"

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        raise ModelError(
            "provider answered 400: prompt rejected, key sk-live-123",
            False,
            summary="provider error 400",
        )
        yield ""  # a generator, as a streaming backend is


def test_a_degraded_reply_says_why_in_the_backends_words_for_clients(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    register_agent: Callable[..., Agent],
) -> None:
    monkeypatch.setitem(backends._backends, "refusing", RefusingBackend())
    agent = register_agent("refused", Step(backend="refusing", fallback_text="sorry"))
    run_id = started(streams, agent=agent.name)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    [done] = done_events(r)
    assert done["data"]["detail"] == {"reason": "model_error", "message": "provider error 400"}
    # The provider's own words (and what they quote) stay in the worker's log.
    assert "sk-live-123" not in json.dumps(log_events(r, "room"))


def test_a_cancel_published_while_a_step_streams_stops_it_and_drops_its_buffer(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    register_agent: Callable[..., Agent],
) -> None:
    burst = BurstThenBackend("stall")
    monkeypatch.setitem(backends._backends, "burst", burst)
    agent = register_agent("burst", Step(backend="burst", soft_limit_s=600), deadline_s=3600)
    run_id = started(streams, agent=agent.name)
    outcome: list[StepOutcome] = []
    step = threading.Thread(target=lambda: outcome.append(execute_step(runs, run_id, 0, 0)))
    step.start()
    try:
        assert burst.stalled.wait(10), "the model call never started"
        deadline = time.monotonic() + 10
        while not delta_texts(r):  # the first piece is appended at once, the rest buffered
            assert time.monotonic() < deadline, "the first piece was never appended"
            time.sleep(0.01)
        assert _finalize_cancelled(run_id) == (True, "")  # publishes the stop to the worker
    finally:
        step.join(timeout=10)
    assert not step.is_alive(), "the stop did not end the stalled call"
    assert outcome == [StepOutcome()]
    # The two buffered pieces were never appended: the reply ends with what was sent.
    assert delta_texts(r) == ["one "]
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("cancelled", "one ")
    assert [event["kind"] for event in log_events(r, "room")][-1] == "reply.done"
