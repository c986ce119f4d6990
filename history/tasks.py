"""Celery tasks of the conversation history: thin wrappers around history/persist.py.

Both run on the maintenance queue (project/celery.py), scheduled by beat (settings).
"""

from __future__ import annotations

from celery import shared_task

from history import persist
from streams.enqueue import HISTORY_PERSIST_TASK, HISTORY_PURGE_TASK
from streams.redis_clients import sync_client

# A batch of 500 runs is two Redis round trips and one bulk insert: a call of up to
# persist.MAX_BATCHES batches ends long before these; persist.LOCK_S outlasts the hard one.
PERSIST_SOFT_LIMIT_S = 50
PERSIST_HARD_LIMIT_S = 60
assert persist.LOCK_S > PERSIST_HARD_LIMIT_S


@shared_task(
    name=HISTORY_PERSIST_TASK,
    ignore_result=True,
    soft_time_limit=PERSIST_SOFT_LIMIT_S,
    time_limit=PERSIST_HARD_LIMIT_S,
)
def persist_history() -> int:
    """Move finished runs from the Redis outbox into the history tables."""
    return persist.persist(sync_client())


@shared_task(
    name=HISTORY_PURGE_TASK,
    ignore_result=True,
    soft_time_limit=600,
    time_limit=660,
)
def purge_history() -> int:
    """Delete history older than SWITCHBOARD_HISTORY_RETENTION_DAYS (0: keep it all)."""
    return persist.purge()
