"""The history persister and purge: Redis and the database at the edges of records.py.

FINALIZE_RUN pushes one outbox record per finished run on its tenant's outbox
(keys.history_outbox, newest first; per tenant so that FINALIZE_RUN stays in the tenant's
hash slot on a Redis Cluster). `persist` visits the registered tenants (streams/registry.py)
and moves a batch of each one's oldest records onto its keys.history_processing (one script:
nothing is ever only in Python's memory), reads each run's message and reply.done from
the stream log, inserts the rows and only then deletes the processing list. A persister
that dies anywhere in between leaves the batch there, and the next one inserts it again:
the rows' unique (tenant, stream, seq) makes the repeat a no-op. One persister at a time
(a Redis lock); beat schedules it every SWITCHBOARD_HISTORY_FLUSH_S.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from django.db import DataError, IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import LockError

from history.models import HistoryEntry
from project.conf import conf
from streams import keys, scripts
from streams.records import (
    MESSAGE,
    REPLY_DONE,
    Entry,
    OutboxRecord,
    entry_from_event,
    message_from_run,
    parse_outbox_record,
    reply_from_run,
    retention_cutoff,
)
from streams.registry import tenants as registered_tenants
from tenants.models import Tenant

logger = logging.getLogger(__name__)

# Longer than the persist task's hard time limit (history/tasks.py): the lock outlives a
# persister only if it was killed, and then the next one waits at most this long.
LOCK_S = 70
# Batches per call: a backlog drains at up to this many batches per flush interval, and
# a call stays well inside its time limit.
MAX_BATCHES = 20
# Rows the purge deletes per statement: short transactions on a big table.
PURGE_CHUNK = 5_000
# TAKE_HISTORY_BATCH (streams/lua/take_history_batch.lua) unpacks the batch onto Lua's
# stack, which holds about 8,000 values.
MAX_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """For the admin and the logs: what waits, and what the cap has discarded so far."""

    waiting: int
    processing: int
    dropped: int


def outbox_status(client: redis.Redis) -> OutboxStatus:
    """Summed over the registered tenants."""
    slugs = registered_tenants(client)
    if not slugs:
        return OutboxStatus(0, 0, 0)
    pipe = client.pipeline(transaction=False)
    for slug in slugs:
        pipe.llen(keys.history_outbox(slug))
        pipe.llen(keys.history_processing(slug))
        pipe.get(keys.history_dropped(slug))
    answers = pipe.execute()
    return OutboxStatus(
        sum(int(value) for value in answers[0::3]),
        sum(int(value) for value in answers[1::3]),
        sum(int(value or 0) for value in answers[2::3]),
    )


# The dropped count this process last reported, so the warning is logged when it grows.
_dropped_seen: int | None = None


def persist(client: redis.Redis, batch_size: int | None = None) -> int:
    """Drain the outbox into the database, a batch at a time; returns the finished runs
    handled (0 too when another persister holds the lock)."""
    lock = client.lock(keys.HISTORY_LOCK, timeout=LOCK_S, blocking=False)
    if not lock.acquire():
        logger.debug("history persister skipped: another one is running")
        return 0
    try:
        _report_dropped(client)
        size = min(max(batch_size or conf().history_batch, 1), MAX_BATCH)
        handled = 0
        batches = 0
        for tenant in registered_tenants(client):
            while batches < MAX_BATCHES:
                # A batch left by a persister that died goes first: older than the outbox.
                leftover = client.lrange(keys.history_processing(tenant), 0, -1)
                raw = leftover or take_batch(client, size, tenant)
                if not raw:
                    break
                batches += 1
                store_batch(client, raw)
                client.delete(keys.history_processing(tenant))
                handled += len(raw)
                if not leftover and len(raw) < size:
                    break  # the tenant's outbox is empty
        return handled
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("history lock expired before its persister finished")


def take_batch(client: redis.Redis, count: int, tenant: str) -> list[bytes]:
    """Move the tenant's oldest `count` outbox records onto its processing list (one
    script: nothing is ever only in this process's memory); returns them, oldest first."""
    return scripts.TakeHistoryBatch(
        outbox=keys.history_outbox(tenant),
        processing=keys.history_processing(tenant),
        count=count,
    ).run(client)


def store_batch(client: redis.Redis, raw: list[bytes]) -> int:
    """Insert the rows of these outbox records (idempotent); returns the rows written or
    found already there."""
    records: list[OutboxRecord] = []
    for item in raw:
        try:
            records.append(parse_outbox_record(item))
        except (ValueError, KeyError, TypeError):
            logger.error("history outbox record unreadable, skipped: %r", item[:200])
    entries = _entries(client, records)
    if not entries:
        return 0
    tenants = dict(
        Tenant.objects.filter(slug__in={entry.tenant for entry in entries}).values_list(
            "slug", "id"
        )
    )
    rows = []
    for entry in entries:
        tenant_id = tenants.get(entry.tenant)
        if tenant_id is None:
            # Deleted since: its history went with it (the rows cascade), so none is added.
            logger.info("history skipped: no tenant tenant=%s run=%s", entry.tenant, entry.run_id)
            continue
        rows.append(
            HistoryEntry(
                tenant_id=tenant_id,
                stream=entry.stream,
                seq=entry.seq,
                kind=entry.kind,
                sender=_storable(entry.sender)[:255],
                run_id=entry.run_id[:64],
                event_id=entry.event_id[:64],
                status=entry.status[:20],
                reason=_storable(entry.reason)[:100],
                model=_storable(entry.model)[:200],
                text=_storable(entry.text),
                created_at=entry.created_at,
                **_usage_columns(entry),
            )
        )
    try:
        # ignore_conflicts: a batch inserted again after a crash adds nothing.
        HistoryEntry.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
    except (DataError, IntegrityError):
        # One row the database refuses must not hold the batch (and history) up forever:
        # the others go in one by one, and it is skipped.
        logger.exception("history batch refused; inserting its rows one by one")
        for row in rows:
            try:
                with transaction.atomic():
                    HistoryEntry.objects.bulk_create([row], ignore_conflicts=True)
            except (DataError, IntegrityError):
                logger.exception(
                    "history row refused, skipped stream=%s seq=%s run=%s",
                    row.stream,
                    row.seq,
                    row.run_id,
                )
    return len(rows)


# The columns' bound (PositiveIntegerField): a provider's count past it is stored capped.
MAX_TOKENS_STORED = 2**31 - 1


def _usage_columns(entry: Entry) -> dict[str, Any]:
    usage = entry.usage
    if usage is None:
        return {}
    return {
        "prompt_tokens": min(usage.prompt_tokens, MAX_TOKENS_STORED),
        "completion_tokens": min(usage.completion_tokens, MAX_TOKENS_STORED),
        "tokens_estimated": usage.estimated,
    }


def _storable(text: str) -> str:
    """PostgreSQL text cannot hold NUL, which JSON (so a client's message) can."""
    return text.replace("\x00", "") if "\x00" in text else text


def _entries(client: redis.Redis, records: list[OutboxRecord]) -> list[Entry]:
    """Each record's message and reply.done, from the stream log (one pipelined read) or,
    for events the log no longer holds, from the run's hash and text."""
    pipe = client.pipeline(transaction=False)
    for record in records:
        log = keys.stream_log(record.tenant, record.stream)
        for seq in (record.message_seq, record.done_seq):
            if seq is not None:
                pipe.xrange(log, min=f"{seq}-0", max=f"{seq}-0", count=1)
    found = iter(pipe.execute())
    entries: list[Entry] = []
    missing: list[tuple[OutboxRecord, bool, bool]] = []
    for record in records:
        gone = {MESSAGE: False, REPLY_DONE: False}
        for seq, kind in ((record.message_seq, MESSAGE), (record.done_seq, REPLY_DONE)):
            if seq is None:
                continue
            hit = next(found)
            if not hit:
                gone[kind] = True
                continue
            try:
                entries.append(entry_from_event(record, hit[0][1][b"e"]))
            except (ValueError, KeyError, TypeError):
                logger.exception(
                    "history event unreadable tenant=%s stream=%s seq=%s",
                    record.tenant,
                    record.stream,
                    seq,
                )
        if gone[MESSAGE] or gone[REPLY_DONE]:
            missing.append((record, gone[MESSAGE], gone[REPLY_DONE]))
    if missing:
        entries += _from_runs(client, missing)
    return entries


def _from_runs(client: redis.Redis, missing: list[tuple[OutboxRecord, bool, bool]]) -> list[Entry]:
    """Events trimmed from their log before the persister came (a stream busier than its
    retention per flush, or a persister that was down): rebuilt from the run's hash and
    text, which outlive the run by an hour; skipped, with a log line, when those are gone."""
    pipe = client.pipeline(transaction=False)
    for record, _, _ in missing:
        pipe.hgetall(keys.run(record.run))
        pipe.get(keys.run_text(record.run))
    answers = pipe.execute()
    entries: list[Entry] = []
    for index, (record, message_gone, done_gone) in enumerate(missing):
        run = {k.decode(): v.decode() for k, v in answers[2 * index].items()}
        text = answers[2 * index + 1]
        wanted: list[tuple[str, Entry | None]] = []
        if message_gone:
            wanted.append((MESSAGE, message_from_run(record, run)))
        if done_gone:
            wanted.append((REPLY_DONE, reply_from_run(record, run, text and text.decode())))
        for kind, entry in wanted:
            if entry is None:
                logger.warning(
                    "history lost: %s no longer in the log nor the run tenant=%s stream=%s run=%s",
                    kind,
                    record.tenant,
                    record.stream,
                    record.run,
                )
            else:
                entries.append(entry)
    return entries


def _report_dropped(client: redis.Redis) -> None:
    global _dropped_seen
    dropped = outbox_status(client).dropped
    if dropped and dropped != _dropped_seen:
        logger.warning(
            "history outbox overflowed: %s finished runs in all were dropped before they "
            "were persisted (SWITCHBOARD_HISTORY_OUTBOX_MAX=%s)",
            dropped,
            conf().history_outbox_max,
        )
    _dropped_seen = dropped


def purge(retention_days: int | None = None, now: datetime | None = None) -> int:
    """Delete rows older than the retention, in chunks; returns how many."""
    days = conf().history_retention_days if retention_days is None else retention_days
    cutoff = retention_cutoff(now or timezone.now(), days)
    if cutoff is None:
        return 0
    deleted = 0
    while True:
        chunk = list(
            HistoryEntry.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[
                :PURGE_CHUNK
            ]
        )
        if not chunk:
            break
        deleted += HistoryEntry.objects.filter(pk__in=chunk).delete()[0]
        if len(chunk) < PURGE_CHUNK:
            break
    if deleted:
        logger.info("history purged rows=%s older_than=%s", deleted, cutoff.isoformat())
    return deleted
