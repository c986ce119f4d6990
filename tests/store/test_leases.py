"""Step leases and redelivery (streams/runs.py, streams/lua/) on a real Redis.

A lease of 0 s has run out by the time anything looks at it, so these tests need no waiting
to make a worker look dead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from agents import Agent, Step
from orchestration.inflight import DRAIN, LOST, InFlight
from orchestration.steps import StepOutcome
from orchestration.steps import execute_step as execute_step_async
from orchestration.sweeping import sweep_expired_leases, sweep_runs
from streams import keys
from streams.enqueue import RUN_STEP_TASK, RUNS_QUEUE
from streams.runs import MAX_REDELIVERIES, RUN_RECORD_GRACE_S, AsyncRunStore, Fenced, RunStore
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers import backends
from workers.backends import ModelRequest, split_evenly

PROMPT = 'a reply that "survives" its worker — é 中 🎉'
QUEUE = keys.celery_queue(RUNS_QUEUE)


def started(streams: Streams, agent: str = "echo", **options: Any) -> str:
    appended = streams.send(
        "room", f"m-{time.monotonic_ns()}", PROMPT, agent=agent, options=options
    )
    assert appended.run_id is not None
    return appended.run_id


def dead(r: redis.Redis) -> RunStore:
    """A store whose claims hold leases that have already run out: a worker that died."""
    return RunStore(r, lease_s=0.0)


def queued_steps(r: redis.Redis) -> list[tuple[list[Any], dict[str, Any]]]:
    """(args, headers) of every task message on the runs queue, oldest first."""
    steps = []
    for raw in reversed(r.lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        steps.append((args, message["headers"]))
    return steps


def field(r: redis.Redis, run_id: str, name: str) -> str | None:
    value = r.hget(keys.run(run_id), name)
    return value.decode() if value is not None else None


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def deltas(r: redis.Redis) -> list[dict[str, Any]]:
    return of_kind(log_events(r, "room"), "reply.delta")


def assert_reply(r: redis.Redis, run_id: str, status: str, text: str) -> None:
    """Exactly one reply.done for the run, its text the contiguous deltas since the last
    reply.restart (which voids what was streamed before it)."""
    events = log_events(r, "room")
    restarts = [index for index, event in enumerate(events) if event["kind"] == "reply.restart"]
    current = of_kind(events[restarts[-1] + 1 :] if restarts else events, "reply.delta")
    offset = 0
    for delta in current:
        assert delta["data"]["offset"] == offset
        offset += len(delta["data"]["text"])
    assert "".join(delta["data"]["text"] for delta in current) == text
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert (done["data"]["run"], done["data"]["status"], done["data"]["text"]) == (
        run_id,
        status,
        text,
    )
    seqs = [event["seq"] for event in log_events(r, "room")]
    assert seqs == list(range(1, len(seqs) + 1))


def test_claim_takes_a_lease_and_keeps_the_record_until_deadline_plus_grace(
    streams: Streams, r: redis.Redis
) -> None:
    run_id = started(streams)
    store = RunStore(r, lease_s=5)
    before = redis_now(r)
    run = store.claim(run_id, 0, retries=2)
    assert run is not None
    lease = float(field(r, run_id, "lease") or 0)
    assert before + 5 - 0.001 <= lease <= redis_now(r) + 5  # whole milliseconds
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) == pytest.approx(lease)
    assert field(r, run_id, "retries") == "2"
    assert field(r, run_id, "worker")
    assert store.expired_leases(keys.tenant_of_run(run_id)) == []
    left = run.seconds_left()
    assert left + RUN_RECORD_GRACE_S - 2 <= r.ttl(keys.run(run_id)) <= left + RUN_RECORD_GRACE_S + 1
    # The reply's text gets the same TTL as soon as it exists (it had none before leases).
    store.append_delta(run, "x")
    assert r.ttl(keys.run_text(run_id)) > RUN_RECORD_GRACE_S - 2


def test_appends_and_renewals_extend_the_lease_and_never_shorten_it(
    streams: Streams, r: redis.Redis
) -> None:
    run_id = started(streams)
    store = RunStore(r, lease_s=0.0)
    run = store.claim(run_id, 0)
    assert run is not None
    assert store.expired_leases(keys.tenant_of_run(run_id)) == [run_id]
    store.lease_s = 30
    store.append_delta(run, "piece")
    after_append = float(field(r, run_id, "lease") or 0)
    assert after_append >= redis_now(r) + 29
    assert store.expired_leases(keys.tenant_of_run(run_id)) == []

    assert store.renew_lease(run, extra_s=100)
    extended = float(field(r, run_id, "lease") or 0)
    assert extended >= after_append + 99
    assert store.renew_lease(run)  # a heartbeat after the retry's extension
    assert float(field(r, run_id, "lease") or 0) == pytest.approx(extended)
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) == pytest.approx(extended)


def test_an_expired_lease_is_redelivered_once_by_concurrent_sweepers(
    streams: Streams, store_redis_url: str, r: redis.Redis
) -> None:
    rounds = 20
    run_ids = [started(streams) for _ in range(rounds)]
    r.delete(QUEUE)  # the sends' own first messages: taken by workers that then die
    for index, run_id in enumerate(run_ids):
        assert dead(r).claim(run_id, 0, retries=index % 3) is not None
    sweepers = [RunStore(redis.Redis.from_url(store_redis_url)) for _ in range(2)]
    outcomes: list[list[str]] = [[] for _ in range(rounds)]
    barrier = threading.Barrier(2)

    def sweep(store: RunStore) -> None:
        for index, run_id in enumerate(run_ids):
            barrier.wait()
            outcomes[index].append(store.redeliver(run_id).outcome)

    threads = [threading.Thread(target=sweep, args=(store,)) for store in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    for store in sweepers:
        store.client.close()

    assert all(sorted(pair) == ["redelivered", "skipped"] for pair in outcomes), outcomes
    steps = queued_steps(r)
    assert sorted(args[0] for args, _ in steps) == sorted(run_ids)
    for args, headers in steps:
        index = run_ids.index(args[0])
        assert args == [run_ids[index], 0]
        assert headers["task"] == RUN_STEP_TASK
        assert headers["retries"] == index % 3  # the retry budget carries over
    for run_id in run_ids:
        assert field(r, run_id, "status") == "queued"
        assert field(r, run_id, "redeliveries") == "1"
        assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None
    # Nothing left to redeliver: a queued step's message is safe in the queue.
    assert sweep_expired_leases(RunStore(r)) == 0
    assert len(queued_steps(r)) == rounds


def test_a_redelivered_step_fences_the_lost_owner_and_restarts_the_reply(
    streams: Streams, r: redis.Redis
) -> None:
    run_id = started(streams, chunks=4)
    lost = dead(r).claim(run_id, 0)
    assert lost is not None
    first = split_evenly(PROMPT, 4)[0]
    dead(r).append_delta(lost, first)
    r.delete(QUEUE)

    assert sweep_expired_leases(RunStore(r)) == 1
    [(args, _)] = queued_steps(r)
    # The lost owner (stalled, not dead after all) can write nothing more.
    with pytest.raises(Fenced):
        dead(r).append_delta(lost, split_evenly(PROMPT, 4)[1])
    with pytest.raises(Fenced):
        dead(r).finalize(run_id, "ok", owner=lost.owner, run=lost)
    assert not dead(r).renew_lease(lost)

    # The redelivered message runs the step again. What the lost attempt streamed is voided
    # by one reply.restart, and the new attempt's reply starts again at offset 0.
    assert execute_step(RunStore(r), args[0], args[1], 0) == StepOutcome()
    assert_reply(r, run_id, "ok", PROMPT)
    kinds = [event["kind"] for event in log_events(r, "room")]
    assert kinds[:3] == ["message", "reply.delta", "reply.restart"]
    assert kinds.count("reply.restart") == 1
    assert deltas(r)[0]["data"]["text"] == first
    [restart] = of_kind(log_events(r, "room"), "reply.restart")
    assert restart["data"] == {"run": run_id, "attempt": 2, "reason": "redelivered", "step": 0}
    assert deltas(r)[1]["data"]["offset"] == 0
    assert field(r, run_id, "attempt") == "2"
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None

    # kombu restores the dead worker's original message after its visibility timeout:
    # the run is finished, so it does nothing.
    events = len(log_events(r, "room"))
    assert execute_step(RunStore(r), run_id, 0, 0) == StepOutcome()
    assert len(log_events(r, "room")) == events


def test_finished_runs_are_not_redelivered(streams: Streams, r: redis.Redis) -> None:
    finished, swept = started(streams), started(streams)
    r.delete(QUEUE)
    run = dead(r).claim(finished, 0)
    assert run is not None
    assert dead(r).finalize(finished, "ok", owner=run.owner, run=run)
    assert dead(r).claim(swept, 0) is not None
    assert dead(r).finalize(swept, "cancelled")  # a client's cancel, or the deadline sweep
    assert r.zscore(keys.run_leases(keys.tenant_of_run(finished)), finished) is None
    assert r.zscore(keys.run_leases(keys.tenant_of_run(swept)), swept) is None
    assert field(r, finished, "lease") is None

    # Even a stray lease entry (an older version, a partial failure) redelivers nothing.
    leases = keys.run_leases(keys.tenant_of_run(finished))
    gone = "r" + "f" * 32 + "." + keys.tenant_of_run(finished)
    r.zadd(leases, {finished: 1.0, gone: 1.0})
    assert RunStore(r).redeliver(finished).outcome == "skipped"
    assert RunStore(r).redeliver(gone).outcome == "skipped"
    assert sweep_expired_leases(RunStore(r)) == 0
    assert r.zcard(leases) == 0
    assert r.llen(QUEUE) == 0
    assert len(of_kind(log_events(r, "room"), "reply.done")) == 2


def test_a_run_past_its_deadline_is_ended_not_redelivered(
    streams: Streams, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("brief", Step(backend="simulated"), deadline_s=0)
    run_id = started(streams, agent=agent.name)
    r.delete(QUEUE)
    assert dead(r).claim(run_id, 0) is not None
    assert RunStore(r).redeliver(run_id).outcome == "skipped"
    assert r.llen(QUEUE) == 0
    swept = sweep_runs(RunStore(r))
    assert (swept.ended, swept.redelivered) == (1, 0)
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["detail"] == {"reason": "deadline"}
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None


def test_a_step_that_keeps_losing_its_worker_fails_after_the_bounded_redeliveries(
    streams: Streams, r: redis.Redis
) -> None:
    run_id = started(streams)
    r.delete(QUEUE)
    for redelivery in range(1, MAX_REDELIVERIES + 1):
        assert dead(r).claim(run_id, 0) is not None
        assert sweep_expired_leases(RunStore(r)) == 1
        assert field(r, run_id, "redeliveries") == str(redelivery)
    assert dead(r).claim(run_id, 0) is not None
    assert sweep_expired_leases(RunStore(r)) == 0
    assert r.llen(QUEUE) == MAX_REDELIVERIES
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["status"] == "failed"
    assert done["data"]["detail"] == {"reason": "worker_lost"}
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None
    assert r.zscore(keys.run_deadlines(keys.tenant_of_run(run_id)), run_id) is None


def test_a_step_handed_to_the_next_holds_no_lease_and_old_messages_cannot_rerun_it(
    streams: Streams, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("two", Step(backend="simulated"), Step(backend="simulated"))
    run_id = started(streams, agent=agent.name, chunks=2)
    r.delete(QUEUE)
    store = RunStore(r)
    assert execute_step(store, run_id, 0, 0) == StepOutcome(next_step=1)
    # One script queued the next step and gave up the lease: no moment holds neither.
    [(args, headers)] = queued_steps(r)
    assert (args, headers["task"]) == ([run_id, 1], RUN_STEP_TASK)
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None
    assert field(r, run_id, "status") == "queued"
    assert execute_step(store, run_id, 1, 0) == StepOutcome()
    # A late copy of step 0's message (kombu restoring it) changes nothing.
    assert store.claim(run_id, 0) is None
    assert_reply(r, run_id, "ok", PROMPT + PROMPT)


def test_claim_refuses_a_step_the_run_has_passed(streams: Streams, r: redis.Redis) -> None:
    run_id = started(streams)
    store = RunStore(r)
    assert store.claim(run_id, 1) is not None
    assert store.claim(run_id, 0) is None
    assert store.claim(run_id, 1) is not None


class StalledBackend:
    """One piece, then silence until released (or the call's deadline): a stalled provider."""

    name = "stalled"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.silent = threading.Event()

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        pieces = split_evenly(request.prompt, 2)
        yield pieces[0]
        self.silent.set()
        self.release.wait(max(0.0, deadline - time.monotonic()))
        yield pieces[1]


@pytest.fixture
def stalled(
    monkeypatch: pytest.MonkeyPatch, register_agent: Callable[..., Agent]
) -> Iterator[StalledBackend]:
    backend = StalledBackend()
    monkeypatch.setitem(backends._backends, "stalled", backend)
    register_agent("stalled", Step(backend="stalled", soft_limit_s=30))
    yield backend
    backend.release.set()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


def test_a_silent_model_call_keeps_its_lease_from_the_shared_renewal(
    streams: Streams, r: redis.Redis, stalled: StalledBackend
) -> None:
    run_id = started(streams, agent="stalled")
    store = RunStore(r, lease_s=0.3)
    step = threading.Thread(target=execute_step, args=(store, run_id, 0, 0))
    step.start()
    try:
        stalled.silent.wait(10)
        first = float(wait_for(lambda: field(r, run_id, "lease") or 0, "the first lease"))
        # Three lease lengths of silence: the renewal keeps it; the step is never lost.
        wait_for(lambda: float(field(r, run_id, "lease") or 0) > first + 0.9, "renewals")
        assert field(r, run_id, "redeliveries") is None
        assert sweep_expired_leases(RunStore(r, lease_s=0.3)) == 0
    finally:
        stalled.release.set()
        step.join(timeout=30)
    assert not step.is_alive()
    assert_reply(r, run_id, "ok", PROMPT)


def test_a_step_whose_renewal_is_refused_stops_and_writes_nothing_more(
    streams: Streams, r: redis.Redis, stalled: StalledBackend, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = started(streams, agent="stalled")
    store = RunStore(r, lease_s=0.3)
    step = threading.Thread(target=execute_step, args=(store, run_id, 0, 0))
    step.start()
    try:
        stalled.silent.wait(10)
        wait_for(lambda: deltas(r), "the first piece's append")  # else the append is fenced
        newer = dead(r).claim(run_id, 0)  # another attempt takes over with a 0 s lease
        assert newer is not None
        taken = field(r, run_id, "lease")
        wait_for(lambda: f"step stopped reason={LOST}" in caplog.text, "the step to stop")
        assert field(r, run_id, "lease") == taken  # never renewed the newer owner's lease
        assert field(r, run_id, "owner") == newer.owner
    finally:
        stalled.release.set()
        step.join(timeout=30)
    assert not step.is_alive()
    # The stalled attempt stopped fenced: it appended nothing after its first piece.
    assert [delta["data"]["text"] for delta in deltas(r)] == [split_evenly(PROMPT, 2)[0]]
    assert of_kind(log_events(r, "room"), "reply.done") == []


def test_due_leases_are_renewed_in_one_pipeline_and_lost_ones_stopped(
    streams: Streams, r: redis.Redis, store_redis_url: str
) -> None:
    kept_id, lost_id = started(streams), started(streams)

    async def main() -> list[str]:
        client = aredis.Redis.from_url(store_redis_url)
        store = AsyncRunStore(client, lease_s=0.3)
        inflight = InFlight(store)
        stopped: list[str] = []

        async def hold(run_id: str) -> None:
            run = await store.claim(run_id, 0)
            assert run is not None
            held = inflight.hold(run)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if held.stop_reason:  # stopped by InFlight, not by the test's cleanup
                    stopped.append(f"{run_id}:{held.stop_reason}")
            finally:
                inflight.release(held)

        tasks = [asyncio.create_task(hold(kept_id)), asyncio.create_task(hold(lost_id))]
        while len(inflight) < 2:
            await asyncio.sleep(0.01)
        claimed = float(r.hget(keys.run(kept_id), "lease") or 0)
        dead(r).claim(lost_id, 0)  # fenced: its renewal will be refused
        await asyncio.sleep(inflight.every_s)  # both are due now
        assert await inflight.renew_due() == 1
        await asyncio.gather(*tasks[1:])
        renewed = float(r.hget(keys.run(kept_id), "lease") or 0)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await client.aclose()
        assert renewed > claimed
        return stopped

    assert asyncio.run(main()) == [f"{lost_id}:{LOST}"]


def test_a_redelivered_later_step_restarts_the_reply_with_the_earlier_steps_text(
    streams: Streams, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    agent = register_agent("two", Step(backend="simulated"), Step(backend="simulated"))
    run_id = started(streams, agent=agent.name, chunks=2)
    r.delete(QUEUE)
    assert execute_step(RunStore(r), run_id, 0, 0) == StepOutcome(next_step=1)
    r.delete(QUEUE)
    # Step 1's first worker streams a little of its output, then dies.
    lost = dead(r).claim(run_id, 1)
    assert lost is not None
    dead(r).append_delta(lost, "half of")
    assert sweep_expired_leases(RunStore(r)) == 1
    [(args, _)] = queued_steps(r)
    assert args == [run_id, 1]

    assert execute_step(RunStore(r), run_id, 1, 0) == StepOutcome()
    events = log_events(r, "room")
    [restart] = of_kind(events, "reply.restart")
    assert restart["data"]["reason"] == "redelivered"
    after = of_kind(events[events.index(restart) + 1 :], "reply.delta")
    # Step 0's text again, as one delta at offset 0, then step 1's own from where it ends.
    assert after[0]["data"] == {"run": run_id, "offset": 0, "text": PROMPT}
    assert after[1]["data"]["offset"] == len(PROMPT)
    assert_reply(r, run_id, "ok", PROMPT + PROMPT)


def test_a_draining_worker_hands_its_unfinished_step_to_another_at_once(
    streams: Streams, r: redis.Redis, store_redis_url: str, stalled: StalledBackend
) -> None:
    run_id = started(streams, agent="stalled")
    r.delete(QUEUE)

    async def main() -> StepOutcome:
        client = aredis.Redis.from_url(store_redis_url)
        store = AsyncRunStore(client)
        inflight = InFlight(store)
        try:
            step = asyncio.create_task(execute_step_async(store, inflight, run_id, 0))
            async with asyncio.timeout(10):
                # Held, and its first piece appended: the model is silent now.
                while not (len(inflight) and stalled.silent.is_set() and deltas(r)):
                    await asyncio.sleep(0.01)
            assert inflight.stop_all(DRAIN) == 1  # what the runtime's drain asks at its bound
            return await step
        finally:
            stalled.release.set()
            await client.aclose()

    assert asyncio.run(main()) == StepOutcome(handed_back=True)
    # The same step is queued again for another worker, and the run holds no lease meanwhile.
    [(args, headers)] = queued_steps(r)
    assert (args, headers["task"]) == ([run_id, 0], RUN_STEP_TASK)
    assert field(r, run_id, "status") == "queued"
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) is None
    assert of_kind(log_events(r, "room"), "reply.done") == []
    # Its next attempt voids what the drained one streamed and finishes the reply.
    assert execute_step(RunStore(r), run_id, 0, 0) == StepOutcome()
    [restart] = of_kind(log_events(r, "room"), "reply.restart")
    assert restart["data"]["reason"] == "redelivered"
    assert_reply(r, run_id, "ok", PROMPT)
