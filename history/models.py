"""Conversation history: completed messages and replies, kept in the database.

Rows are written in batches by the persister (history/persist.py) from what FINALIZE_RUN
queued, never on the per-message path: the stream logs in Redis stay the live truth, and
this is the browsable, searchable record that outlives their retention.
"""

from __future__ import annotations

from django.db import models

from tenants.models import Tenant


class HistoryEntry(models.Model):
    MESSAGE = "message"
    REPLY_DONE = "reply.done"
    KINDS = [(MESSAGE, "message"), (REPLY_DONE, "reply")]

    # No index of its own: both indexes below (and the unique constraint) start with it.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="history", db_index=False
    )
    stream = models.CharField(max_length=200)
    seq = models.BigIntegerField()
    kind = models.CharField(max_length=20, choices=KINDS)
    # "client:ID" for a message, "agent:NAME" for a reply (a client id is up to 200 chars).
    sender = models.CharField(max_length=255)
    run_id = models.CharField("run", max_length=64, db_index=True)
    event_id = models.CharField("event", max_length=64, blank=True)
    # A reply's final status (ok, degraded, failed, cancelled) and, if not ok, its reason.
    status = models.CharField(max_length=20, blank=True)
    reason = models.CharField(max_length=100, blank=True)
    # The model that answered a reply ("backend:model"), when its agent's step had
    # fallback models and so its reply.done named it (docs/agents.md, failover).
    model = models.CharField(max_length=200, blank=True)
    text = models.TextField(blank=True)
    # A reply's token usage (reply.done's detail.usage); empty for messages and for runs no
    # worker finished (cancelled before a call, ended by the sweeper).
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    tokens_estimated = models.BooleanField(
        default=False, help_text="Some of the usage was estimated: the provider reported none."
    )
    created_at = models.DateTimeField(help_text="When the event was appended to the stream.")

    class Meta:
        verbose_name = "history entry"
        verbose_name_plural = "conversation history"
        ordering = ["-created_at", "-seq"]
        constraints = [
            # One row per event: the persister may insert a batch twice (a crash after the
            # insert, before the batch is dropped) and relies on this to ignore the repeat.
            # Its index also serves reading one stream in seq order, either way.
            models.UniqueConstraint(
                fields=["tenant", "stream", "seq"], name="history_entry_unique_event"
            ),
        ]
        indexes = [
            # A tenant's newest entries first (the admin's default view of a tenant).
            models.Index(fields=["tenant", "-created_at"], name="history_tenant_created"),
            # Retention: the daily purge deletes by age.
            models.Index(fields=["created_at"], name="history_created"),
        ]

    def __str__(self) -> str:
        return f"{self.stream} #{self.seq} ({self.kind})"
