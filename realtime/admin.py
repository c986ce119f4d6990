import logging
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from redis.exceptions import RedisError

from orchestration.agents import agent_names
from realtime.models import Tenant, TenantAgent
from realtime.receipts import RECEIPT_TTL_S, tenant_receipts
from realtime.redis_clients import sync_client

logger = logging.getLogger(__name__)

# The receipts page is a look, not an export: bounded whatever a tenant has.
RECEIPT_STREAMS_SHOWN = 100
RECEIPT_CLIENTS_SHOWN = 200


class TenantAgentForm(forms.ModelForm):
    """`agent` is a choice of the agents defined in code, read when the form is built (the
    registry is code, not data), so a typo cannot be saved as a grant that never matches."""

    agent = forms.ChoiceField(choices=())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = agent_names()
        saved = self.instance.agent if self.instance.pk else ""
        choices = [("", "---------")] + [(name, name) for name in names]
        if saved and saved not in names:
            # An agent removed from code: its old row stays shown and savable (to disable or
            # delete it), instead of failing validation for a field nobody changed.
            choices.append((saved, f"{saved} (not defined in code)"))
        field = self.fields["agent"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = choices


class TenantAgentInline(admin.TabularInline):
    model = TenantAgent
    form = TenantAgentForm
    extra = 0
    # Django 6's default, said now: a base URL typed without a scheme is taken as https.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "slug",
        "name",
        "enabled",
        "max_frame_bytes",
        "stream_retention",
        "updated_at",
        "receipts_link",
    )
    list_filter = ("enabled",)
    search_fields = ("slug", "name")
    readonly_fields = ("created_at", "updated_at", "receipts_link")
    fieldsets = (
        (None, {"fields": ("slug", "name", "enabled", "signing_secret")}),
        (
            "Limits (past one, clients are answered at once: 429 or close 4029)",
            {
                "fields": (
                    "max_frame_bytes",
                    "stream_retention",
                    ("max_connections", "max_connections_per_client"),
                    ("max_runs_in_flight_per_connection", "max_queued_runs"),
                    ("client_messages_per_s", "client_burst"),
                    ("tenant_messages_per_s", "tenant_burst"),
                    "weight",
                )
            },
        ),
        (
            "Agents",
            {
                "fields": ("all_agents", "max_causal_depth"),
                "description": (
                    "The grants below enable or disable single agents and may change their "
                    "model and provider for this tenant's runs. API keys are referenced by "
                    "environment variable name, never stored here."
                ),
            },
        ),
        (None, {"fields": ("receipts_link", "created_at", "updated_at")}),
    )
    inlines = (TenantAgentInline,)

    @admin.display(description="receipts")
    def receipts_link(self, obj: Tenant | None) -> str:
        if obj is None or obj.pk is None:
            return "-"
        url = reverse("admin:realtime_tenant_receipts", args=[obj.pk])
        return format_html('<a href="{}">streams and clients</a>', url)

    def get_urls(self) -> list[URLPattern]:
        # Before the defaults: their "<path:object_id>/" catch-all would take this path.
        receipts = path(
            "<path:object_id>/receipts/",
            self.admin_site.admin_view(self.receipts_view),
            name="realtime_tenant_receipts",
        )
        return [receipts, *super().get_urls()]

    def receipts_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The tenant's streams with receipts, read from Redis: head and each client's seq."""
        tenant = self.get_object(request, object_id)
        if tenant is None:
            raise Http404(f"no tenant with id {object_id!r}")
        if not self.has_view_permission(request, tenant):
            raise PermissionDenied
        streams: list[dict[str, Any]] = []
        total = 0
        redis_error = ""
        try:
            total, listed = tenant_receipts(sync_client(), tenant.slug, RECEIPT_STREAMS_SHOWN)
        except RedisError as error:
            logger.warning("receipts not read for the admin tenant=%s: %s", tenant.slug, error)
            redis_error = str(error)
            listed = []
        for entry in listed:
            shown = list(entry.receipts.items())[:RECEIPT_CLIENTS_SHOWN]
            streams.append(
                {
                    "stream": entry.stream,
                    "head": entry.head,
                    "updated_at": (
                        datetime.fromtimestamp(entry.updated_at, UTC) if entry.updated_at else None
                    ),
                    "rows": [
                        {"client": client, "seq": seq, "behind": max(entry.head - seq, 0)}
                        for client, seq in shown
                    ],
                    "hidden": len(entry.receipts) - len(shown),
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Receipts of {tenant.slug}",
            "opts": self.opts,
            "tenant": tenant,
            "streams": streams,
            "total": total,
            "ttl_days": RECEIPT_TTL_S // 86400,
            "redis_error": redis_error,
        }
        return TemplateResponse(request, "admin/realtime/tenant/receipts.html", context)
