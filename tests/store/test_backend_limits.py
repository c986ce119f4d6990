"""Model-call rate limits per backend and deadline propagation (orchestration/steps.py,
workers/quotas.py) on a real Redis: a step takes a request and its estimated tokens from
its backend's global buckets before calling; it waits for them only while a useful call
still fits before the run's deadline, else answers the fallback (`rate_limited`); and it
never starts a call it has no time for (`deadline`)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from pytest_django.fixtures import Settings

from agents import Agent, Step
from orchestration.cancel import _finalize_cancelled
from orchestration.steps import StepOutcome
from streams import keys
from streams.buckets import SyncBuckets
from streams.rate_limits import BackendLimit
from streams.runs import RunStore
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers import backends
from workers.backends import ModelRequest, SimulatedBackend
from workers.quotas import buckets_for, estimated_tokens

PROMPT = "twelve chars" * 10  # 120 characters: 30 estimated tokens
FALLBACK = "busy, try again"


class CountingBackend(SimulatedBackend):
    """The simulated model, counting the calls it was asked to make."""

    name = "metered"

    def __init__(self) -> None:
        self.calls = 0

    def astream(self, request: ModelRequest) -> AsyncIterator[str]:
        self.calls += 1
        return super().astream(request)


@pytest.fixture
def metered(monkeypatch: pytest.MonkeyPatch) -> CountingBackend:
    backend = CountingBackend()
    monkeypatch.setitem(backends._backends, backend.name, backend)
    return backend


@pytest.fixture
def limit(settings: Settings) -> Callable[..., BackendLimit]:
    def set_limit(rpm: int | None = None, tpm: int | None = None) -> BackendLimit:
        spec = {unit: value for unit, value in (("rpm", rpm), ("tpm", tpm)) if value}
        limits = {**settings.SWITCHBOARD.get("BACKEND_LIMITS", {}), "metered": spec}
        settings.SWITCHBOARD = {**settings.SWITCHBOARD, "BACKEND_LIMITS": limits}
        return BackendLimit(rpm=rpm, tpm=tpm)

    return set_limit


def agent(register: Callable[..., Agent], deadline_s: float = 30.0, **step: Any) -> Agent:
    return register(
        "metered",
        Step(backend="metered", fallback_text=FALLBACK, **step),
        deadline_s=deadline_s,
    )


def send(streams: Streams, message_id: str, text: str = PROMPT) -> str:
    run_id = streams.send("room", message_id, text, agent="metered").run_id
    assert run_id is not None
    return run_id


def dones(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {e["data"]["run"]: e["data"] for e in of_kind(log_events(r, "room"), "reply.done")}


def drain(r: redis.Redis, limit: BackendLimit, unit: str) -> None:
    """Spend a whole bucket, as calls on other workers would have."""
    kind = {"rpm": "requests", "tpm": "tokens"}[unit]
    [bucket] = [bucket for bucket, counts in buckets_for("metered", limit) if counts == kind]
    assert SyncBuckets(r).take([bucket], bucket.burst) == 0


def bucket_tokens(r: redis.Redis, unit: str) -> float:
    return float(r.hget(f"{keys.PREFIX}:backend:metered:{unit}", "tokens") or "nan")


def test_a_call_pays_a_request_and_its_estimated_tokens(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
) -> None:
    agent(register_agent)
    limit(rpm=10, tpm=1000)
    run_id = send(streams, "m-1")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert dones(r)[run_id]["status"] == "ok"
    assert metered.calls == 1
    # Paid once each (a refill of a few ms may have trickled back in since).
    assert 9 <= bucket_tokens(r, "rpm") < 9.1
    assert 1000 - estimated_tokens(PROMPT) <= bucket_tokens(r, "tpm") < 1001 - 30


def test_the_budget_is_one_for_every_worker(
    streams: Streams,
    r: redis.Redis,
    store_redis_url: str,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
) -> None:
    agent(register_agent)
    limit(rpm=2)
    run_ids = [send(streams, f"m-{index}") for index in range(3)]
    # Three "workers", each with its own connection: two calls fit in the minute.
    workers = [RunStore(redis.Redis.from_url(store_redis_url)) for _ in run_ids]
    for worker, run_id in zip(workers, run_ids, strict=True):
        assert execute_step(worker, run_id, 0, 0) == StepOutcome()
        worker.client.close()
    statuses = [dones(r)[run_id] for run_id in run_ids]
    assert [done["status"] for done in statuses] == ["ok", "ok", "degraded"]
    assert statuses[2]["detail"] == {
        "reason": "rate_limited",
        "message": "model rate limit reached",
    }
    assert statuses[2]["text"] == FALLBACK
    assert metered.calls == 2


def test_a_budget_that_comes_back_too_late_answers_rate_limited_at_once(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
) -> None:
    # One request a minute, already spent: the next comes back in 60 s, after the 30 s
    # deadline. The step does not wait for it (pytest-timeout would stop one that did).
    agent(register_agent, deadline_s=30)
    drain(r, limit(rpm=1), "rpm")
    run_id = send(streams, "m-1")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert dones(r)[run_id] == {
        "run": run_id,
        "status": "degraded",
        "text": FALLBACK,
        "detail": {"reason": "rate_limited", "message": "model rate limit reached"},
    }
    assert metered.calls == 0


def test_a_prompt_above_a_minutes_tokens_is_never_sent(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
) -> None:
    agent(register_agent, deadline_s=3600)
    limit(rpm=100, tpm=estimated_tokens(PROMPT) - 1)
    run_id = send(streams, "m-1")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert dones(r)[run_id]["detail"] == {
        "reason": "rate_limited",
        "message": "model rate limit reached",
    }
    assert metered.calls == 0


@pytest.mark.parametrize("unit", ["rpm", "tpm"])
def test_a_budget_that_comes_back_in_time_is_waited_for(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
    unit: str,
) -> None:
    # 600 requests (60,000 tokens) a minute, all spent: 10 a second come back, so the
    # step waits a moment, then calls, well within its deadline.
    agent(register_agent, deadline_s=30)
    drain(r, limit(**{unit: 600 if unit == "rpm" else 60_000}), unit)
    run_id = send(streams, "m-1")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert dones(r)[run_id]["status"] == "ok"
    assert metered.calls == 1


def test_a_run_cancelled_while_waiting_for_its_budget_stops_waiting(
    streams: Streams,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
    limit: Callable[..., BackendLimit],
) -> None:
    # The request comes back in a minute and the deadline is an hour away: the step waits,
    # holding its lease, until the cancellation (pushed to the worker) ends the wait.
    agent(register_agent, deadline_s=3600)
    drain(r, limit(rpm=1), "rpm")
    run_id = send(streams, "m-1")
    store = RunStore(r, lease_s=0.3)
    outcome: list[StepOutcome] = []
    step = threading.Thread(target=lambda: outcome.append(execute_step(store, run_id, 0, 0)))
    step.start()
    try:
        deadline = time.monotonic() + 10
        while r.hget(keys.run(run_id), "status") != b"running":
            assert time.monotonic() < deadline, "the step never claimed the run"
            time.sleep(0.01)
        first_lease = float(r.hget(keys.run(run_id), "lease") or 0)
        # The shared renewal keeps the lease while the step waits for its budget.
        while float(r.hget(keys.run(run_id), "lease") or 0) <= first_lease + 0.3:
            assert time.monotonic() < deadline, "the lease was not renewed during the wait"
            time.sleep(0.01)
        assert _finalize_cancelled(run_id) == (True, "")
    finally:
        step.join(timeout=10)
    assert not step.is_alive(), "the wait for the budget outlived the cancellation"
    assert outcome == [StepOutcome()]
    assert metered.calls == 0
    assert [e["kind"] for e in log_events(r, "room")] == ["message", "reply.done"]
    assert dones(r)[run_id]["status"] == "cancelled"


def test_a_call_with_less_time_left_than_its_minimum_is_not_started(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
) -> None:
    # Two seconds left of the run, but the step needs at least five to be of any use.
    agent(register_agent, deadline_s=2, min_budget_s=5)
    run_id = send(streams, "m-1")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert dones(r)[run_id] == {
        "run": run_id,
        "status": "degraded",
        "text": FALLBACK,
        "detail": {"reason": "deadline", "message": "no time left before the run's deadline"},
    }
    assert metered.calls == 0


def test_a_call_is_cut_off_before_the_deadline_to_leave_time_for_the_fallback(
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    register_agent: Callable[..., Agent],
    metered: CountingBackend,
) -> None:
    # A soft limit beyond the run's deadline: the call gets the run's time, less a reserve,
    # and the client reads the degraded fallback before the sweeper would fail the run.
    agent(register_agent, deadline_s=1, soft_limit_s=60, min_budget_s=0.1)
    appended = streams.send("room", "m-1", PROMPT, agent="metered", options={"fail": "timeout"})
    run_id = appended.run_id
    assert run_id is not None
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    done = dones(r)[run_id]
    assert (done["status"], done["detail"]) == (
        "degraded",
        {"reason": "timeout", "message": "timeout"},
    )
    finished_at = float(r.hget(keys.run(run_id), "deadline") or 0)
    assert time.time() < finished_at, "the fallback must come before the run's deadline"
    assert metered.calls == 1
