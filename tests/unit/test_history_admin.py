"""The conversation history in the admin: browse, search, filter by tenant; read-only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from history.admin import history_url, thread_url
from history.models import HistoryEntry
from tenants.models import Tenant

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/history/historyentry/"
T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


def entry(tenant: Tenant, stream: str, seq: int, text: str, kind: str = "message") -> HistoryEntry:
    return HistoryEntry.objects.create(
        tenant=tenant,
        stream=stream,
        seq=seq,
        kind=kind,
        sender="client:alice" if kind == "message" else "agent:echo",
        run_id=f"r-{tenant.slug}-{stream}-{seq}",
        status="" if kind == "message" else "ok",
        text=text,
        created_at=T0 + timedelta(seconds=seq),
    )


@pytest.fixture
def staff() -> Client:
    """A staff member who may view history, and nothing else."""
    user = User.objects.create_user("operator", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_historyentry"))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def tenants() -> tuple[Tenant, Tenant]:
    acme, globex = Tenant.objects.create(slug="acme"), Tenant.objects.create(slug="globex")
    entry(acme, "room", 1, "where is my parcel?")
    entry(acme, "room", 2, "It left the depot this morning.", kind="reply.done")
    entry(acme, "billing", 1, "refund the second invoice")
    entry(globex, "room", 1, "globex asks about a parcel too")
    return acme, globex


def test_staff_browse_and_search_the_history(staff: Client, tenants: tuple[Tenant, Tenant]) -> None:
    page = staff.get(CHANGELIST)
    assert page.status_code == 200
    html = page.content.decode()
    for text in ("where is my parcel?", "It left the depot", "refund the second invoice"):
        assert text in html
    # Text, stream and run id are searched.
    html = staff.get(CHANGELIST, {"q": "parcel"}).content.decode()
    assert "where is my parcel?" in html and "globex asks about a parcel" in html
    assert "refund the second invoice" not in html
    html = staff.get(CHANGELIST, {"q": "billing"}).content.decode()
    assert "refund the second invoice" in html and "where is my parcel?" not in html
    html = staff.get(CHANGELIST, {"q": "r-acme-room-2"}).content.decode()
    assert "It left the depot" in html and "where is my parcel?" not in html


def test_history_is_listed_per_tenant_and_stream(
    staff: Client, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, _ = tenants
    html = staff.get(history_url(acme)).content.decode()
    assert "where is my parcel?" in html and "refund the second invoice" in html
    assert "globex asks" not in html
    html = staff.get(CHANGELIST, {"tenant__id__exact": acme.pk, "stream": "room"}).content.decode()
    assert "where is my parcel?" in html and "It left the depot" in html
    assert "refund the second invoice" not in html and "globex asks" not in html
    html = staff.get(CHANGELIST, {"kind__exact": "reply.done"}).content.decode()
    assert "It left the depot" in html and "where is my parcel?" not in html


def test_the_tenant_page_links_to_its_history(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    html = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert f'href="{history_url(tenant)}"' in html.replace("&amp;", "&")
    assert "Conversation history" in html


def test_history_is_a_record_not_a_form(
    admin_client: Client, tenants: tuple[Tenant, Tenant]
) -> None:
    assert admin_client.get(CHANGELIST + "add/").status_code == 403
    row = HistoryEntry.objects.first()
    assert row is not None
    page = admin_client.get(f"{CHANGELIST}{row.pk}/change/")
    assert page.status_code == 200  # shown read-only
    assert 'name="text"' not in page.content.decode()
    before = row.text
    admin_client.post(f"{CHANGELIST}{row.pk}/change/", {"text": "rewritten"})
    row.refresh_from_db()
    assert row.text == before


def test_non_staff_are_sent_to_the_login(tenants: tuple[Tenant, Tenant]) -> None:
    anonymous = Client()
    page = anonymous.get(CHANGELIST)
    assert page.status_code == 302 and "/admin/login/" in page["Location"]
    member = Client()
    member.force_login(User.objects.create_user("customer", password="pw"))
    page = member.get(CHANGELIST)
    assert page.status_code == 302 and "/admin/login/" in page["Location"]


def test_a_stream_reads_as_a_thread_each_message_followed_by_its_reply(
    staff: Client, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, _ = tenants
    # A second run on the same stream, degraded, its rows appended after the first's.
    HistoryEntry.objects.create(
        tenant=acme,
        stream="room",
        seq=3,
        kind="message",
        sender="client:bob",
        run_id="r-second",
        text="and my other parcel?",
        created_at=T0 + timedelta(seconds=3),
    )
    HistoryEntry.objects.create(
        tenant=acme,
        stream="room",
        seq=4,
        kind="reply.done",
        sender="agent:assistant",
        run_id="r-second",
        status="degraded",
        reason="model_error: model not configured",
        text="Sorry, the assistant is unavailable right now.",
        created_at=T0 + timedelta(seconds=4, milliseconds=500),
    )
    # The first pair shares a run id only in this test's fixture naming: give it one.
    HistoryEntry.objects.filter(tenant=acme, stream="room", seq__in=[1, 2]).update(run_id="r-first")

    changelist = staff.get(CHANGELIST).content.decode()
    url = thread_url(acme.pk, "room")
    assert f'href="{url}"'.replace("&", "&amp;") in changelist

    page = staff.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    order = [
        "where is my parcel?",
        "It left the depot this morning.",
        "and my other parcel?",
        "Sorry, the assistant is unavailable right now.",
    ]
    positions = [html.index(text) for text in order]
    assert positions == sorted(positions), "each message followed by its reply"
    assert "assistant" in html and "degraded" in html and "1.50 s" in html
    assert "model_error: model not configured" in html
    assert (
        "refund the second invoice" not in html
        and "globex" not in html.lower().split("<body")[-1].split("breadcrumbs")[-1]
    )


def test_a_thread_needs_a_tenant_and_a_stream(staff: Client) -> None:
    assert staff.get(CHANGELIST + "thread/").status_code == 404
    assert staff.get(CHANGELIST + "thread/", {"tenant": "x", "stream": "s"}).status_code == 404
    assert staff.get(CHANGELIST + "thread/", {"tenant": "999", "stream": "s"}).status_code == 404
    assert Client().get(CHANGELIST + "thread/").status_code == 302  # to the login
