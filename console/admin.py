import logging
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from redis.exceptions import RedisError

from agents import agent_names
from console.live import TENANTS_SHOWN, snapshot
from history.admin import history_url
from project.conf import conf
from streams.receipts import RECEIPT_TTL_S, tenant_receipts
from streams.redis_clients import sync_client
from tenants.announcements import announce_tenant_change
from tenants.models import Tenant, TenantAgent
from workers.backends import backend_names

logger = logging.getLogger(__name__)

# The admin's front page with a link to the live page: the operators' first stop.
admin.site.index_template = "admin/switchboard_index.html"

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

    def clean_fallbacks(self) -> Any:
        """The fallback list's backends are ones this deployment has (its shape is the
        model field's validator)."""
        fallbacks = self.cleaned_data.get("fallbacks") or []
        known = backend_names()
        for entry in fallbacks if isinstance(fallbacks, list) else ():
            backend = entry.get("backend") if isinstance(entry, dict) else None
            if backend not in known:
                raise forms.ValidationError(
                    f"no model backend {backend!r}; known: {', '.join(known)}"
                )
        return fallbacks


class TenantAgentInline(admin.TabularInline):
    model = TenantAgent
    form = TenantAgentForm
    extra = 0
    # Django 6's default, said now: a base URL typed without a scheme is taken as https.
    formfield_overrides = {
        models.URLField: {"assume_scheme": "https"},
        # A short list of fallback models: a small box in the row, not a page-wide one.
        models.JSONField: {"widget": forms.Textarea(attrs={"rows": 2, "cols": 48})},
    }


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
    readonly_fields = (
        "created_at",
        "updated_at",
        "receipts_link",
        "history_link",
        "signing_secret_status",
    )
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
                    ("client_receipts_per_s", "client_receipt_burst"),
                    "max_subscriptions_per_connection",
                    "max_token_lifetime_s",
                    "weight",
                )
            },
        ),
        (
            "Token budgets (UTC day and month; 0: none)",
            {
                "fields": (("daily_token_budget", "monthly_token_budget"),),
                "description": (
                    "Checked when a send is accepted, against the tokens the tenant's model "
                    "calls used so far in the period (counted as each call ends). Once a budget "
                    "is used, send answers budget_exhausted (429) until it resets; runs "
                    "already accepted finish, so a period may end a little over budget. "
                    "Usage so far is on the live page."
                ),
            },
        ),
        (
            "Agents",
            {
                "fields": ("all_agents", "max_causal_depth", "fault_injection"),
                "description": (
                    "The grants below enable or disable single agents and may change their "
                    "model and provider for this tenant's runs. API keys are referenced by "
                    "environment variable name, never stored here."
                ),
            },
        ),
        (None, {"fields": ("receipts_link", "history_link", "created_at", "updated_at")}),
    )
    inlines = (TenantAgentInline,)

    @admin.display(description="receipts")
    def receipts_link(self, obj: Tenant | None) -> str:
        if obj is None or obj.pk is None:
            return "-"
        url = reverse("admin:tenants_tenant_receipts", args=[obj.pk])
        return format_html('<a href="{}">streams and clients</a>', url)

    @admin.display(description="history")
    def history_link(self, obj: Tenant | None) -> str:
        if obj is None or obj.pk is None:
            return "-"
        return format_html('<a href="{}">Conversation history</a>', history_url(obj))

    def get_urls(self) -> list[URLPattern]:
        # Before the defaults: their "<path:object_id>/" catch-all would take this path.
        receipts = path(
            "<path:object_id>/receipts/",
            self.admin_site.admin_view(self.receipts_view),
            name="tenants_tenant_receipts",
        )
        return [*self._operations_urls(), receipts, *super().get_urls()]

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
        return TemplateResponse(request, "admin/tenants/tenant/receipts.html", context)

    # --- operating: secret rotation, changes reaching the gateways, the live page -----------

    def _operations_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("live/", view(self.live_view), name="tenants_tenant_live"),
            path("live/data/", view(self.live_data_view), name="tenants_tenant_live_data"),
            path(
                "<path:object_id>/rotate-secret/",
                view(self.rotate_secret_view),
                name="tenants_tenant_rotate_secret",
            ),
        ]

    def get_fieldsets(self, request: HttpRequest, obj: Tenant | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets  # a new tenant's secret may be typed in (or the generated kept)
        # An existing tenant's secret changes only by rotation: an edited secret would cut
        # every token off at once, with no grace, and the form would show it to every viewer.
        return [
            (
                name,
                {
                    **options,
                    "fields": tuple(
                        "signing_secret_status" if field == "signing_secret" else field
                        for field in options["fields"]
                    ),
                },
            )
            for name, options in fieldsets
        ]

    @admin.display(description="signing secret")
    def signing_secret_status(self, obj: Tenant | None) -> str:
        if obj is None or obj.pk is None:
            return "-"
        url = reverse("admin:tenants_tenant_rotate_secret", args=[obj.pk])
        until = obj.previous_secret_until()
        if obj.secret_rotated_at is None or until is None:
            state = "never rotated"
        elif until > timezone.now():
            state = (
                f"rotated {_when(obj.secret_rotated_at)}; tokens signed with the previous "
                f"secret are accepted until {_when(until)}"
            )
        else:
            state = f"rotated {_when(obj.secret_rotated_at)}; the previous secret is refused"
        return format_html(
            '<code>…{}</code> ({}) <a class="button" href="{}">Rotate signing secret</a>',
            obj.signing_secret[-4:],
            state,
            url,
        )

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change:
            # Disabled (or its limits changed): open connections on every gateway hear of it.
            slugs = {obj.slug, form.initial.get("slug") or obj.slug}
            for slug in slugs:
                self._announce(request, slug, "disabled" if not obj.enabled else "changed")

    def delete_model(self, request: HttpRequest, obj: Tenant) -> None:
        slug = obj.slug
        super().delete_model(request, obj)
        self._announce(request, slug, "deleted")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        slugs = list(queryset.values_list("slug", flat=True))
        super().delete_queryset(request, queryset)
        for slug in slugs:
            self._announce(request, slug, "deleted")

    def _announce(self, request: HttpRequest, slug: str, why: str) -> None:
        """Tell the gateways once the change is committed (they read the database then)."""

        def send() -> None:
            if not announce_tenant_change(slug, why):
                self.message_user(
                    request,
                    f"The gateways could not be told about {slug} at once (Redis did not "
                    f"answer); they apply the change within {_apply_within_s()} s by themselves.",
                    messages.WARNING,
                )

        transaction.on_commit(send)

    def rotate_secret_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """GET: what rotating does, and the button. POST: rotate, and show the new secret
        this once (the change form shows only its last characters)."""
        tenant = self.get_object(request, object_id)
        if tenant is None:
            raise Http404(f"no tenant with id {object_id!r}")
        if not self.has_change_permission(request, tenant):
            raise PermissionDenied
        new_secret = ""
        if request.method == "POST":
            new_secret = tenant.rotate_signing_secret()
            until = tenant.previous_secret_until()
            logger.warning(
                "signing secret rotated tenant=%s by=%s previous accepted until %s",
                tenant.slug,
                request.user.get_username(),
                until.isoformat() if until else "-",
            )
            self._announce(request, tenant.slug, "rotated")
        until = tenant.previous_secret_until()
        context = {
            **self.admin_site.each_context(request),
            "title": f"Rotate the signing secret of {tenant.slug}",
            "opts": self.opts,
            "tenant": tenant,
            "new_secret": new_secret,
            "grace_s": conf().secret_rotation_grace_s,
            "previous_until": until if new_secret else None,
            "apply_within_s": _apply_within_s(),
        }
        return TemplateResponse(request, "admin/tenants/tenant/rotate_secret.html", context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {"live_url": reverse("admin:tenants_tenant_live"), **(extra_context or {})}
        return super().changelist_view(request, extra)

    def _live_data(self) -> dict[str, Any]:
        tenants = list(
            Tenant.objects.order_by("slug").values(
                "slug", "enabled", "weight", "daily_token_budget", "monthly_token_budget"
            )
        )
        return snapshot(sync_client(), tenants[:TENANTS_SHOWN], len(tenants))

    def live_view(self, request: HttpRequest) -> HttpResponse:
        """Queues, workers, runs, problems, connections and refusals, refreshed every 2 s by
        the page's script from live_data_view (no reload)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Live queues, workers and runs",
            "opts": self.opts,
            "initial": self._live_data(),
            "data_url": reverse("admin:tenants_tenant_live_data"),
            "refresh_ms": LIVE_REFRESH_MS,
        }
        return TemplateResponse(request, "admin/tenants/tenant/live.html", context)

    def live_data_view(self, request: HttpRequest) -> JsonResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return JsonResponse(self._live_data())


# The live page asks for new data this often (each answer asks the workers for up to 1 s).
LIVE_REFRESH_MS = 2000


def _when(moment: datetime) -> str:
    return date_format(timezone.localtime(moment), "DATETIME_FORMAT")


def _apply_within_s() -> float:
    """How long a gateway that missed the control message takes to apply a change."""
    config = conf()
    return round(config.tenant_cache_s + config.tenant_check_s, 1)
