"""Which agents a tenant may run, and its overrides of their code: TenantConfig's answers,
load_tenant against real rows, the admin's inline and create_tenant --agents."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.forms.models import model_to_dict
from django.test import Client

from agents import MAX_FALLBACK_MODELS
from tenants.config import AgentGrant, TenantConfig, load_tenant
from tenants.models import Tenant, TenantAgent


def config(all_agents: bool = True, *grants: AgentGrant) -> TenantConfig:
    return TenantConfig(
        "acme", "secret", True, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, all_agents=all_agents,
        agent_grants=grants,
    )  # fmt: skip


# --- may_use and agent_overrides ---------------------------------------------------------


def test_without_grants_all_agents_decides() -> None:
    assert config(True).may_use("echo")
    assert not config(False).may_use("echo")


def test_a_grant_wins_over_all_agents_both_ways() -> None:
    assert config(False, AgentGrant("echo")).may_use("echo")
    assert not config(True, AgentGrant("echo", enabled=False)).may_use("echo")
    # ...for its own agent only.
    assert config(True, AgentGrant("echo", enabled=False)).may_use("other")
    assert not config(False, AgentGrant("echo")).may_use("other")


def test_overrides_are_the_set_fields_of_an_enabled_grant() -> None:
    grant = AgentGrant("echo", model="gpt-x", api_key_env="ACME_KEY")
    assert config(False, grant).agent_overrides("echo") == {
        "model": "gpt-x",
        "api_key_env": "ACME_KEY",
    }
    full = AgentGrant("echo", model="m", api_key_env="K", base_url="http://llm:8000/v1")
    assert config(True, full).agent_overrides("echo") == {
        "model": "m",
        "api_key_env": "K",
        "base_url": "http://llm:8000/v1",
    }


def test_no_overrides_without_an_enabled_grant() -> None:
    disabled = AgentGrant("echo", enabled=False, model="gpt-x", base_url="http://llm/v1")
    assert config(True, disabled).agent_overrides("echo") == {}
    assert config(True).agent_overrides("echo") == {}
    assert config(True, AgentGrant("echo")).agent_overrides("echo") == {}


def test_grants_are_not_told_to_clients() -> None:
    limits = config(False, AgentGrant("echo", model="m")).public_limits()
    assert not {"all_agents", "agent_grants", "max_causal_depth"} & set(limits)


# --- load_tenant -------------------------------------------------------------------------


@pytest.mark.django_db
def test_load_tenant_reads_grants_and_causal_depth() -> None:
    tenant = Tenant.objects.create(slug="acme", all_agents=False, max_causal_depth=5)
    TenantAgent.objects.create(tenant=tenant, agent="echo", model="m", api_key_env="ACME_KEY")
    TenantAgent.objects.create(tenant=tenant, agent="old", enabled=False)
    Tenant.objects.create(slug="other")

    loaded = load_tenant("acme")
    assert loaded is not None
    assert (loaded.all_agents, loaded.max_causal_depth) == (False, 5)
    assert loaded.agent_grants == (
        AgentGrant("echo", enabled=True, model="m", api_key_env="ACME_KEY"),
        AgentGrant("old", enabled=False),
    )
    assert loaded.may_use("echo") and not loaded.may_use("old")

    other = load_tenant("other")
    assert other is not None
    assert (other.all_agents, other.agent_grants, other.max_causal_depth) == (True, (), 3)


@pytest.mark.django_db
def test_an_api_key_cannot_be_saved_where_its_variable_name_goes() -> None:
    from django.core.exceptions import ValidationError

    tenant = Tenant.objects.create(slug="acme")
    TenantAgent(tenant=tenant, agent="echo", api_key_env="ACME_OPENAI_KEY").full_clean()
    with pytest.raises(ValidationError):
        TenantAgent(tenant=tenant, agent="echo", api_key_env="sk-proj-abc123").full_clean()


# --- the admin ---------------------------------------------------------------------------

INLINE = "agent_grants"


def change_form(tenant: Tenant, *rows: dict[str, Any], initial: int = 0) -> dict[str, Any]:
    """The POST of the tenant's change page: its fields as stored, plus inline rows."""
    data: dict[str, Any] = {
        name: value
        for name, value in model_to_dict(tenant).items()
        if value is not False and name != "id"
    }
    data.update(
        {
            f"{INLINE}-TOTAL_FORMS": len(rows),
            f"{INLINE}-INITIAL_FORMS": initial,
            f"{INLINE}-MIN_NUM_FORMS": 0,
            f"{INLINE}-MAX_NUM_FORMS": 1000,
        }
    )
    for index, row in enumerate(rows):
        for name, value in row.items():
            if value is not False:
                data[f"{INLINE}-{index}-{name}"] = value
        data[f"{INLINE}-{index}-tenant"] = tenant.pk
    return data


def change_url(tenant: Tenant) -> str:
    return f"/admin/tenants/tenant/{tenant.pk}/change/"


@pytest.mark.django_db
def test_the_tenant_page_has_the_agents_fieldset_and_inline(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    page = admin_client.get(change_url(tenant))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="all_agents"' in html and 'name="max_causal_depth"' in html
    assert f'name="{INLINE}-TOTAL_FORMS"' in html
    assert "never stored" in html
    # The agent is chosen among those defined in code.
    assert '<option value="echo">echo</option>' in html


@pytest.mark.django_db
def test_the_admin_refuses_an_agent_not_defined_in_code(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    page = admin_client.post(
        change_url(tenant), change_form(tenant, {"agent": "ecoh", "enabled": True})
    )
    assert page.status_code == 200  # the form again, with its errors
    assert "Select a valid choice" in page.content.decode()
    assert not TenantAgent.objects.exists()


@pytest.mark.django_db
def test_the_admin_saves_a_grant_and_keeps_a_removed_agents_row_editable(
    admin_client: Client,
) -> None:
    tenant = Tenant.objects.create(slug="acme")
    row = {"agent": "echo", "enabled": True, "model": "m", "api_key_env": "ACME_KEY"}
    page = admin_client.post(change_url(tenant), change_form(tenant, row))
    assert page.status_code == 302, page.content.decode()
    grant = TenantAgent.objects.get(tenant=tenant)
    assert (grant.agent, grant.enabled, grant.model, grant.api_key_env) == (
        "echo",
        True,
        "m",
        "ACME_KEY",
    )

    # A row whose agent is gone from code is still shown and can be disabled.
    TenantAgent.objects.create(tenant=tenant, agent="retired")
    retired = TenantAgent.objects.get(agent="retired")
    html = admin_client.get(change_url(tenant)).content.decode()
    assert "retired (not defined in code)" in html
    rows = (
        {"id": grant.pk, "agent": "echo", "enabled": True, "model": "m", "api_key_env": "ACME_KEY"},
        {"id": retired.pk, "agent": "retired", "enabled": False},
    )
    page = admin_client.post(change_url(tenant), change_form(tenant, *rows, initial=2))
    assert page.status_code == 302, page.content.decode()
    assert not TenantAgent.objects.get(pk=retired.pk).enabled


# --- create_tenant -----------------------------------------------------------------------


@pytest.mark.django_db
def test_create_tenant_with_agents_allows_only_those() -> None:
    call_command("create_tenant", "gated", "--agents", "echo")
    tenant = Tenant.objects.get(slug="gated")
    assert not tenant.all_agents
    assert list(tenant.agent_grants.values_list("agent", "enabled")) == [("echo", True)]

    call_command("create_tenant", "open")
    assert Tenant.objects.get(slug="open").all_agents

    with pytest.raises(CommandError, match="no agent named 'nope'"):
        call_command("create_tenant", "typo", "--agents", "echo,nope")
    assert not Tenant.objects.filter(slug="typo").exists()


# --- fallback models ---------------------------------------------------------------------

FALLBACKS = [
    {"backend": "anthropic", "model": "claude"},
    {
        "backend": "openai",
        "model": "small",
        "base_url": "https://llm.example/v1",
        "api_key_env": "K",
    },
]


@pytest.mark.django_db
def test_a_grants_fallback_list_travels_as_json_text_in_the_overrides() -> None:
    tenant = Tenant.objects.create(slug="acme")
    TenantAgent.objects.create(tenant=tenant, agent="echo", fallbacks=FALLBACKS)
    TenantAgent.objects.create(tenant=tenant, agent="other")
    loaded = load_tenant("acme")
    assert loaded is not None
    overrides = loaded.agent_overrides("echo")
    assert set(overrides) == {"fallbacks"}
    assert json.loads(overrides["fallbacks"]) == FALLBACKS
    # No list: nothing in the overrides, the code's list applies.
    assert loaded.agent_overrides("other") == {}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fallbacks",
    [
        {"backend": "openai"},
        ["openai"],
        [{"backend": "openai", "key": "sk-abc"}],
        [{"backend": "openai", "api_key_env": "sk-abc"}],
        [{"backend": "openai", "base_url": "ftp://llm.example"}],
        [{"backend": "Open AI"}],
        [{"backend": "openai"}] * (MAX_FALLBACK_MODELS + 1),
    ],
)
def test_a_malformed_fallback_list_cannot_be_saved(fallbacks: Any) -> None:
    from django.core.exceptions import ValidationError

    tenant = Tenant.objects.create(slug="acme")
    with pytest.raises(ValidationError):
        TenantAgent(tenant=tenant, agent="echo", fallbacks=fallbacks).full_clean()


@pytest.mark.django_db
def test_the_admin_saves_a_fallback_list_of_known_backends_only(admin_client: Client) -> None:
    tenant = Tenant.objects.create(slug="acme")
    unknown = {"agent": "echo", "enabled": True, "fallbacks": '[{"backend": "nowhere"}]'}
    page = admin_client.post(change_url(tenant), change_form(tenant, unknown))
    assert page.status_code == 200
    assert "no model backend &#x27;nowhere&#x27;" in page.content.decode()
    assert not TenantAgent.objects.exists()

    row = {"agent": "echo", "enabled": True, "fallbacks": json.dumps(FALLBACKS)}
    page = admin_client.post(change_url(tenant), change_form(tenant, row))
    assert page.status_code == 302, page.content.decode()
    assert TenantAgent.objects.get(tenant=tenant).fallbacks == FALLBACKS
