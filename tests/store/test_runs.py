"""Run records and fenced appends (streams/runs.py) on a real Redis."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import redis

from streams import keys
from streams.runs import Fenced, RunFinished, RunStore
from tests.store.conftest import CLIENT, TENANT, Streams, log_events, of_kind

PIECES = ['He said "hi"', " \\ back", "slash\n", "\x00\x1f ctl", " né 中", " 🎉👍🏽", ""]


def new_run(streams: Streams, text: str = "hello", message_id: str = "m-1") -> tuple[str, str]:
    """Accept a send; returns (run id, message event id)."""
    appended = streams.send("room", message_id, text)
    assert appended.run_id is not None
    return appended.run_id, appended.event_id


def run_field(r: redis.Redis, run_id: str, name: str) -> str | None:
    value = r.hget(keys.run(run_id), name)
    return value.decode() if value is not None else None


def test_claim_returns_the_run(streams: Streams, runs: RunStore, r: redis.Redis) -> None:
    run_id, event_id = new_run(streams, 'the "prompt" é')
    run = runs.claim(run_id, 0)
    assert run is not None
    assert (run.run_id, run.tenant, run.stream, run.agent) == (run_id, TENANT, "room", "echo")
    assert (run.client, run.message_id, run.message_event) == (CLIENT, "m-1", event_id)
    assert (run.text, run.options, run.attempt, run.emitted) == ('the "prompt" é', {}, 1, 0)
    assert run.owner
    assert 0 < run.seconds_left() <= 30
    assert run.cause() == {"client": CLIENT, "message": "m-1", "prev": event_id}
    assert run_field(r, run_id, "status") == "running"
    assert run_field(r, run_id, "owner") == run.owner


def test_claim_of_a_missing_or_finished_run_is_none(streams: Streams, runs: RunStore) -> None:
    assert runs.claim("r" + "0" * 32 + ".acme", 0) is None
    run_id, _ = new_run(streams)
    assert runs.finalize(run_id, "ok")
    assert runs.claim(run_id, 0) is None


def test_a_new_claim_fences_the_earlier_owner(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, _ = new_run(streams)
    first = runs.claim(run_id, 0)
    second = runs.claim(run_id, 0)
    assert first is not None and second is not None
    assert first.owner != second.owner
    assert second.attempt == first.attempt + 1
    with pytest.raises(Fenced):
        runs.append_delta(first, "stale")
    with pytest.raises(Fenced):
        runs.finalize(run_id, "ok", owner=first.owner)
    assert of_kind(log_events(r, "room"), "reply.delta") == []
    runs.append_delta(second, "fresh")
    assert runs.finalize(run_id, "ok", owner=second.owner, run=second)
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["text"] == "fresh"


def test_append_only_at_the_current_offset(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, _ = new_run(streams)
    run = runs.claim(run_id, 0)
    assert run is not None
    runs.append_delta(run, "ab")
    for emitted in (0, 1, 3, 10):
        with pytest.raises(Fenced):
            runs.append_delta(dataclasses.replace(run, emitted=emitted), "x")
    assert run.emitted == 2
    assert run_field(r, run_id, "emitted") == "2"
    assert [event["data"]["text"] for event in of_kind(log_events(r, "room"), "reply.delta")] == [
        "ab"
    ]
    runs.append_delta(run, "c")
    assert runs.text_of(run_id) == "abc"


def test_deltas_are_contiguous_and_done_carries_their_concatenation(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, event_id = new_run(streams)
    run = runs.claim(run_id, 0)
    assert run is not None
    seqs = [runs.append_delta(run, piece) for piece in PIECES]
    assert seqs == list(range(2, 2 + len(PIECES)))
    assert runs.finalize(run_id, "ok", {"tokens": 7}, owner=run.owner, run=run)

    events = log_events(r, "room")
    deltas = of_kind(events, "reply.delta")
    offsets, total = [], 0
    for piece in PIECES:
        offsets.append(total)
        total += len(piece)
    assert [delta["data"]["offset"] for delta in deltas] == offsets
    assert [delta["data"]["text"] for delta in deltas] == PIECES
    assert all(delta["data"]["run"] == run_id for delta in deltas)
    assert all(delta["from"] == "agent:echo" for delta in deltas)
    assert all(delta["cause"]["prev"] == event_id for delta in deltas)

    [done] = of_kind(events, "reply.done")
    assert done["seq"] == events[-1]["seq"] == 2 + len(PIECES)
    assert done["data"] == {
        "run": run_id,
        "status": "ok",
        "text": "".join(PIECES),
        "detail": {"tokens": 7},
    }
    assert done["cause"] == {"client": CLIENT, "message": "m-1", "prev": event_id}
    assert runs.text_of(run_id) == "".join(PIECES)
    assert run_field(r, run_id, "status") == "done"
    assert run_field(r, run_id, "final_status") == "ok"
    assert run_field(r, run_id, "done_seq") == str(done["seq"])
    assert r.zscore(keys.run_deadlines(keys.tenant_of_run(run_id)), run_id) is None


def test_done_without_deltas_has_empty_text(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, _ = new_run(streams)
    assert runs.finalize(run_id, "cancelled", {"reason": "cancelled by client"})
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["text"] == ""
    assert done["data"]["status"] == "cancelled"
    assert runs.text_of(run_id) == ""


def test_finalize_writes_one_done_however_often_called(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, _ = new_run(streams)
    run = runs.claim(run_id, 0)
    assert run is not None
    runs.append_delta(run, "text")
    assert runs.finalize(run_id, "ok", owner=run.owner, run=run) is True
    assert runs.finalize(run_id, "ok", owner=run.owner, run=run) is False
    assert runs.finalize(run_id, "failed", {"reason": "deadline"}) is False  # the sweeper
    [done] = of_kind(log_events(r, "room"), "reply.done")
    assert done["data"]["status"] == "ok"
    assert run_field(r, run_id, "final_status") == "ok"


def test_concurrent_finalizes_write_one_done(
    streams: Streams, store_redis_url: str, r: redis.Redis
) -> None:
    """A worker and the sweeper (or two redelivered workers) finishing the same run at once."""
    rounds = 15
    run_ids = [new_run(streams, f"text {index}", f"m-{index}")[0] for index in range(rounds)]
    stores = [RunStore(redis.Redis.from_url(store_redis_url)) for _ in range(2)]
    claimed = [stores[0].claim(run_id, 0) for run_id in run_ids]
    for run in claimed:
        assert run is not None
        stores[0].append_delta(run, f'"{run.text}" ✓')
    wins: list[list[bool]] = [[] for _ in range(rounds)]

    def finish(worker: int) -> None:
        for index, run in enumerate(claimed):
            assert run is not None
            barrier.wait()
            owner = run.owner if worker == 0 else ""  # worker 1 plays the sweeper
            status = "ok" if worker == 0 else "failed"
            wins[index].append(stores[worker].finalize(run.run_id, status, owner=owner))

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=finish, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    for store in stores:
        store.client.close()

    assert all(sorted(round_wins) == [False, True] for round_wins in wins)
    dones = of_kind(log_events(r, "room"), "reply.done")
    assert sorted(done["data"]["run"] for done in dones) == sorted(run_ids)
    texts = {run.run_id: f'"{run.text}" ✓' for run in claimed if run is not None}
    assert all(done["data"]["text"] == texts[done["data"]["run"]] for done in dones)
    seqs = [event["seq"] for event in log_events(r, "room")]
    assert seqs == list(range(1, len(seqs) + 1))


def test_deltas_after_finalize_raise_run_finished(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id, _ = new_run(streams)
    run = runs.claim(run_id, 0)
    assert run is not None
    runs.append_delta(run, "before")
    assert runs.finalize(run_id, "failed", {"reason": "deadline"})  # the sweeper ends it
    with pytest.raises(RunFinished):
        runs.append_delta(run, " after")
    assert runs.text_of(run_id) == "before"
    assert len(of_kind(log_events(r, "room"), "reply.delta")) == 1


def test_finalize_of_an_unknown_run_cleans_its_deadline(runs: RunStore, r: redis.Redis) -> None:
    expired = "r" + "e" * 32 + ".acme"
    r.zadd(keys.run_deadlines("acme"), {expired: 1.0})
    assert runs.finalize(expired, "failed") is False
    assert r.zscore(keys.run_deadlines("acme"), expired) is None
    assert runs.overdue("acme", time.time()) == []


def test_overdue_lists_runs_past_their_deadline(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_ids = [new_run(streams, message_id=f"m-{index}")[0] for index in range(3)]
    deadlines = {
        run_id: r.zscore(keys.run_deadlines(keys.tenant_of_run(run_id)), run_id)
        for run_id in run_ids
    }
    assert all(deadlines.values())
    latest = max(deadlines.values())  # type: ignore[type-var]
    assert runs.overdue("acme", time.time()) == []
    assert sorted(runs.overdue("acme", latest)) == sorted(run_ids)  # type: ignore[arg-type]
    assert len(runs.overdue("acme", latest, limit=2)) == 2  # type: ignore[arg-type]
    runs.finalize(run_ids[0], "ok")
    assert sorted(runs.overdue("acme", latest)) == sorted(run_ids[1:])  # type: ignore[arg-type]
