"""Conversation history and recent problems (FINALIZE_RUN, history/persist.py) on a real
Redis and the test database."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.db import DataError

from agents import Agent, Step
from history import persist as persister
from history.models import HistoryEntry
from history.tasks import persist_history
from orchestration.sweeping import sweep_overdue_runs
from streams import keys
from streams.records import parse_ts
from streams.runs import RunStore
from tenants.models import Tenant
from tests.store.conftest import TENANT, Streams, execute_step, log_events, of_kind

pytestmark = pytest.mark.django_db

ROOM = "room"


@pytest.fixture
def tenant() -> Tenant:
    return Tenant.objects.create(slug=TENANT)


def finished(
    streams: Streams, runs: RunStore, text: str = "hello there", stream: str = ROOM, **options: Any
) -> str:
    """A client's message, answered by the echo agent through a worker's step."""
    appended = streams.send(stream, f"m-{time.monotonic_ns()}", text, options=options)
    assert appended.run_id is not None
    execute_step(runs, appended.run_id, 0, 0)
    return appended.run_id


def rows(**filters: Any) -> list[tuple[Any, ...]]:
    return list(
        HistoryEntry.objects.filter(**filters)
        .order_by("stream", "seq")
        .values_list("stream", "seq", "kind", "sender", "run_id", "status", "text")
    )


def outbox(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(item) for item in r.lrange(keys.history_outbox(TENANT), 0, -1)]


def take_batch(r: redis.Redis, count: int = 500) -> list[bytes]:
    """What a persister does before it inserts: the batch moves to the processing list."""
    return persister.take_batch(r, count, TENANT)


def test_a_finished_run_is_persisted_as_its_message_and_reply(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    text = 'Say "héllo" \\ 中文 🎉'
    run_id = finished(streams, runs, text, chunks=3)
    [record] = outbox(r)
    events = log_events(r, ROOM)
    [message] = of_kind(events, "message")
    [done] = of_kind(events, "reply.done")
    assert (record["run"], record["status"]) == (run_id, "ok")
    assert (record["message_seq"], record["done_seq"]) == (message["seq"], done["seq"])

    assert persister.persist(r) == 1
    assert rows() == [
        (ROOM, message["seq"], "message", "client:alice", run_id, "", text),
        (ROOM, done["seq"], "reply.done", "agent:echo", run_id, "ok", text),
    ]
    stored = {entry.kind: entry for entry in HistoryEntry.objects.all()}
    assert stored["message"].event_id == message["id"]
    assert stored["message"].created_at == parse_ts(message["ts"])
    assert stored["reply.done"].event_id == done["id"]
    assert stored["reply.done"].created_at == parse_ts(done["ts"])
    assert stored["reply.done"].tenant == tenant
    assert r.llen(keys.history_outbox(TENANT)) == 0 and not r.exists(
        keys.history_processing(TENANT)
    )
    # Nothing left: a second pass adds nothing.
    assert persister.persist(r) == 0
    assert HistoryEntry.objects.count() == 2


def test_a_batch_taken_but_never_inserted_is_inserted_by_the_next_persister(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    first, second = finished(streams, runs, "one"), finished(streams, runs, "two")
    assert len(take_batch(r)) == 2  # ...and the persister dies here
    third = finished(streams, runs, "three")
    assert r.llen(keys.history_outbox(TENANT)) == 1

    assert persister.persist(r) == 3
    assert {run for (*_, run, _, _) in rows()} == {first, second, third}
    assert HistoryEntry.objects.count() == 6
    assert r.llen(keys.history_outbox(TENANT)) == 0 and not r.exists(
        keys.history_processing(TENANT)
    )


def test_a_batch_inserted_again_after_a_crash_adds_nothing(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finished(streams, runs, "one")
    finished(streams, runs, "two")
    batch = take_batch(r)
    persister.store_batch(r, batch)  # inserted; the persister dies before dropping the batch
    before = rows()
    assert len(before) == 4

    assert persister.persist(r) == 2  # the batch again
    assert rows() == before
    assert not r.exists(keys.history_processing(TENANT))


def test_the_beat_task_persists(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finished(streams, runs)
    assert persist_history() == 1
    assert HistoryEntry.objects.count() == 2


def test_persisters_take_turns(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finished(streams, runs)
    held = r.lock(keys.HISTORY_LOCK, timeout=60)
    assert held.acquire(blocking=False)
    assert persister.persist(r) == 0
    assert r.llen(keys.history_outbox(TENANT)) == 1
    held.release()
    assert persister.persist(r) == 1


def test_many_runs_are_persisted_in_batches(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_ids = [finished(streams, runs, f"message {index}") for index in range(5)]
    assert persister.persist(r, batch_size=2) == 5
    assert {run for (*_, run, _, _) in rows()} == set(run_ids)
    assert HistoryEntry.objects.count() == 10


def test_events_trimmed_from_the_log_are_rebuilt_from_the_run(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = finished(streams, runs, "gone soon")
    [message] = of_kind(log_events(r, ROOM), "message")
    [done] = of_kind(log_events(r, ROOM), "reply.done")
    r.delete(keys.stream_log(TENANT, ROOM))  # a busy stream's retention trimmed them

    assert persister.persist(r) == 1
    assert rows() == [
        (ROOM, message["seq"], "message", "client:alice", run_id, "", "gone soon"),
        (ROOM, done["seq"], "reply.done", "agent:echo", run_id, "ok", "gone soon"),
    ]
    reply = HistoryEntry.objects.get(kind="reply.done")
    assert (reply.event_id, reply.created_at) == (done["id"], parse_ts(done["ts"]))
    assert HistoryEntry.objects.get(kind="message").event_id == message["id"]


def test_events_gone_from_the_log_and_the_run_are_skipped_with_a_log_line(
    tenant: Tenant,
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_id = finished(streams, runs)
    kept = finished(streams, runs, "kept", stream="other")
    r.delete(keys.stream_log(TENANT, ROOM), keys.run(run_id), keys.run_text(run_id))
    with caplog.at_level(logging.WARNING, logger="history.persist"):
        assert persister.persist(r) == 2
    assert {run for (*_, run, _, _) in rows()} == {kept}
    assert sum("history lost" in line and run_id in line for line in caplog.messages) == 2


def test_a_run_without_a_client_message_has_only_its_reply(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    appended = streams.send(ROOM, "m1", "hi")
    assert appended.run_id is not None
    # As a run started by a trigger (START_TRIGGERED_RUN) has no message_seq.
    r.hdel(keys.run(appended.run_id), "message_seq")
    execute_step(runs, appended.run_id, 0, 0)
    assert outbox(r)[0]["message_seq"] is None
    persister.persist(r)
    assert [kind for (_, _, kind, *_) in rows()] == ["reply.done"]


def test_a_row_the_database_refuses_does_not_hold_the_batch_up(
    tenant: Tenant,
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept = finished(streams, runs, "fine")
    finished(streams, runs, "poison")
    manager = HistoryEntry.objects
    insert = manager.bulk_create

    def picky(rows: list[HistoryEntry], *args: Any, **kwargs: Any) -> list[HistoryEntry]:
        if any(row.text == "poison" for row in rows):
            raise DataError("value refused")
        return insert(rows, *args, **kwargs)

    monkeypatch.setattr(manager, "bulk_create", picky)
    with caplog.at_level(logging.ERROR, logger="history.persist"):
        assert persister.persist(r) == 2
    assert {run for (*_, run, _, _) in rows()} == {kept}
    assert any("history row refused" in line for line in caplog.messages)
    assert not r.exists(keys.history_processing(TENANT))


def test_nul_characters_are_left_out(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finished(streams, runs, "nul\x00here")  # valid JSON; PostgreSQL text refuses it
    persister.persist(r)
    assert set(HistoryEntry.objects.values_list("text", flat=True)) == {"nulhere"}


def test_runs_of_a_deleted_tenant_are_skipped(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finished(streams, runs)  # no Tenant row for "acme"
    assert persister.persist(r) == 1
    assert HistoryEntry.objects.count() == 0
    assert r.llen(keys.history_outbox(TENANT)) == 0


def test_the_outbox_cap_drops_the_oldest_and_counts_them(
    tenant: Tenant,
    streams: Streams,
    runs: RunStore,
    r: redis.Redis,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "HISTORY_OUTBOX_MAX": 2}
    oldest, *newest = [finished(streams, runs, f"message {index}") for index in range(3)]
    assert [record["run"] for record in outbox(r)] == newest[::-1]
    assert persister.outbox_status(r) == persister.OutboxStatus(2, 0, 1)
    with caplog.at_level(logging.WARNING, logger="history.persist"):
        assert persister.persist(r) == 2
    assert any("history outbox overflowed: 1" in line for line in caplog.messages)
    assert {run for (*_, run, _, _) in rows()} == set(newest)


def test_no_outbox_when_history_is_off(
    streams: Streams, runs: RunStore, r: redis.Redis, settings: Any
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "HISTORY_OUTBOX_MAX": 0}
    finished(streams, runs)
    assert of_kind(log_events(r, ROOM), "reply.done")
    assert not r.exists(keys.history_outbox(TENANT))


def test_failed_and_degraded_runs_are_listed_with_their_reason(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    late = register_agent("late", Step(backend="simulated", fallback_text="late"), deadline_s=0)
    ok = finished(streams, runs)
    degraded = streams.send(ROOM, "m-late", "hi", agent=late.name).run_id
    assert degraded is not None
    execute_step(runs, degraded, 0, 0)  # no time left: the fallback, degraded
    overdue = streams.send(ROOM, "m-overdue", "hi").run_id
    assert sweep_overdue_runs(runs, now=time.time() + 60) == 1  # failed: deadline
    cancelled = streams.send(ROOM, "m-cancel", "hi").run_id
    assert cancelled is not None
    assert runs.finalize(cancelled, "cancelled", {"reason": "cancelled by client"})
    # A finalize that loses (the run already has its reply.done) lists nothing.
    assert not runs.finalize(degraded, "failed", {"reason": "deadline"})

    problems = [json.loads(item) for item in r.lrange(keys.recent_problems(TENANT), 0, -1)]
    assert [(p["run"], p["status"], p["reason"]) for p in problems] == [
        (overdue, "failed", "deadline"),  # newest first
        (degraded, "degraded", "deadline"),
    ]
    assert {p["run"] for p in problems}.isdisjoint({ok, cancelled})
    latest = problems[0]
    assert (latest["tenant"], latest["stream"], latest["agent"]) == (TENANT, ROOM, "echo")
    [done] = [e for e in of_kind(log_events(r, ROOM), "reply.done") if e["data"]["run"] == overdue]
    assert latest["at"] == done["ts"]


def test_recent_problems_are_capped(
    streams: Streams, runs: RunStore, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams import runs as runs_module

    monkeypatch.setattr(runs_module, "RECENT_PROBLEMS_MAX", 2)
    failed = [streams.send(ROOM, f"m{index}", "hi").run_id for index in range(3)]
    for run_id in failed:
        assert run_id is not None
        assert runs.finalize(run_id, "failed", {"reason": "worker_lost"})
    listed = [json.loads(item)["run"] for item in r.lrange(keys.recent_problems(TENANT), 0, -1)]
    assert listed == failed[:0:-1]


def test_purge_deletes_what_is_older_than_the_retention(tenant: Tenant) -> None:
    now = datetime(2026, 6, 30, 12, tzinfo=UTC)

    def entry(seq: int, age: timedelta) -> HistoryEntry:
        return HistoryEntry(
            tenant=tenant,
            stream=ROOM,
            seq=seq,
            kind="message",
            sender="client:alice",
            run_id=f"r{seq}",
            text="x",
            created_at=now - age,
        )

    HistoryEntry.objects.bulk_create(
        [
            entry(1, timedelta(days=45)),
            entry(2, timedelta(days=30, seconds=1)),
            entry(3, timedelta(days=29, hours=23)),
            entry(4, timedelta(0)),
        ]
    )
    assert persister.purge(retention_days=0, now=now) == 0  # kept forever
    assert HistoryEntry.objects.count() == 4
    assert persister.purge(retention_days=30, now=now) == 2
    assert sorted(HistoryEntry.objects.values_list("seq", flat=True)) == [3, 4]
    assert persister.purge(retention_days=30, now=now) == 0


def test_purge_reads_the_retention_setting(tenant: Tenant, settings: Any) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "HISTORY_RETENTION_DAYS": 1}
    HistoryEntry.objects.create(
        tenant=tenant,
        stream=ROOM,
        seq=1,
        kind="message",
        sender="client:alice",
        run_id="r1",
        created_at=datetime.now(UTC) - timedelta(days=2),
    )
    assert persister.purge() == 1


def restarted(streams: Streams, runs: RunStore, r: redis.Redis) -> str:
    """A run that streamed "lorem lo", had its text reset (as a `reply.restart` voids it:
    the stored text emptied and the offset back to 0) and then answered "ipsum dolor"."""
    appended = streams.send(ROOM, f"m-{time.monotonic_ns()}", "hi")
    assert appended.run_id is not None
    run = runs.claim(appended.run_id, 0)
    assert run is not None
    runs.append_delta(run, "lorem ")
    runs.append_delta(run, "lo")
    r.delete(keys.run_text(run.run_id))
    r.hset(keys.run(run.run_id), "emitted", 0)
    run.emitted = 0
    runs.append_delta(run, "ipsum ")
    runs.append_delta(run, "dolor")
    assert runs.finalize(run.run_id, "ok", owner=run.owner, run=run)
    return run.run_id


@pytest.mark.parametrize("log_trimmed", [False, True], ids=["from the log", "from the run"])
def test_a_reset_run_text_is_what_the_history_keeps(
    tenant: Tenant, streams: Streams, runs: RunStore, r: redis.Redis, log_trimmed: bool
) -> None:
    run_id = restarted(streams, runs, r)
    [done] = of_kind(log_events(r, ROOM), "reply.done")
    assert done["data"]["text"] == "ipsum dolor"
    if log_trimmed:
        r.delete(keys.stream_log(TENANT, ROOM))
    assert persister.persist(r) == 1
    assert HistoryEntry.objects.get(kind="reply.done", run_id=run_id).text == "ipsum dolor"
