"""What a finished run leaves for the operators, as plain data (no Redis, no database).

FINALIZE_RUN (streams/lua/finalize_run.lua) writes two small records with a run's reply.done:

- an *outbox record* on its tenant's `keys.history_outbox`, which the persister (history/persist.py)
  turns into database rows: the run's message and its reply. Python builds the record's
  head (`outbox_head`); the script closes it with the two seqs only it knows, so the JSON
  is `HEAD,"message_seq":N|null,"done_seq":N}`;
- for a failed or degraded run, a *problem entry* on its tenant's `keys.recent_problems`, which the
  admin's live queue page lists (`problem_entry`).

Both sides of each format live here, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.events import dumps, text_from_fragments
from streams.reasons import degraded_message
from streams.usage import Usage, usage_from_detail, usage_of

MESSAGE = "message"
REPLY_DONE = "reply.done"
# Statuses the live queue page lists; `cancelled` is a client's choice, not a problem.
PROBLEM_STATUSES = frozenset({"failed", "degraded"})


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One finished run, as FINALIZE_RUN queued it for the persister."""

    tenant: str
    stream: str
    run: str
    status: str
    event: str  # the reply.done's event id
    at: str  # the reply.done's ts (ISO 8601, UTC)
    reason: str
    message_seq: int | None  # None: a run started by a trigger, not by a client's message
    done_seq: int
    # The model that answered ("backend:model"), when the reply.done named it (model_of).
    model: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One history row, before it meets the database (history.models.HistoryEntry)."""

    tenant: str
    stream: str
    seq: int
    kind: str
    sender: str
    run_id: str
    event_id: str
    status: str
    reason: str
    text: str
    created_at: datetime
    model: str = ""  # a reply's answering model (model_of), when its reply.done named it
    usage: Usage | None = None  # a reply's token usage, when its reply.done carried it


def outbox_head(
    tenant: str,
    stream: str,
    run_id: str,
    status: str,
    event_id: str,
    at: str,
    reason: str,
    model: str = "",
) -> str:
    """The record's JSON up to its seqs, without the closing brace (see the module doc)."""
    fields = {
        "tenant": tenant,
        "stream": stream,
        "run": run_id,
        "status": status,
        "event": event_id,
        "at": at,
        "reason": reason,
    }
    if model:
        fields["model"] = model
    return dumps(fields)[:-1]


def parse_outbox_record(raw: bytes | str) -> OutboxRecord:
    """Raises ValueError (json.JSONDecodeError included), KeyError or TypeError for a
    malformed one."""
    fields = json.loads(raw)
    if not isinstance(fields, dict):
        raise ValueError(f"an outbox record is a JSON object, not {type(fields).__name__}")
    message_seq = fields.get("message_seq")
    return OutboxRecord(
        tenant=str(fields["tenant"]),
        stream=str(fields["stream"]),
        run=str(fields["run"]),
        status=str(fields["status"]),
        event=str(fields.get("event") or ""),
        at=str(fields.get("at") or ""),
        reason=str(fields.get("reason") or ""),
        message_seq=int(message_seq) if message_seq is not None else None,
        done_seq=int(fields["done_seq"]),
        model=str(fields.get("model") or ""),
    )


# The history's reason column holds this many characters.
REASON_MAX_CHARS = 100


def reason_of(detail: Any) -> str:
    """The short reason a reply.done's `detail` gives (`{"reason": "deadline", ...}`),
    with its words for people when they say more than the code's usual ones
    ("model_error: model not configured")."""
    if isinstance(detail, Mapping):
        reason = str(detail.get("reason") or "")
        message = str(detail.get("message") or "")
        if message and message != degraded_message(reason):
            reason = f"{reason}: {message}" if reason else message
        return reason[:REASON_MAX_CHARS]
    return "" if detail is None else str(detail)[:REASON_MAX_CHARS]


# The history's model column holds this many characters.
MODEL_MAX_CHARS = 200


def model_of(detail: Any) -> str:
    """The model a reply.done's `detail.model` names ({"backend", "model", ...}) as
    "backend:model", or "" when it names none (agents without fallback models)."""
    if not isinstance(detail, Mapping):
        return ""
    model = detail.get("model")
    if not isinstance(model, Mapping):
        return ""
    return f"{model.get('backend') or ''}:{model.get('model') or ''}"[:MODEL_MAX_CHARS]


def problem_entry(
    *,
    run_id: str,
    tenant: str,
    stream: str,
    agent: str,
    status: str,
    detail: Any,
    at: str,
) -> str:
    """The recent-problems entry of a finished run, or "" when its status is no problem."""
    if status not in PROBLEM_STATUSES:
        return ""
    entry = {
        "run": run_id,
        "tenant": tenant,
        "stream": stream,
        "agent": agent,
        "status": status,
        "reason": reason_of(detail),
        "at": at,
    }
    if isinstance(detail, Mapping) and detail.get("step"):
        entry["step"] = str(detail["step"])  # which step of a chain gave up
    return dumps(entry)


def parse_ts(ts: str) -> datetime:
    """An event's ts ("2026-01-02T03:04:05.678Z") as an aware datetime."""
    parsed = datetime.fromisoformat(ts)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def entry_from_event(record: OutboxRecord, event_json: str | bytes) -> Entry:
    """A history row from an event as the stream log holds it (a message or a reply.done)."""
    event = json.loads(event_json)
    data = event.get("data") or {}
    kind = event["kind"]
    usage = None
    if kind == REPLY_DONE:
        status, reason = str(data.get("status") or ""), reason_of(data.get("detail"))
        model = model_of(data.get("detail"))
        usage = usage_from_detail(data.get("detail"))
    else:
        status, reason, model = "", "", ""
    return Entry(
        tenant=record.tenant,
        stream=record.stream,
        seq=int(event["seq"]),
        kind=kind,
        sender=str(event.get("from") or ""),
        run_id=record.run,
        event_id=str(event.get("id") or ""),
        status=status,
        reason=reason,
        text=str(data.get("text") or ""),
        created_at=parse_ts(event["ts"]),
        model=model,
        usage=usage,
    )


def message_from_run(record: OutboxRecord, run: Mapping[str, str]) -> Entry | None:
    """The message row rebuilt from the run's hash, for a message the log no longer holds;
    None when the hash is gone too (or the run had no client message)."""
    if record.message_seq is None or "text" not in run:
        return None
    created = run.get("created")
    return Entry(
        tenant=record.tenant,
        stream=record.stream,
        seq=record.message_seq,
        kind=MESSAGE,
        sender=f"client:{run.get('client', '')}",
        run_id=record.run,
        event_id=run.get("message_event", ""),
        status="",
        reason="",
        text=run["text"],
        created_at=(
            datetime.fromtimestamp(float(created), UTC) if created else parse_ts(record.at)
        ),
    )


def reply_from_run(
    record: OutboxRecord, run: Mapping[str, str], reply_fragments: str | None
) -> Entry | None:
    """The reply.done row rebuilt from the run's hash and text (the text the event carried:
    FINALIZE_RUN splices exactly that key's value in); None when they are gone."""
    if reply_fragments is None or "agent" not in run:
        return None
    return Entry(
        tenant=record.tenant,
        stream=record.stream,
        seq=record.done_seq,
        kind=REPLY_DONE,
        sender=f"agent:{run['agent']}",
        run_id=record.run,
        event_id=record.event,
        status=record.status,
        reason=record.reason,
        text=text_from_fragments(reply_fragments),
        created_at=parse_ts(record.at),
        model=record.model,
        usage=usage_of(run),
    )


def retention_cutoff(now: datetime, retention_days: int) -> datetime | None:
    """Rows created before this are purged; None keeps everything (retention 0)."""
    if retention_days <= 0:
        return None
    return now - timedelta(days=retention_days)
