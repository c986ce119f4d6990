"""Cancellation reaches the model call (orchestration/cancel.py, steps.py, inflight.py) on a
real Redis: a step whose run is cancelled while its model call stalls stops at once, writes
nothing more, and frees its worker; the run has exactly one reply.done, `cancelled`. The
stop is pushed to the holding worker; a worker that missed the push finds it when its lease
renewal is refused."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from django.conf import settings

from agents import Agent, Step
from orchestration.cancel import _finalize_cancelled
from orchestration.inflight import InFlight
from orchestration.steps import StepOutcome
from orchestration.steps import execute_step as execute_step_async
from streams import keys
from streams.runs import AsyncRunStore, RunStore
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers.backends import split_evenly

PROMPT = "a reply nobody will wait for"
# Far beyond any wait below: only the cancellation can end these calls in time.
STALL_MS = 600_000


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


@pytest.fixture
def patient(register_agent: Callable[..., Agent]) -> Agent:
    """Calls that may stall for 10 minutes within a deadline of an hour."""
    return register_agent("patient", Step(backend="simulated", soft_limit_s=600), deadline_s=3600)


def execute_step_without_stop_channel(store: RunStore, run_id: str, step: int) -> StepOutcome:
    """A step on a worker whose stop channel is down (the push was missed while it
    resubscribed): only its lease renewal can find that the run was ended."""

    async def main() -> StepOutcome:
        client = aredis.Redis.from_url(settings.REDIS_URL)
        async_store = AsyncRunStore(client, lease_s=store.lease_s)
        inflight = InFlight(async_store)
        renewal = asyncio.create_task(inflight.keep_leases())
        try:
            return await asyncio.create_task(
                execute_step_async(async_store, inflight, run_id, step)
            )
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await client.aclose()

    return asyncio.run(main())


class StepThread:
    """execute_step on its own thread and event loop, as a worker's runtime runs it."""

    def __init__(self, store: RunStore, run_id: str, stop_channel: bool = True) -> None:
        self.outcome: StepOutcome | None = None
        run = execute_step if stop_channel else execute_step_without_stop_channel
        self.thread = threading.Thread(
            target=lambda: setattr(self, "outcome", run(store, run_id, 0)), daemon=True
        )
        self.thread.start()

    def finished_within(self, seconds: float) -> bool:
        self.thread.join(timeout=seconds)
        return not self.thread.is_alive()


@pytest.fixture
def steps() -> Iterator[list[StepThread]]:
    started: list[StepThread] = []
    yield started
    for step in started:
        step.thread.join(timeout=30)


def status(r: redis.Redis, run_id: str) -> bytes | None:
    return r.hget(keys.run(run_id), "status")


@pytest.mark.parametrize(
    ("lease_s", "stop_channel"),
    # A lease of a minute is renewed every 20 s: within the wait below only the push can
    # stop the step. Without the channel, a 0.3 s lease's refused renewal must.
    [(60.0, True), (0.3, False)],
    ids=["pushed-to-the-worker", "found-by-the-lease-renewal"],
)
@pytest.mark.parametrize(
    "options",
    [{"latency_ms": STALL_MS}, {"fail": "timeout"}],
    ids=["slow-first-token", "stalled"],
)
def test_cancelling_a_stalled_call_abandons_it_and_frees_the_worker(
    streams: Streams,
    r: redis.Redis,
    patient: Agent,
    steps: list[StepThread],
    lease_s: float,
    stop_channel: bool,
    options: dict[str, Any],
) -> None:
    run_id = streams.send("room", "m-1", PROMPT, agent=patient.name, options=options).run_id
    assert run_id is not None
    step = StepThread(RunStore(r, lease_s=lease_s), run_id, stop_channel)
    steps.append(step)
    wait_for(lambda: status(r, run_id) == b"running", "the step to claim the run")

    assert _finalize_cancelled(run_id) == (True, "")  # what the gateway's cancel does

    # The call would stall for ten minutes: the step ends now, and owes nothing more.
    assert step.finished_within(10), "the cancelled model call was not abandoned"
    assert step.outcome == StepOutcome()
    events = log_events(r, "room")
    assert [event["kind"] for event in events] == ["message", "reply.done"]
    assert events[-1]["data"] == {
        "run": run_id,
        "status": "cancelled",
        "text": "",
        "detail": {"reason": "cancelled by client"},
    }
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None


def test_a_call_cancelled_mid_reply_appends_nothing_after_the_reply_done(
    streams: Streams,
    r: redis.Redis,
    patient: Agent,
    steps: list[StepThread],
) -> None:
    # A minute's lease, renewed every 20 s: only the stop pushed to the worker ends the call.
    options = {"chunks": 4, "chunk_delay_ms": STALL_MS}
    run_id = streams.send("room", "m-1", PROMPT, agent=patient.name, options=options).run_id
    assert run_id is not None
    step = StepThread(RunStore(r, lease_s=60.0), run_id)
    steps.append(step)
    first = split_evenly(PROMPT, 4)[0]
    wait_for(lambda: of_kind(log_events(r, "room"), "reply.delta"), "the first piece")

    assert _finalize_cancelled(run_id) == (True, "")

    assert step.finished_within(10), "the cancelled model call was not abandoned"
    events = log_events(r, "room")
    assert [event["kind"] for event in events] == ["message", "reply.delta", "reply.done"]
    assert events[1]["data"]["text"] == first
    assert (events[2]["data"]["status"], events[2]["data"]["text"]) == ("cancelled", first)


def test_a_run_cancelled_before_its_step_starts_is_never_called(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    run_id = streams.send("room", "m-1", PROMPT).run_id
    assert run_id is not None
    assert _finalize_cancelled(run_id) == (True, "")
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert [event["kind"] for event in log_events(r, "room")] == ["message", "reply.done"]


def test_cancelling_a_finished_run_changes_nothing_and_says_how_it_ended(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    run_id = streams.send("room", "m-1", PROMPT).run_id
    assert run_id is not None
    assert execute_step(runs, run_id, 0, 0) == StepOutcome()
    assert _finalize_cancelled(run_id) == (False, "ok")
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["status"] == "ok"

    again = streams.send("room", "m-2", PROMPT).run_id
    assert again is not None
    assert _finalize_cancelled(again) == (True, "")
    assert _finalize_cancelled(again) == (False, "cancelled")
    assert len(of_kind(log_events(r, "room"), "reply.done")) == 2
