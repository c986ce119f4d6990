from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.text import Truncator

from history.models import HistoryEntry
from realtime.models import Tenant

SHORT_TEXT_CHARS = 80


def history_url(tenant: Tenant) -> str:
    """The history changelist filtered to one tenant (linked from the tenant's page)."""
    return reverse("admin:history_historyentry_changelist") + f"?tenant__id__exact={tenant.pk}"


@admin.register(HistoryEntry)
class HistoryEntryAdmin(admin.ModelAdmin):
    """Browse and search what was said, per tenant and stream. Read-only: history is a
    record of what happened; rows may only be deleted (an erasure request, say)."""

    list_display = (
        "created_at",
        "tenant",
        "stream_link",
        "seq",
        "kind",
        "sender",
        "status",
        "short_text",
    )
    list_filter = ("tenant", "kind", "status")
    # `=run_id`: a run id is looked up whole. Text is searched with icontains, a scan;
    # PostgreSQL full-text search (a GIN index on a tsvector) would be the next step.
    search_fields = ("stream", "text", "=run_id")
    ordering = ("-created_at", "-seq")
    date_hierarchy = "created_at"
    list_select_related = ("tenant",)
    # A COUNT(*) of the whole table on every page would cost more than the page itself.
    show_full_result_count = False
    list_per_page = 100
    readonly_fields = (
        "tenant",
        "stream",
        "seq",
        "kind",
        "sender",
        "run_id",
        "event_id",
        "status",
        "reason",
        "text",
        "created_at",
    )

    @admin.display(description="stream", ordering="stream")
    def stream_link(self, entry: HistoryEntry) -> str:
        """The stream's whole conversation: this tenant's entries on this stream."""
        query = urlencode({"tenant__id__exact": entry.tenant_id, "stream": entry.stream})
        url = reverse("admin:history_historyentry_changelist") + f"?{query}"
        return format_html('<a href="{}">{}</a>', url, entry.stream)

    @admin.display(description="text")
    def short_text(self, entry: HistoryEntry) -> str:
        return Truncator(entry.text).chars(SHORT_TEXT_CHARS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: HistoryEntry | None = None) -> bool:
        return False
