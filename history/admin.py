from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.text import Truncator

from history.models import HistoryEntry
from history.thread import turns
from tenants.models import Tenant

SHORT_TEXT_CHARS = 80
# A thread page shows a stream's latest rows, at most this many (messages and replies).
THREAD_ROWS_SHOWN = 400


def thread_url(tenant_id: int, stream: str) -> str:
    """A stream's conversation as a thread (HistoryEntryAdmin.thread_view)."""
    query = urlencode({"tenant": tenant_id, "stream": stream})
    return reverse("admin:history_historyentry_thread") + f"?{query}"


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
        "tokens",
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
        "model",
        "text",
        "prompt_tokens",
        "completion_tokens",
        "tokens_estimated",
        "created_at",
    )

    @admin.display(description="stream", ordering="stream")
    def stream_link(self, entry: HistoryEntry) -> str:
        """The stream's conversation as a thread: this tenant's entries on this stream."""
        return format_html(
            '<a href="{}">{}</a>', thread_url(entry.tenant_id, entry.stream), entry.stream
        )

    def get_urls(self) -> list[URLPattern]:
        # Before the defaults: their "<path:object_id>/" catch-all would take this path.
        thread = path(
            "thread/",
            self.admin_site.admin_view(self.thread_view),
            name="history_historyentry_thread",
        )
        return [thread, *super().get_urls()]

    def thread_view(self, request: HttpRequest) -> HttpResponse:
        """One tenant's stream as a conversation: each message followed by its reply."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        tenant_id, stream = request.GET.get("tenant", ""), request.GET.get("stream", "")
        if not tenant_id.isdigit() or not stream or len(stream) > 200:
            raise Http404("a thread needs ?tenant=ID&stream=NAME")
        tenant = get_object_or_404(Tenant, pk=int(tenant_id))
        rows = HistoryEntry.objects.filter(tenant=tenant, stream=stream).order_by("-seq")
        latest = list(rows[: THREAD_ROWS_SHOWN + 1])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"{tenant.slug} / {stream}",
            "tenant": tenant,
            "stream": stream,
            "turns": turns(latest[:THREAD_ROWS_SHOWN]),
            "truncated": len(latest) > THREAD_ROWS_SHOWN,
            "rows_shown": THREAD_ROWS_SHOWN,
            "rows_url": reverse("admin:history_historyentry_changelist")
            + "?"
            + urlencode({"tenant__id__exact": tenant.pk, "stream": stream}),
        }
        return TemplateResponse(request, "admin/history/historyentry/thread.html", context)

    @admin.display(description="tokens")
    def tokens(self, entry: HistoryEntry) -> str:
        """A reply's prompt + completion tokens, "~" before an estimate; blank otherwise."""
        if entry.prompt_tokens is None or entry.completion_tokens is None:
            return ""
        total = entry.prompt_tokens + entry.completion_tokens
        return (
            f"{'~' if entry.tokens_estimated else ''}{total} "
            f"({entry.prompt_tokens} + {entry.completion_tokens})"
        )

    @admin.display(description="text")
    def short_text(self, entry: HistoryEntry) -> str:
        return Truncator(entry.text).chars(SHORT_TEXT_CHARS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: HistoryEntry | None = None) -> bool:
        return False
