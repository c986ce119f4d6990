"""Operating Switchboard from the admin, against a real Redis: the live page and its JSON
with data written by the real code paths (sends, a claimed run, a swept run, connections,
presence, refusals), failures shown as a banner, staff only; tenant changes announced by the
admin and applied to a gateway's open connections (control message, periodic check)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aredis
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from redis.backoff import NoBackoff
from redis.retry import Retry

from console import admin as console_admin
from console import live
from console.live import snapshot
from realtime.admission import ConnectionRegistry
from realtime.control import TENANT_DISABLED, TenantControl
from realtime.presence import PresenceStore
from realtime.throttles import ThrottleCounter
from streams import keys
from streams.runs import RunStore
from tenants.announcements import announce_tenant_change
from tenants.config import TenantCache, load_tenant
from tenants.models import Tenant
from tenants.tokens import SECRET_ROTATED, Identity

from .conftest import CLIENT, TENANT, Streams

T = TypeVar("T")

LIVE_URL = "/admin/tenants/tenant/live/"
DATA_URL = "/admin/tenants/tenant/live/data/"
WAIT_S = 10.0
GRACE_S = settings.SWITCHBOARD["SECRET_ROTATION_GRACE_S"]


@pytest.fixture(autouse=True)
def quick_inquiry(monkeypatch: pytest.MonkeyPatch) -> None:
    # No worker runs in these tests: the broadcast would wait its whole timeout each time.
    monkeypatch.setattr(live, "INSPECT_TIMEOUT_S", 0.2)


def on_redis(url: str, work: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aredis.Redis.from_url(url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def fill(streams: Streams, runs: RunStore, url: str) -> dict[str, str]:
    """A queued run, a claimed (running) one, one the sweeper failed, an open connection, a
    present client and two refusals: each written the way the gateway or a worker does."""
    queued = streams.send("room", "m1", "hi")
    running = streams.send("room", "m2", "hi")
    failed = streams.send("room", "m3", "hi")
    assert queued.run_id and running.run_id and failed.run_id
    assert runs.claim(running.run_id, 0) is not None
    # What the deadline sweep writes (orchestration/sweeping.py).
    assert runs.finalize(failed.run_id, "failed", {"reason": "deadline"})

    config = load_tenant(TENANT)
    assert config is not None

    async def gateway(client: aredis.Redis) -> None:
        assert await ConnectionRegistry(lambda: client).admit(config, CLIENT, "conn-1") is None
        await PresenceStore(client, "g1", 30).join(TENANT, "room", CLIENT, "Alice")
        throttles = ThrottleCounter(lambda: client)
        throttles.count(TENANT, "messages")
        throttles.count(TENANT, "messages")
        throttles.count(TENANT, "connections")
        await throttles.flush()

    on_redis(url, gateway)
    return {"queued": queued.run_id, "running": running.run_id, "failed": failed.run_id}


@pytest.fixture
def tenant(db: None) -> Tenant:
    return Tenant.objects.create(slug=TENANT, weight=3)


def live_data(client: Client) -> dict[str, Any]:
    answer = client.get(DATA_URL)
    assert answer.status_code == 200, answer.content[:500]
    assert answer["Content-Type"] == "application/json"
    return answer.json()


def test_the_live_data_shows_what_redis_holds(
    admin_client: Client, tenant: Tenant, streams: Streams, runs: RunStore, store_redis_url: str
) -> None:
    made = fill(streams, runs, store_redis_url)
    # Fair tickets are Celery messages: the depth is the queue list's length.
    data = live_data(admin_client)
    assert data["errors"] == []

    depths = {entry["queue"]: entry["depth"] for entry in data["celery"]["queues"]}
    assert depths == {"switchboard.runs": 3, "switchboard.maintenance": 0}
    # The weight the sends wrote (the test's sends give none: 1), not the database's 3.
    assert [(f["tenant"], f["queued"], f["weight"]) for f in data["fair"]] == [(TENANT, 3, 1.0)]

    assert data["runs"]["total"] == 2  # the failed one is finished
    by_run = {run["run"]: run for run in data["runs"]["shown"]}
    assert set(by_run) == {made["queued"], made["running"]}
    running = by_run[made["running"]]
    assert (running["tenant"], running["agent"], running["status"], running["step"]) == (
        TENANT,
        "echo",
        "running",
        0,
    )
    assert running["age_s"] >= 0 and running["lease_left_s"] > 0 and running["attempt"] == 1
    assert running["worker"]  # host:pid of the claim
    assert by_run[made["queued"]]["status"] == "queued"
    assert by_run[made["queued"]]["lease_left_s"] is None

    problem = data["problems"][0]
    assert (problem["run"], problem["tenant"], problem["status"], problem["reason"]) == (
        made["failed"],
        TENANT,
        "failed",
        "deadline",
    )

    # The finished run waits in the history outbox for the persister.
    assert data["history"] == {"waiting": 1, "processing": 0, "dropped": 0}

    row = {row["slug"]: row for row in data["tenants"]}[TENANT]
    assert (row["enabled"], row["weight"], row["connections"]) == (True, 3, 1)
    assert (row["present"], row["presence_streams"], row["fair_queue"]) == (1, 1, 3)
    assert (row["unfinished"], row["throttled"]) == (2, 3)

    throttles = {(t["tenant"], t["reason"]): t for t in data["throttles"]["rows"]}
    assert throttles[(TENANT, "messages")]["counts"][-1] == 2
    assert throttles[(TENANT, "connections")]["total"] == 1
    assert len(data["throttles"]["minutes"]) == live.THROTTLE_MINUTES_SHOWN

    assert data["workers"]["answered"] is False  # no worker in this test
    assert data["workers"]["note"]


def test_the_live_page_embeds_the_data_and_refreshes_from_the_endpoint(
    admin_client: Client, tenant: Tenant, streams: Streams, runs: RunStore, store_redis_url: str
) -> None:
    made = fill(streams, runs, store_redis_url)
    page = admin_client.get(LIVE_URL)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="live-initial"' in html and made["running"] in html
    assert f'data-url="{DATA_URL}"' in html
    assert "fetch(dataUrl" in html  # refreshed by the page's script, not by reloading
    # Linked from the tenants' list.
    assert LIVE_URL in admin_client.get("/admin/tenants/tenant/").content.decode()


def test_nothing_recent_is_an_empty_list(
    admin_client: Client, tenant: Tenant, r: redis.Redis
) -> None:
    data = live_data(admin_client)
    assert data["errors"] == []
    assert (data["problems"], data["runs"]["shown"], data["fair"]) == ([], [], [])
    assert data["throttles"]["rows"] == []


def test_unreadable_entries_of_the_problem_list_are_skipped(
    admin_client: Client, tenant: Tenant, r: redis.Redis
) -> None:
    entry = {"run": "r1", "tenant": TENANT, "status": "degraded", "reason": "timeout"}
    r.sadd(keys.TENANTS, TENANT)
    r.lpush(keys.recent_problems(TENANT), json.dumps(entry), b"not json", b"[1]")
    problems = live_data(admin_client)["problems"]
    assert [(p["run"], p["status"], p["reason"], p["agent"]) for p in problems] == [
        ("r1", "degraded", "timeout", None)
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_redis_unreachable_is_a_banner_not_a_500(
    admin_client: Client, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(console_admin, "sync_client", lambda: dead)
    data = live_data(admin_client)
    assert any(error.startswith("Redis could not be read") for error in data["errors"])
    assert [row["slug"] for row in data["tenants"]] == []
    page = admin_client.get(LIVE_URL)
    assert page.status_code == 200
    assert "Redis could not be read" in page.content.decode()


def test_workers_that_cannot_be_asked_are_a_banner(r: redis.Redis) -> None:
    def broker_down() -> dict[str, Any] | None:
        raise ConnectionError("broker unreachable")

    data = snapshot(r, [], 0, ask_workers=broker_down)
    assert data["errors"] == ["Celery workers could not be asked: broker unreachable"]
    assert data["celery"] is not None  # what Redis answered is still shown


def test_worker_answers_name_the_run_each_process_runs(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    sent = streams.send("room", "m1", "hi")
    assert sent.run_id
    claimed = runs.claim(sent.run_id, 0)
    assert claimed is not None
    host, pid = r.hget(keys.run(sent.run_id), "worker").decode().rsplit(":", 1)

    def answers() -> dict[str, Any]:
        task = {"id": "t1", "name": "switchboard.run.next", "args": [], "worker_pid": int(pid)}
        return {f"worker-0@{host}": [task], f"worker-1@{host}": []}

    data = snapshot(r, [], 0, ask_workers=answers)
    workers = {worker["name"]: worker for worker in data["workers"]["workers"]}
    assert data["workers"]["answered"] is True
    assert workers[f"worker-1@{host}"]["tasks"] == []
    task = workers[f"worker-0@{host}"]["tasks"][0]
    assert (task["task"], task["run"], task["tenant"], task["step"]) == (
        "switchboard.run.next",
        sent.run_id,
        TENANT,
        0,
    )


@pytest.mark.django_db
def test_the_live_pages_are_for_staff_with_view_permission(client: Client, r: redis.Redis) -> None:
    for url in (LIVE_URL, DATA_URL):
        answer = client.get(url)
        assert answer.status_code == 302 and "/admin/login/" in answer["Location"], url
    user = User.objects.create_user("visitor", password="x")
    client.force_login(user)
    for url in (LIVE_URL, DATA_URL):
        answer = client.get(url)
        assert answer.status_code == 302 and "/admin/login/" in answer["Location"], url
    user.is_staff = True
    user.save()
    for url in (LIVE_URL, DATA_URL):
        assert client.get(url).status_code == 403, url


# --- announcing tenant changes --------------------------------------------------------


@pytest.fixture
def control_messages(r: redis.Redis) -> Iterator[Callable[[int], list[dict[str, Any]]]]:
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.TENANT_CONTROL)

    def received(count: int) -> list[dict[str, Any]]:
        """The next `count` messages (waiting for them, at most WAIT_S)."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT_S
        while len(messages) < count and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)  # None for the subscribe confirmation
            if message is not None:
                messages.append(json.loads(message["data"]))
        return messages

    yield received
    pubsub.close()


def test_the_admin_announces_a_disable_and_a_rotation(
    admin_client: Client,
    tenant: Tenant,
    control_messages: Callable[[int], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    data = {
        "slug": TENANT,
        "all_agents": "on",
        "agent_grants-TOTAL_FORMS": 0,
        "agent_grants-INITIAL_FORMS": 0,
        **tenant.limits(),
        "weight": 3,
        "max_causal_depth": 3,
        "max_token_lifetime_s": tenant.max_token_lifetime_s,
        "daily_token_budget": 0,
        "monthly_token_budget": 0,
    }  # "enabled" left out: unticked
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", data)
    assert page.status_code == 302, page.content.decode()
    assert not Tenant.objects.get(pk=tenant.pk).enabled
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/rotate-secret/")
    assert page.status_code == 200
    assert control_messages(2) == [
        {"tenant": TENANT, "why": "disabled"},
        {"tenant": TENANT, "why": "rotated"},
    ]


# --- a gateway applying them (TenantControl) -----------------------------------------


class FakeConnection:
    """What TenantControl sees of a GatewayConsumer; remembers how it was closed."""

    def __init__(self, tenant: str, secret: str, name: str) -> None:
        self.identity = Identity(tenant, name, None, None, 0, secret=secret)
        self.connection_id = name
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def close_with(self, code: int, reason: str, save_session: bool = True) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))


async def closed_within(connection: FakeConnection) -> tuple[int, str]:
    return await asyncio.wait_for(asyncio.shield(connection.closed), WAIT_S)


async def wait_for(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.02)


def in_thread(work: Callable[[], T]) -> Awaitable[T]:
    # The ORM is sync-only; the test database is shared with other threads (transactional).
    return asyncio.to_thread(work)


def test_a_control_message_closes_the_disabled_tenants_connections_at_once(
    transactional_db: None, r: redis.Redis, store_redis_url: str
) -> None:
    acme = Tenant.objects.create(slug=TENANT)
    other = Tenant.objects.create(slug="globex")

    async def main() -> None:
        cache = TenantCache(ttl_s=3600)  # only the message can make it read again
        control = TenantControl(cache, lambda: aredis.Redis.from_url(store_redis_url), check_s=3600)
        mine = FakeConnection(TENANT, acme.signing_secret, "a1")
        theirs = FakeConnection("globex", other.signing_secret, "g1")
        try:
            control.watch(mine)
            control.watch(theirs)
            await control.check_all()  # loads both into the cache: enabled
            assert not mine.closed.done()
            await wait_for(lambda: r.pubsub_numsub(keys.TENANT_CONTROL)[0][1] >= 1, "the listener")
            await in_thread(lambda: Tenant.objects.filter(slug=TENANT).update(enabled=False))
            assert await in_thread(lambda: announce_tenant_change(TENANT, "disabled"))
            assert await closed_within(mine) == (4003, TENANT_DISABLED)
            assert control.connections(TENANT) == []
            assert not theirs.closed.done()
            assert control.connections("globex") == [theirs]
        finally:
            await control.close()

    asyncio.run(main())


def test_the_periodic_check_ends_a_grace_and_catches_a_silent_disable(
    transactional_db: None, store_redis_url: str
) -> None:
    tenant = Tenant.objects.create(slug=TENANT)
    old = tenant.signing_secret
    new = tenant.rotate_signing_secret()

    async def main() -> None:
        cache = TenantCache(ttl_s=0)  # every check reads the database
        # Checked every 50 ms, and the test's own checks besides: no message is sent here.
        control = TenantControl(cache, lambda: aredis.Redis.from_url(store_redis_url), 0.05)
        before = FakeConnection(TENANT, old, "before-rotation")
        after = FakeConnection(TENANT, new, "after-rotation")
        try:
            control.watch(before)
            control.watch(after)
            await control.check_all()
            assert not before.closed.done(), "within the grace"

            past = timezone.now() - timedelta(seconds=GRACE_S + 1)
            await in_thread(
                lambda: Tenant.objects.filter(slug=TENANT).update(secret_rotated_at=past)
            )
            await control.check_all()
            assert await closed_within(before) == (4001, SECRET_ROTATED)
            assert not after.closed.done()

            # Disabled with no message at all: the timer's check finds it.
            await in_thread(lambda: Tenant.objects.filter(slug=TENANT).update(enabled=False))
            assert await closed_within(after) == (4003, TENANT_DISABLED)
        finally:
            await control.close()

    asyncio.run(main())


def test_the_admin_front_page_links_the_live_page_for_those_who_may_see_it(
    admin_client: Client, client: Client
) -> None:
    front = admin_client.get("/admin/")
    assert front.status_code == 200
    assert LIVE_URL in front.content.decode()
    staff = User.objects.create_user("staff-without-rights", password="x", is_staff=True)
    client.force_login(staff)
    assert LIVE_URL not in client.get("/admin/").content.decode()
