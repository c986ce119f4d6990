"""A database migrated before Tenant moved from `realtime` to `tenants` migrates to the new
state without losing or rewriting anything: the tenant, its agent grant, its history and the
admin permissions granted on it are all still there and usable.

Each step is `manage.py` on a SQLite file of its own (a fresh process, as an upgrade is),
so the migrations run exactly as in a deployment, content types and permissions included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What a database held before the move: realtime's and history's migrations only, with a
# tenant, one agent grant, one history row and a staff user allowed to edit tenants.
BEFORE_MOVE = """
import datetime
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.db.migrations.loader import MigrationLoader

state = MigrationLoader(connection).project_state(
    [("realtime", "0006_hardening"), ("history", "0001_initial")]
)
Tenant = state.apps.get_model("realtime", "Tenant")
TenantAgent = state.apps.get_model("realtime", "TenantAgent")
HistoryEntry = state.apps.get_model("history", "HistoryEntry")
tenant = Tenant.objects.create(slug="acme", name="Acme", signing_secret="s3cret", weight=3)
TenantAgent.objects.create(tenant=tenant, agent="echo", model="small-model")
HistoryEntry.objects.create(
    tenant=tenant, stream="room", seq=1, kind="message", sender="client:alice",
    run_id="run-1", text="hello", created_at=datetime.datetime.now(datetime.UTC),
)
# Content types and permissions as contenttypes and auth created them for realtime's models
# (after every migrate, which this app, holding no models now, no longer gets).
from django.contrib.contenttypes.models import ContentType
for model in ("tenant", "tenantagent"):
    content_type = ContentType.objects.create(app_label="realtime", model=model)
    for action in ("add", "change", "delete", "view"):
        Permission.objects.create(
            content_type=content_type, codename=f"{action}_{model}", name=f"Can {action} {model}"
        )
operator = User.objects.create_user("operator", password="x", is_staff=True)
operator.user_permissions.add(
    Permission.objects.get(content_type__app_label="realtime", codename="change_tenant")
)
"""

AFTER_MOVE = """
import asyncio, json
from django.contrib.auth.models import User
from django.contrib.contenttypes.models import ContentType
from history.models import HistoryEntry
from tenants.config import TenantCache, load_tenant
from tenants.models import Tenant
from tenants.tokens import authenticate, issue_token

tenant = Tenant.objects.get(slug="acme")
config = load_tenant("acme")
token = issue_token(tenant.signing_secret, "acme", "alice")
identity, _ = asyncio.run(authenticate(token, TenantCache(ttl_s=60)))
tenant.rotate_signing_secret()  # writes through the moved model
print(json.dumps({
    "table": Tenant._meta.db_table,
    "name": tenant.name,
    "weight": config.weight,
    "grants": [(g.agent, g.model) for g in config.agent_grants],
    "history": [e.text for e in HistoryEntry.objects.filter(tenant=tenant)],
    "identity": [identity.tenant, identity.client],
    "previous_secret": Tenant.objects.get(slug="acme").previous_signing_secret,
    "may_change": User.objects.get(username="operator").has_perm("tenants.change_tenant"),
    "content_types": sorted(
        f"{ct.app_label}.{ct.model}"
        for ct in ContentType.objects.filter(model__in=["tenant", "tenantagent"])
    ),
}))
"""


@pytest.fixture
def manage(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'premove.sqlite3'}"}

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run


def test_a_database_from_before_the_move_migrates_and_keeps_its_tenants(manage) -> None:  # type: ignore[no-untyped-def]
    manage("migrate", "auth")
    manage("migrate", "realtime", "0006_hardening")
    manage("migrate", "history", "0001_initial")
    manage("shell", "-c", BEFORE_MOVE)

    plan = manage("migrate")
    assert "tenants.0001_initial... OK" in plan
    assert "realtime.0007_tenants_moved... OK" in plan

    after = json.loads(manage("shell", "-c", AFTER_MOVE).strip().splitlines()[-1])
    assert after["table"] == "realtime_tenant"
    assert after["name"] == "Acme"
    assert after["weight"] == 3
    assert after["grants"] == [["echo", "small-model"]]
    assert after["history"] == ["hello"]
    assert after["identity"] == ["acme", "alice"]
    assert after["previous_secret"] == "s3cret"
    # The content types were renamed, not duplicated: the operator's grant still counts.
    assert after["may_change"] is True
    assert after["content_types"] == ["tenants.tenant", "tenants.tenantagent"]
    # The management commands moved with the model.
    assert manage("issue_token", "acme", "bob").strip().count(".") == 2


def test_the_move_can_be_unapplied_and_applied_again(manage) -> None:  # type: ignore[no-untyped-def]
    manage("migrate")
    manage("create_tenant", "acme")
    # Back to before the move (history's and realtime's state-only steps go with it)...
    plan = manage("migrate", "tenants", "zero")
    assert "Unapply all migrations: tenants" in plan or "tenants.0001_initial" in plan
    # ...and forward again: the row was never touched either way.
    manage("migrate")
    assert manage("issue_token", "acme", "bob").strip().count(".") == 2


@pytest.mark.django_db
def test_the_tenants_former_admin_addresses_lead_to_their_pages(admin_client) -> None:  # type: ignore[no-untyped-def]
    moved = admin_client.get("/admin/realtime/tenant/live/?tenant=acme")
    assert moved.status_code == 302
    assert moved["Location"] == "/admin/tenants/tenant/live/?tenant=acme"
    assert admin_client.get("/admin/realtime/tenant/", follow=True).status_code == 200
