"""A run step end to end without Celery (orchestration/services.py) on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from orchestration.agents import Agent, Step
from orchestration.runs import RunStore
from orchestration.services import StepOutcome, execute_step, sweep_overdue_runs
from realtime import keys
from tests.store.conftest import Streams, log_events, of_kind
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
    offset = 0
    for delta in of_kind(log_events(r, "room"), "reply.delta"):
        assert delta["data"]["offset"] == offset
        offset += len(delta["data"]["text"])


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
    assert done["data"] == {"run": run_id, "status": "ok", "text": PROMPT, "detail": None}
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


def test_transient_error_is_retried_without_duplicating_text(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = started(streams, fail="error_once", chunks=2)
    outcome = execute_step(runs, run_id, 0, 0)
    backoff = settings.SWITCHBOARD["MODEL_RETRY_BACKOFF_S"]
    assert outcome == StepOutcome(retry_in_s=backoff)
    assert done_events(r) == []
    assert execute_step(runs, run_id, 0, 1) == StepOutcome()
    assert "".join(delta_texts(r)) == PROMPT
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", PROMPT)


class FlakyBackend:
    """Streams part of the reply, then fails transiently, on the first attempt only; later
    attempts regenerate from the start in differently sized pieces."""

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


def test_retry_after_partial_output_skips_what_was_already_sent(
    streams: Streams, runs: RunStore, r: redis.Redis, flaky_agent: Agent
) -> None:
    run_id = started(streams, agent=flaky_agent.name)
    first = execute_step(runs, run_id, 0, 0)
    assert first.retry_in_s is not None
    sent_before_retry = "".join(delta_texts(r))
    assert sent_before_retry and PROMPT.startswith(sent_before_retry)
    assert execute_step(runs, run_id, 0, 1) == StepOutcome()
    assert "".join(delta_texts(r)) == PROMPT
    assert_contiguous(r)
    [done] = done_events(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", PROMPT)


def test_errors_past_the_retry_budget_answer_degraded(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("fragile", Step(backend="simulated", max_retries=2, fallback_text="no"))
    run_id = started(streams, agent=agent.name, fail="error")
    assert execute_step(runs, run_id, 0, 0).retry_in_s is not None
    assert execute_step(runs, run_id, 0, 1).retry_in_s is not None
    assert execute_step(runs, run_id, 0, 2) == StepOutcome()
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
    from orchestration import agents

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
    assert runs.overdue(now) == []
    assert runs.overdue(time.time() + 7200) == [pending]
    # The swept run's worker, still going, can append nothing more.
    assert execute_step(runs, overdue[1], 0, 0) == StepOutcome()
    assert len(done_events(r)) == 2


class BurstThenBackend:
    """Three pieces at once (the first appended, two buffered), then an ending: a
    permanent error, or the run stops needing the call (its cancelled event set)."""

    name = "burst"

    def __init__(self, ending: str) -> None:
        self.ending = ending

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        yield from ("one ", "two ", "three")
        if self.ending == "cancelled":
            request.cancelled.set()
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


def test_buffered_pieces_are_dropped_when_the_call_is_cancelled(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    register_agent: Callable[..., Agent],
) -> None:
    monkeypatch.setitem(backends._backends, "burst", BurstThenBackend("cancelled"))
    agent = register_agent("burst", Step(backend="burst"))
    run_id = started(streams, agent=agent.name)
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert delta_texts(r) == ["one "]
    assert done_events(r) == []
