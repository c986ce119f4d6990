"""Operators' changes reaching open connections in a real cluster: disabling a tenant closes
its connections with 4003 within seconds (others stay open), and after a secret rotation a
token signed with the old secret works during the grace and is refused, and its connections
closed with 4001, once the grace is over. Each test makes its own tenant."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from client.connection import SwitchboardClient, SwitchboardClosed
from realtime.control import TENANT_DISABLED
from tenants.tokens import SECRET_ROTATED

from .conftest import TENANT, Connect, Switchboard
from .support import wait_until

pytestmark = pytest.mark.asyncio

# A change is announced at once; without the message a gateway would still apply it within
# TENANT_CACHE_S (0.3 s here) + TENANT_CHECK_S (2 s). Generous for a loaded machine.
CLOSE_WITHIN_S = 10.0


def new_tenant(switchboard: Switchboard, unique: Callable[[str], str]) -> str:
    slug = unique("ops")
    assert switchboard.cluster.manage("create_tenant", slug) == f"tenant {slug} created"
    return slug


async def test_disabling_a_tenant_closes_its_connections_with_4003(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    slug = new_tenant(switchboard, unique)
    doomed = [await connect(tenant=slug), await connect(tenant=slug)]
    bystander = await connect(tenant=TENANT)

    # What the admin's save does: save the row, then announce it once committed.
    switchboard.shell(
        "from tenants.announcements import announce_tenant_change\n"
        "from tenants.models import Tenant\n"
        f"tenant = Tenant.objects.get(slug={slug!r})\n"
        "tenant.enabled = False\n"
        "tenant.save()\n"
        "announce_tenant_change(tenant.slug, 'disabled')\n"
    )
    for client in doomed:
        assert await client.wait_closed(timeout=CLOSE_WITHIN_S) == 4003
        assert client.close_reason == TENANT_DISABLED
    assert (await bystander.ping())["type"] == "pong"
    # And a new connection of the tenant is refused, as before.
    with pytest.raises(SwitchboardClosed) as refused:
        await SwitchboardClient.connect(switchboard.url, switchboard.token("late", tenant=slug))
    assert (refused.value.code, refused.value.reason) == (4001, "tenant disabled")


async def test_an_old_secret_works_during_the_grace_and_not_after(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    slug = new_tenant(switchboard, unique)
    old_token = switchboard.token("old-1", tenant=slug)
    before = await connect(token=old_token)

    switchboard.shell(
        "from tenants.announcements import announce_tenant_change\n"
        "from tenants.models import Tenant\n"
        f"tenant = Tenant.objects.get(slug={slug!r})\n"
        "tenant.rotate_signing_secret()\n"
        "announce_tenant_change(tenant.slug, 'rotated')\n"
    )
    new_token = switchboard.token("new-1", tenant=slug)  # signed with the new secret

    async def connected_with_new() -> SwitchboardClient | None:
        try:
            return await connect(token=new_token)
        except SwitchboardClosed:
            return None  # a gateway that has not heard yet (at most the cache's 0.3 s)

    after = await wait_until(connected_with_new, CLOSE_WITHIN_S, "the new secret to work")
    during = await connect(token=old_token)  # the old secret, within the grace
    assert during.welcome["tenant"] == slug
    assert (await before.ping())["type"] == "pong"

    # The grace is over: moved by the clock of the row, not by waiting for it.
    switchboard.shell(
        "from datetime import timedelta\n"
        "from django.conf import settings\n"
        "from django.utils import timezone\n"
        "from tenants.announcements import announce_tenant_change\n"
        "from tenants.models import Tenant\n"
        "grace = settings.SWITCHBOARD['SECRET_ROTATION_GRACE_S']\n"
        f"Tenant.objects.filter(slug={slug!r}).update(\n"
        "    secret_rotated_at=timezone.now() - timedelta(seconds=grace + 1))\n"
        f"announce_tenant_change({slug!r}, 'grace over')\n"
    )
    for client in (before, during):
        assert await client.wait_closed(timeout=CLOSE_WITHIN_S) == 4001
        assert client.close_reason == SECRET_ROTATED

    async def refused() -> SwitchboardClosed | None:
        try:
            opened = await SwitchboardClient.connect(switchboard.url, old_token)
        except SwitchboardClosed as closed:
            return closed
        await opened.close()
        return None

    closed = await wait_until(refused, CLOSE_WITHIN_S, "the old secret to be refused")
    assert (closed.code, closed.reason, closed.frames) == (4001, SECRET_ROTATED, [])
    assert (await after.ping())["type"] == "pong"


async def test_the_live_page_hears_the_clusters_workers(switchboard: Switchboard) -> None:
    # The inquiry the live page makes, from a process of the cluster (its broker).
    answer = switchboard.shell(
        "import json\nfrom console.live import read_workers\nprint(json.dumps(read_workers()))\n"
    )
    workers = json.loads(answer.splitlines()[-1])
    assert workers["answered"] is True, workers
    assert [worker["name"].split("@")[0] for worker in workers["workers"]] == ["worker-0"]
