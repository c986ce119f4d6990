"""Per-tenant agents on the real cluster: a `send` to an agent the tenant may not run is
refused with `forbidden` (403) and leaves nothing in the stream, an agent nobody defined is
still `not_found`, an operator's grant reaches open connections within the tenant cache's
TTL (SWITCHBOARD_TENANT_CACHE_S, 0.3 s here), and a grant's overrides travel with the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from client.connection import Frame, SwitchboardClient, SwitchboardError

from .conftest import Connect, Switchboard
from .support import wait_until

pytestmark = pytest.mark.asyncio


def make_tenant(switchboard: Switchboard, slug: str, all_agents: bool) -> None:
    switchboard.shell(
        "from tenants.models import Tenant\n"
        f"Tenant.objects.create(slug={slug!r}, all_agents={all_agents!r})\n"
    )


def grant(switchboard: Switchboard, tenant: str, agent: str, **fields: Any) -> None:
    """What an operator does in the admin: a TenantAgent row (enabled unless said)."""
    switchboard.shell(
        "from tenants.models import Tenant, TenantAgent\n"
        "TenantAgent.objects.create(\n"
        f"    tenant=Tenant.objects.get(slug={tenant!r}), agent={agent!r}, **{fields!r}\n"
        ")\n"
    )


async def refused(client: SwitchboardClient, stream: str, agent: str) -> SwitchboardError:
    message_id = client.new_id()
    with pytest.raises(SwitchboardError) as caught:
        await client.send(stream, agent, "hi", id=message_id)
    assert caught.value.frame["id"] == message_id
    return caught.value


async def test_a_tenant_runs_only_the_agents_enabled_for_it(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = unique("gated")
    make_tenant(switchboard, tenant, all_agents=False)
    client = await connect(tenant=tenant)
    stream = unique("room")

    forbidden = await refused(client, stream, "echo")
    assert (forbidden.code, forbidden.status) == ("forbidden", 403)
    assert forbidden.detail == "agent 'echo' is not enabled for this tenant"
    missing = await refused(client, stream, "no-such-agent")
    assert (missing.code, missing.status) == ("not_found", 404)
    # Neither message is in the stream (a run is only ever created with its message).
    assert (await client.subscribe(stream))["head"] == 0
    assert client.buffered(stream) == []

    grant(switchboard, tenant, "echo")

    # The same open connection: refused until its gateway's cached tenant expires.
    async def accepted() -> Frame | None:
        try:
            return await client.send(stream, "echo", "granted")
        except SwitchboardError as error:
            if error.code != "forbidden":
                raise
            return None

    ack = await wait_until(accepted, 10, "the grant to reach the gateway")
    assert ack["seq"] == 1
    _, done = await client.reply(ack["id"], timeout=15)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", "granted")


async def test_a_disabled_grant_refuses_even_when_all_agents_are_allowed(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = unique("muted")
    make_tenant(switchboard, tenant, all_agents=True)
    grant(switchboard, tenant, "echo", enabled=False)
    client = await connect(tenant=tenant)
    error = await refused(client, unique("room"), "echo")
    assert (error.code, error.status) == ("forbidden", 403)


async def test_a_grants_overrides_are_kept_with_the_run(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = unique("custom")
    make_tenant(switchboard, tenant, all_agents=False)
    grant(switchboard, tenant, "echo", model="tenant-model", api_key_env="GATED_KEY")
    client = await connect(tenant=tenant)
    stream = unique("room")
    ack = await client.send(stream, "echo", "hi")
    _, done = await client.reply(ack["id"], timeout=15)
    assert done["data"]["status"] == "ok"
    run = switchboard.redis().hget(
        f"{switchboard.key_prefix}:run:{{{tenant}}}:{done['data']['run']}", "agent_cfg"
    )
    assert json.loads(run) == {"model": "tenant-model", "api_key_env": "GATED_KEY"}  # type: ignore[arg-type]
