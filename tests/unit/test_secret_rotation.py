"""Signing secret rotation: tokens with the new secret verify at once, with the previous one
only until the grace ends; what a gateway closes when a tenant changes (close_verdict); the
admin's rotate view (staff, POST) and the change form that no longer edits the secret.

Time is moved by setting secret_rotated_at in the past, never by sleeping."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from realtime.control import TENANT_DELETED, TENANT_DISABLED, close_verdict
from realtime.protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from tenants.config import TenantCache, TenantConfig, load_tenant
from tenants.models import Tenant
from tenants.tokens import SECRET_ROTATED, AuthError, Identity, authenticate, issue_token

GRACE_S = settings.SWITCHBOARD["SECRET_ROTATION_GRACE_S"]


# transactional_db, as in test_auth.py: TenantCache reads rows on another thread.
@pytest.fixture
def tenant(transactional_db: None) -> Tenant:
    return Tenant.objects.create(slug="acme")


def auth(token: str) -> tuple[Identity, Any]:
    # A fresh cache per call: each call sees the rows as they are now.
    return asyncio.run(authenticate(token, TenantCache(ttl_s=60)))


def refusal(token: str) -> str:
    with pytest.raises(AuthError) as caught:
        auth(token)
    return str(caught.value)


def rotated_ago(tenant: Tenant, seconds: float) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(
        secret_rotated_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_rotation_keeps_the_old_secret_as_previous(tenant: Tenant) -> None:
    old = tenant.signing_secret
    new = tenant.rotate_signing_secret()
    stored = Tenant.objects.get(pk=tenant.pk)
    assert new != old
    assert (stored.signing_secret, stored.previous_signing_secret) == (new, old)
    assert stored.secret_rotated_at is not None
    assert stored.previous_secret_until() == stored.secret_rotated_at + timedelta(seconds=GRACE_S)


def test_new_secret_works_old_one_during_grace_only(tenant: Tenant) -> None:
    old_token = issue_token(tenant.signing_secret, "acme", "alice")
    new_secret = tenant.rotate_signing_secret()

    identity, _ = auth(issue_token(new_secret, "acme", "bob"))
    assert identity.client == "bob" and identity.secret == new_secret

    identity, _ = auth(old_token)
    assert identity.client == "alice"
    assert identity.secret == Tenant.objects.get(pk=tenant.pk).previous_signing_secret

    rotated_ago(tenant, GRACE_S - 60)
    assert auth(old_token)[0].client == "alice"

    rotated_ago(tenant, GRACE_S + 1)
    assert refusal(old_token) == SECRET_ROTATED
    assert auth(issue_token(new_secret, "acme", "bob"))[0].client == "bob"


def test_only_one_previous_secret_is_kept(tenant: Tenant) -> None:
    oldest = issue_token(tenant.signing_secret, "acme", "alice")
    tenant.rotate_signing_secret()
    tenant.rotate_signing_secret()
    assert refusal(oldest) == "bad signature"


def test_a_foreign_secret_is_still_a_bad_signature(tenant: Tenant) -> None:
    tenant.rotate_signing_secret()
    assert refusal(issue_token("not-the-secret-" * 4, "acme", "eve")) == "bad signature"


def test_an_expired_token_with_the_previous_secret_says_expired(tenant: Tenant) -> None:
    token = issue_token(tenant.signing_secret, "acme", "alice", ttl_s=-5)
    tenant.rotate_signing_secret()
    assert refusal(token) == "token expired"


def test_load_tenant_carries_the_previous_secret_and_grace_end(tenant: Tenant) -> None:
    config = load_tenant("acme")
    assert config is not None
    assert (config.previous_signing_secret, config.previous_secret_until) == ("", 0.0)
    old = tenant.signing_secret
    tenant.rotate_signing_secret()
    config = load_tenant("acme")
    assert config is not None
    assert config.previous_signing_secret == old
    assert config.previous_secret_until == pytest.approx(time.time() + GRACE_S, abs=5)


# --- what an open connection is judged by (close_verdict) --------------------------------


def config(enabled: bool = True, previous: str = "", until: float = 0.0) -> TenantConfig:
    return TenantConfig(
        "acme", "current", enabled, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        previous_signing_secret=previous, previous_secret_until=until,
    )  # fmt: skip


def test_close_verdicts() -> None:
    now = time.time()
    assert close_verdict("current", config(), now) is None
    assert close_verdict("current", config(enabled=False), now) == (
        CLOSE_FORBIDDEN,
        TENANT_DISABLED,
    )
    assert close_verdict("current", None, now) == (CLOSE_FORBIDDEN, TENANT_DELETED)
    assert close_verdict("old", config(previous="old", until=now + 10), now) is None
    assert close_verdict("old", config(previous="old", until=now - 1), now) == (
        CLOSE_UNAUTHORIZED,
        SECRET_ROTATED,
    )
    # Rotated twice: the connection's secret is not even the previous one.
    assert close_verdict("older", config(previous="old", until=now + 10), now) == (
        CLOSE_UNAUTHORIZED,
        SECRET_ROTATED,
    )
    # A secret not known (not judged by it); disabled still closes.
    assert close_verdict("", config(), now) is None
    assert close_verdict("", config(enabled=False), now) == (CLOSE_FORBIDDEN, TENANT_DISABLED)


# --- the admin ---------------------------------------------------------------------------


def rotate_url(tenant: Tenant) -> str:
    return f"/admin/tenants/tenant/{tenant.pk}/rotate-secret/"


@pytest.mark.django_db
def test_the_change_form_shows_only_the_secrets_end_and_the_rotate_button(
    admin_client: Client,
) -> None:
    tenant = Tenant.objects.create(slug="acme")
    html = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert tenant.signing_secret not in html
    assert f"…{tenant.signing_secret[-4:]}" in html
    assert rotate_url(tenant) in html
    assert "never rotated" in html
    # A new tenant's secret can still be typed in.
    assert (
        'name="signing_secret"' in admin_client.get("/admin/tenants/tenant/add/").content.decode()
    )


@pytest.mark.django_db
def test_the_change_form_cannot_change_the_secret(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    data = {
        "slug": "acme",
        "signing_secret": "typed-in",
        "enabled": "on",
        "all_agents": "on",
        "agent_grants-TOTAL_FORMS": 0,
        "agent_grants-INITIAL_FORMS": 0,
        **{name: value for name, value in tenant.limits().items()},
        "weight": 1,
        "max_causal_depth": 3,
        "max_token_lifetime_s": tenant.max_token_lifetime_s,
        "daily_token_budget": 0,
        "monthly_token_budget": 0,
    }
    page = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", data)
    assert page.status_code == 302, page.content.decode()
    assert Tenant.objects.get(pk=tenant.pk).signing_secret == tenant.signing_secret


@pytest.mark.django_db
def test_rotating_takes_a_post_and_shows_the_new_secret_once(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    old = tenant.signing_secret

    page = admin_client.get(rotate_url(tenant))
    assert page.status_code == 200
    assert 'method="post"' in page.content.decode()
    assert Tenant.objects.get(pk=tenant.pk).signing_secret == old, "a GET changes nothing"

    page = admin_client.post(rotate_url(tenant))
    assert page.status_code == 200
    stored = Tenant.objects.get(pk=tenant.pk)
    assert (stored.previous_signing_secret, stored.secret_rotated_at is not None) == (old, True)
    assert stored.signing_secret != old
    assert stored.signing_secret in page.content.decode()
    # Not shown again: the change form has only its end.
    html = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert stored.signing_secret not in html
    assert "tokens signed with the previous secret are accepted until" in html


@pytest.mark.django_db
def test_rotating_needs_the_csrf_token(admin_user: User) -> None:
    tenant = Tenant.objects.create(slug="acme")
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(rotate_url(tenant)).status_code == 403
    assert Tenant.objects.get(pk=tenant.pk).secret_rotated_at is None


@pytest.mark.django_db
def test_rotating_needs_staff_and_the_change_permission(client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    page = client.post(rotate_url(tenant))
    assert page.status_code == 302 and "/admin/login/" in page["Location"]

    user = User.objects.create_user("visitor", password="x")
    client.force_login(user)
    page = client.post(rotate_url(tenant))
    assert page.status_code == 302 and "/admin/login/" in page["Location"], "not staff"

    user.is_staff = True
    user.save()
    user.user_permissions.add(Permission.objects.get(codename="view_tenant"))
    assert client.post(rotate_url(tenant)).status_code == 403, "view is not change"
    assert Tenant.objects.get(pk=tenant.pk).secret_rotated_at is None
