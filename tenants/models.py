"""Tenants: who may connect, with which secret, under which limits."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator, URLValidator
from django.db import models, transaction
from django.utils import timezone

from agents import MAX_FALLBACK_MODELS, check_fallbacks, fallback_from
from project.conf import conf
from tenants.config import TENANT_SLUG_PATTERN


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
    # Secret rotation (tenants/tokens.py): tokens signed with the secret the last rotation
    # replaced verify until secret_rotated_at + SWITCHBOARD_SECRET_ROTATION_GRACE_S. Set by
    # rotate_signing_secret only, so no form edits them.
    previous_signing_secret = models.CharField(max_length=200, blank=True, editable=False)
    secret_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    enabled = models.BooleanField(default=True)
    # The per-tenant bounds' defaults are the settings' when the class is made (at import):
    # migrations record a field's default as a value, and changing one is an operator's edit.
    max_frame_bytes = models.PositiveIntegerField(
        default=conf().max_frame_bytes,
        help_text="Largest client frame accepted; larger ones get too_large.",
    )
    stream_retention = models.PositiveIntegerField(
        default=conf().stream_retention,
        help_text="Events kept per stream for resume; older ones answer history_expired.",
    )
    # Flow control (issue: every bound answers 429 at once instead of queueing).
    max_connections = models.PositiveIntegerField(
        default=conf().max_connections_per_tenant,
        help_text="Open WebSocket connections for the whole tenant; past it, close 4029.",
    )
    max_connections_per_client = models.PositiveIntegerField(
        default=conf().max_connections_per_client,
        help_text="Open connections of one client id; past it, close 4029.",
    )
    max_runs_in_flight_per_connection = models.PositiveIntegerField(
        default=conf().max_runs_in_flight_per_connection,
        help_text="Runs a connection may have unfinished; past it, send answers rate_limited.",
    )
    max_queued_runs = models.PositiveIntegerField(
        default=conf().max_queued_runs_per_tenant,
        help_text="Runs of the tenant waiting for a worker; past it, send answers overloaded.",
    )
    client_messages_per_s = models.PositiveIntegerField(
        default=conf().client_messages_per_s,
        help_text="Sustained send/publish rate of one client (token bucket, all gateways).",
    )
    client_burst = models.PositiveIntegerField(
        default=conf().client_burst,
        help_text="Messages one client may send at once above its rate.",
    )
    tenant_messages_per_s = models.PositiveIntegerField(
        default=conf().tenant_messages_per_s,
        help_text="Sustained send/publish rate of the whole tenant (all gateways).",
    )
    tenant_burst = models.PositiveIntegerField(
        default=conf().tenant_burst,
        help_text="Messages the tenant may send at once above its rate.",
    )
    client_receipts_per_s = models.PositiveIntegerField(
        default=conf().client_receipts_per_s,
        help_text="Sustained receipt rate of one client (a bucket apart from its messages').",
    )
    client_receipt_burst = models.PositiveIntegerField(
        default=conf().client_receipt_burst,
        help_text="Receipts one client may send at once above that rate.",
    )
    max_subscriptions_per_connection = models.PositiveIntegerField(
        default=conf().max_subscriptions_per_connection,
        help_text=(
            "Streams one connection may be subscribed to at once (subscribe, and streams it "
            "sends to); past it, rate_limited until it unsubscribes."
        ),
    )
    max_token_lifetime_s = models.PositiveIntegerField(
        default=conf().max_token_lifetime_s,
        help_text="Longest a token may still be valid for: a later exp is refused (4001).",
    )
    fault_injection = models.BooleanField(
        default=False,
        help_text=(
            "Honour the simulated backend's fault and delay options (fail, latency_ms, "
            "chunk_delay_ms) in this tenant's sends: for rehearsals only, as stalled runs "
            "hold workers every tenant shares. SWITCHBOARD_FAULT_INJECTION turns them on "
            "for all tenants."
        ),
    )
    weight = models.PositiveIntegerField(
        default=1,
        help_text="Share of worker time when tenants compete (fair scheduling).",
    )
    # Which agents the tenant may run (issue: every tenant could run every agent in code).
    all_agents = models.BooleanField(
        default=True,
        help_text=(
            "Allow every agent defined in code; untick to allow only the agents enabled below."
        ),
    )
    # Agents triggered by other agents' events could otherwise loop forever.
    max_causal_depth = models.PositiveSmallIntegerField(
        default=conf().max_causal_depth,
        help_text=(
            "How many agent runs may follow one another by subscription (a run caused by an "
            "event of a run caused by ...). A client's own message starts depth 0; a "
            "triggered run deeper than this is refused."
        ),
    )
    # Token budgets (streams/usage.py): enforced when a send is accepted, against the
    # usage counted as model calls end; runs already accepted finish.
    daily_token_budget = models.PositiveBigIntegerField(
        default=0,
        help_text=(
            "Tokens (prompt and completion) the tenant's runs may use per UTC day; once "
            "used, send answers budget_exhausted until midnight UTC. 0: no daily budget."
        ),
    )
    monthly_token_budget = models.PositiveBigIntegerField(
        default=0,
        help_text=(
            "Tokens the tenant's runs may use per UTC calendar month; once used, send "
            "answers budget_exhausted until the month ends. 0: no monthly budget."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # The table keeps the name it had when the model lived in the gateway's app: the
        # move to this app changed no data (tenants/migrations/0001_initial.py).
        db_table = "realtime_tenant"
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def limits(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}

    def rotate_signing_secret(self) -> str:
        """Replace the signing secret with a new one (returned); the current one becomes the
        previous, accepted for SWITCHBOARD_SECRET_ROTATION_GRACE_S. Callers then tell the
        gateways (tenants.announcements.announce_tenant_change)."""
        with transaction.atomic():
            # Locked: two operators rotating at once must not both keep the same previous.
            locked = Tenant.objects.select_for_update().get(pk=self.pk)
            locked.previous_signing_secret = locked.signing_secret
            locked.signing_secret = new_signing_secret()
            locked.secret_rotated_at = timezone.now()
            locked.save(
                update_fields=[
                    "signing_secret",
                    "previous_signing_secret",
                    "secret_rotated_at",
                    "updated_at",
                ]
            )
        for name in ("signing_secret", "previous_signing_secret", "secret_rotated_at"):
            setattr(self, name, getattr(locked, name))
        self.updated_at = locked.updated_at
        return self.signing_secret

    def previous_secret_until(self) -> datetime | None:
        """When tokens signed with the previous secret stop verifying (None: no previous)."""
        if not self.previous_signing_secret or self.secret_rotated_at is None:
            return None
        grace = timedelta(seconds=conf().secret_rotation_grace_s)
        return self.secret_rotated_at + grace


# The tenant's limits: told to clients in `welcome`, cached by gateways (TenantConfig).
LIMIT_FIELDS = (
    "max_frame_bytes",
    "stream_retention",
    "max_connections",
    "max_connections_per_client",
    "max_runs_in_flight_per_connection",
    "max_queued_runs",
    "client_messages_per_s",
    "client_burst",
    "tenant_messages_per_s",
    "tenant_burst",
    "client_receipts_per_s",
    "client_receipt_burst",
    "max_subscriptions_per_connection",
)


# An environment variable name, not a value: API keys never reach the database.
ENV_NAME_PATTERN = r"\A[A-Z_][A-Z0-9_]*\Z"


def validate_fallbacks(value: object) -> None:
    """A grant's fallback list: at most MAX_FALLBACK_MODELS objects, each a backend name
    with an optional model, http(s) endpoint and key variable NAME. Whether the backend
    exists is the admin form's check (console/admin.py): backends are the workers' side,
    which this app, loaded by the gateway, does not import."""
    if not isinstance(value, list):
        raise ValidationError('a list of objects, e.g. [{"backend": "openai", "model": "..."}]')
    try:
        fallbacks = [fallback_from(entry) for entry in value]
        check_fallbacks(fallbacks)
    except (TypeError, ValueError) as error:
        raise ValidationError(str(error)) from None
    for fallback in fallbacks:
        if fallback.base_url:
            URLValidator(schemes=["http", "https"])(fallback.base_url)


class TenantAgent(models.Model):
    """One agent's enablement and overrides for one tenant. A grant decides for its agent
    whatever Tenant.all_agents says; the overrides apply to the tenant's runs only."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="agent_grants")
    # A name from the code's registry (agents); the admin offers only those.
    agent = models.CharField(max_length=100)
    enabled = models.BooleanField(default=True)
    model = models.CharField(
        max_length=200,
        blank=True,
        help_text=(
            "Model name used instead of the one in the agent's code for this tenant's runs "
            "(model-calling steps other than the simulated backend)."
        ),
    )
    api_key_env = models.CharField(
        max_length=100,
        blank=True,
        validators=[
            RegexValidator(
                ENV_NAME_PATTERN, "an environment variable name: A-Z, 0-9 and _, not a key"
            )
        ],
        help_text=(
            "NAME of the environment variable holding this tenant's API key for the model "
            "provider. The key itself is never stored."
        ),
    )
    base_url = models.URLField(
        blank=True,
        help_text=(
            "OpenAI-compatible endpoint for this tenant's calls, instead of "
            "SWITCHBOARD_OPENAI_BASE_URL."
        ),
    )
    fallbacks = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_fallbacks],
        help_text=(
            f"Models tried in order when the agent's own fails (at most {MAX_FALLBACK_MODELS}), "
            "instead of those in its code, e.g. "
            '[{"backend": "anthropic", "model": "claude-haiku-4-5"}, {"backend": "openai", '
            '"model": "small", "base_url": "https://llm.example/v1", "api_key_env": "KEY"}]. '
            "Empty: the code's list."
        ),
    )

    class Meta:
        db_table = "realtime_tenantagent"
        ordering = ["agent"]
        unique_together = [("tenant", "agent")]
        verbose_name = "agent grant"

    def __str__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"{self.agent} ({state})"


# What a grant may override in the agent's code, passed to workers with the run (the
# fallback list as JSON text: the overrides are a mapping of strings).
AGENT_OVERRIDE_FIELDS = ("model", "api_key_env", "base_url", "fallbacks")


def override_value(grant: TenantAgent, name: str) -> str:
    """A grant's override as the run carries it: text, "" when not set."""
    value = getattr(grant, name)
    if name == "fallbacks":
        return json.dumps(value, separators=(",", ":")) if value else ""
    return str(value)
