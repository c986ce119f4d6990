"""Tenants: who may connect, with which secret, under which limits."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

TENANT_SLUG_PATTERN = r"\A[a-z0-9][a-z0-9_-]{0,62}\Z"


def new_signing_secret() -> str:
    return secrets.token_urlsafe(32)


class Tenant(models.Model):
    slug = models.CharField(
        max_length=63,
        unique=True,
        validators=[RegexValidator(TENANT_SLUG_PATTERN, "lowercase letters, digits, - and _")],
    )
    name = models.CharField(max_length=200, blank=True)
    signing_secret = models.CharField(max_length=200, default=new_signing_secret)
    enabled = models.BooleanField(default=True)
    max_frame_bytes = models.PositiveIntegerField(
        default=settings.SWITCHBOARD["MAX_FRAME_BYTES"],
        help_text="Largest client frame accepted; larger ones get too_large.",
    )
    stream_retention = models.PositiveIntegerField(
        default=settings.SWITCHBOARD["STREAM_RETENTION"],
        help_text="Events kept per stream for resume; older ones answer history_expired.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def limits(self) -> dict[str, int]:
        return {"max_frame_bytes": self.max_frame_bytes, "stream_retention": self.stream_retention}
