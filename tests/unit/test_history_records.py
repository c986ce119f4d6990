"""streams/records.py: the outbox and recent-problems formats and turning events into rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from streams.events import event_parts, json_fragment
from streams.records import (
    Entry,
    OutboxRecord,
    entry_from_event,
    message_from_run,
    model_of,
    outbox_head,
    parse_outbox_record,
    problem_entry,
    reason_of,
    reply_from_run,
    retention_cutoff,
)
from streams.usage import Usage

AT = "2026-03-04T05:06:07.890Z"
AT_DT = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)


def closed(head: str, message_seq: str, done_seq: int) -> str:
    """What FINALIZE_RUN makes of the head (see streams/lua/finalize_run.lua)."""
    return head + ',"message_seq":' + message_seq + ',"done_seq":' + str(done_seq) + "}"


def record(message_seq: int | None = 3, done_seq: int = 9, **changes: str) -> OutboxRecord:
    fields = {
        "tenant": "acme",
        "stream": "room/1",
        "run": "r1",
        "status": "ok",
        "event": "e9",
        "at": AT,
        "reason": "",
    }
    fields.update(changes)
    return OutboxRecord(message_seq=message_seq, done_seq=done_seq, **fields)


def event(seq: int, kind: str, sender: str, data: object, event_id: str = "ev") -> str:
    prefix, suffix = event_parts(
        stream="room/1",
        event_id=event_id,
        kind=kind,
        sender=sender,
        cause={"client": "alice", "message": "m1", "prev": None},
        data=data,
        ts=AT,
    )
    return prefix + str(seq) + suffix


def test_the_outbox_record_round_trips_through_the_scripts_closing() -> None:
    head = outbox_head('ac"me', "room/1", "r1", "degraded", "e9", AT, "deadline")
    assert parse_outbox_record(closed(head, "3", 9)) == record(
        tenant='ac"me', status="degraded", reason="deadline"
    )
    # A triggered run has no client message: the script writes null.
    assert parse_outbox_record(closed(head, "null", 9)).message_seq is None


@pytest.mark.parametrize("raw", ["", "{", '{"tenant":"a"}', '{"done_seq":"x"}', "[]"])
def test_a_malformed_record_raises(raw: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_outbox_record(raw)


def test_reason_of_a_detail() -> None:
    assert reason_of({"reason": "deadline", "step": "draft"}) == "deadline"
    assert reason_of(None) == ""
    assert reason_of({"tokens": 7}) == ""
    assert reason_of("odd") == "odd"
    # A degraded reply's words for people, when they say more than the code.
    detail = {"reason": "model_error", "message": "model not configured"}
    assert reason_of(detail) == "model_error: model not configured"
    assert reason_of({"reason": "timeout", "message": "timeout"}) == "timeout"
    assert reason_of({"reason": "model_error", "message": "model error"}) == "model_error"
    assert len(reason_of({"reason": "x", "message": "m" * 300})) == 100


@pytest.mark.parametrize("status", ["failed", "degraded"])
def test_failed_and_degraded_runs_are_problems(status: str) -> None:
    entry = problem_entry(
        run_id="r1",
        tenant="acme",
        stream="room",
        agent="echo",
        status=status,
        detail={"reason": "rate_limited", "step": "draft"},
        at=AT,
    )
    assert json.loads(entry) == {
        "run": "r1",
        "tenant": "acme",
        "stream": "room",
        "agent": "echo",
        "status": status,
        "reason": "rate_limited",
        "at": AT,
        "step": "draft",
    }


@pytest.mark.parametrize("status", ["ok", "cancelled"])
def test_ok_and_cancelled_runs_are_not(status: str) -> None:
    entry = problem_entry(
        run_id="r1",
        tenant="acme",
        stream="room",
        agent="echo",
        status=status,
        detail={"reason": "cancelled by client"},
        at=AT,
    )
    assert entry == ""


def test_a_message_event_becomes_a_message_row() -> None:
    text = 'héllo "there"\n中文'
    raw = event(3, "message", "client:alice", {"text": text, "agent": "echo"}, "em")
    assert entry_from_event(record(), raw) == Entry(
        tenant="acme",
        stream="room/1",
        seq=3,
        kind="message",
        sender="client:alice",
        run_id="r1",
        event_id="em",
        status="",
        reason="",
        text=text,
        created_at=AT_DT,
    )


def test_a_reply_done_becomes_a_reply_row_with_status_and_reason() -> None:
    data = {"run": "r1", "status": "degraded", "text": "sorry", "detail": {"reason": "deadline"}}
    raw = event(9, "reply.done", "agent:echo", data, "ed").encode()
    entry = entry_from_event(record(), raw)
    assert (entry.seq, entry.kind, entry.sender, entry.event_id) == (
        9,
        "reply.done",
        "agent:echo",
        "ed",
    )
    assert (entry.status, entry.reason, entry.text) == ("degraded", "deadline", "sorry")


def test_trimmed_events_are_rebuilt_from_the_run() -> None:
    run = {
        "text": "hi",
        "client": "alice",
        "agent": "echo",
        "message_event": "em",
        "created": "1772600000.250",
    }
    message = message_from_run(record(), run)
    assert message is not None
    assert (message.seq, message.kind, message.sender, message.text) == (
        3,
        "message",
        "client:alice",
        "hi",
    )
    assert message.created_at == datetime.fromtimestamp(1772600000.25, UTC)
    reply = reply_from_run(record(status="failed", reason="deadline"), run, json_fragment('a "b"'))
    assert reply is not None
    assert (reply.seq, reply.kind, reply.sender, reply.event_id) == (
        9,
        "reply.done",
        "agent:echo",
        "e9",
    )
    assert (reply.status, reply.reason, reply.text, reply.created_at) == (
        "failed",
        "deadline",
        'a "b"',
        AT_DT,
    )


def test_nothing_is_rebuilt_without_the_run() -> None:
    assert message_from_run(record(), {}) is None
    assert reply_from_run(record(), {}, None) is None
    assert reply_from_run(record(), {"agent": "echo"}, None) is None
    # A triggered run had no message to rebuild.
    assert message_from_run(record(message_seq=None), {"text": "x"}) is None


def test_retention_cutoff() -> None:
    now = datetime(2026, 3, 31, tzinfo=UTC)
    assert retention_cutoff(now, 30) == now - timedelta(days=30)
    assert retention_cutoff(now, 0) is None


def test_the_answering_model_travels_from_the_detail_to_the_history_row() -> None:
    detail = {"model": {"backend": "anthropic", "model": "claude", "fallback": True}}
    assert model_of(detail) == "anthropic:claude"
    assert model_of({"reason": "deadline"}) == model_of(None) == model_of({"model": "x"}) == ""
    head = outbox_head("acme", "room/1", "r1", "ok", "e9", AT, "", model_of(detail))
    assert parse_outbox_record(closed(head, "3", 9)).model == "anthropic:claude"
    # A run whose reply.done named no model: the record is as before, without the field.
    plain = outbox_head("acme", "room/1", "r1", "ok", "e9", AT, "")
    assert '"model"' not in plain and parse_outbox_record(closed(plain, "3", 9)).model == ""
    done = json.dumps(
        {
            "seq": 9,
            "kind": "reply.done",
            "from": "agent:a",
            "id": "e9",
            "ts": AT,
            "data": {"run": "r1", "status": "ok", "text": "hi", "detail": detail},
        }
    )
    assert entry_from_event(record(), done).model == "anthropic:claude"


def test_a_reply_row_keeps_the_usage_its_reply_done_or_its_run_carried() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total": 17, "estimated": False}
    done = event(
        9,
        "reply.done",
        "agent:echo",
        {"run": "r1", "status": "ok", "text": "hi", "detail": {"usage": usage}},
    )
    row = entry_from_event(record(), done)
    assert (row.reason, row.usage) == ("", Usage(12, 5))
    # A reply.done without usage (a run no model call finished), and a message: none.
    bare = event(9, "reply.done", "agent:echo", {"run": "r1", "status": "ok", "text": "hi"})
    assert entry_from_event(record(), bare).usage is None
    message = event(3, "message", "client:alice", {"text": "hi", "agent": "echo"})
    assert entry_from_event(record(), message).usage is None
    # Rebuilt from the run's hash when the log no longer holds the event.
    run = {"agent": "echo", "usage_prompt": "7", "usage_completion": "2", "usage_est": "1"}
    rebuilt = reply_from_run(record(), run, json_fragment("hi"))
    assert rebuilt is not None and rebuilt.usage == Usage(7, 2, estimated=True)
