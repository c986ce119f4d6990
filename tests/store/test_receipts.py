"""Receipts (streams/receipts.py, RECORD_RECEIPT) on a real Redis, and the admin page that
shows them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aredis
from django.test import Client

from streams import keys
from streams.receipts import RECEIPT_TTL_S, BeyondHead, ReceiptStore, tenant_receipts
from tenants.models import Tenant
from tests.store.conftest import TENANT, Streams

T = TypeVar("T")
OTHER = "globex"


class Receipts:
    """The gateway's async ReceiptStore, driven from sync tests: one event loop per call."""

    def __init__(self, url: str, ttl_s: int = RECEIPT_TTL_S) -> None:
        self.url = url
        self.ttl_s = ttl_s

    def run(self, work: Callable[[ReceiptStore], Awaitable[T]]) -> T:
        async def main() -> T:
            client = aredis.Redis.from_url(self.url)
            try:
                return await work(ReceiptStore(client, self.ttl_s))
            finally:
                await client.aclose()

        return asyncio.run(main())

    def record(self, stream: str, client: str, seq: int, tenant: str = TENANT) -> tuple[bool, int]:
        recorded = self.run(lambda store: store.record(tenant, stream, client, seq))
        return recorded.moved, recorded.seq

    def read(
        self, stream: str, client: str | None = None, tenant: str = TENANT
    ) -> tuple[int, dict[str, int]]:
        found = self.run(lambda store: store.read(tenant, stream, client))
        assert found.stream == stream
        return found.head, found.receipts


@pytest.fixture
def receipts(r: redis.Redis, store_redis_url: str) -> Receipts:
    return Receipts(store_redis_url)


def publish(streams: Streams, stream: str, count: int, tenant: str = TENANT) -> None:
    for n in range(count):
        streams.publish(stream, f"{stream}-{n}", {"n": n}, tenant=tenant)


def test_a_receipt_only_moves_forward(streams: Streams, receipts: Receipts) -> None:
    publish(streams, "room", 5)
    assert receipts.record("room", "alice", 2) == (True, 2)
    assert receipts.record("room", "alice", 4) == (True, 4)
    # Late or reordered receipts: ignored, and the answer says where the receipt stands.
    assert receipts.record("room", "alice", 3) == (False, 4)
    assert receipts.record("room", "alice", 0) == (False, 4)
    assert receipts.record("room", "alice", 4) == (False, 4)
    assert receipts.read("room") == (5, {"alice": 4})
    assert receipts.record("room", "alice", 5) == (True, 5)
    assert receipts.read("room") == (5, {"alice": 5})


def test_receipts_are_per_client(streams: Streams, receipts: Receipts) -> None:
    publish(streams, "room", 3)
    receipts.record("room", "bob", 3)
    receipts.record("room", "alice", 1)
    receipts.record("room", "carol", 2)
    head, found = receipts.read("room")
    assert head == 3
    assert list(found.items()) == [("alice", 1), ("bob", 3), ("carol", 2)]  # by client
    assert receipts.read("room", client="carol") == (3, {"carol": 2})
    assert receipts.read("room", client="nobody") == (3, {})


def test_a_receipt_beyond_the_head_is_refused_and_records_nothing(
    streams: Streams, receipts: Receipts, r: redis.Redis
) -> None:
    with pytest.raises(BeyondHead) as empty:
        receipts.record("fresh", "alice", 1)
    assert (empty.value.seq, empty.value.head) == (1, 0)
    assert r.exists(keys.receipts(TENANT, "fresh"), keys.receipt_index(TENANT)) == 0

    publish(streams, "room", 3)
    receipts.record("room", "alice", 2)
    with pytest.raises(BeyondHead) as beyond:
        receipts.record("room", "alice", 4)
    assert (beyond.value.seq, beyond.value.head) == (4, 3)
    with pytest.raises(BeyondHead):
        receipts.record("room", "alice", 10**30)  # larger than any Lua integer
    assert receipts.read("room") == (3, {"alice": 2})
    assert receipts.record("room", "alice", 3) == (True, 3)  # the head itself is fine


def test_a_receipt_of_seq_0_writes_nothing(
    streams: Streams, receipts: Receipts, r: redis.Redis
) -> None:
    """Seq 0 is where every client starts: recording it on a stream with no events (stream
    names are the clients' to choose) would let one socket create a 30-day key per name."""
    before = r.dbsize()
    for n in range(50):
        assert receipts.record(f"never-written-{n}", "alice", 0) == (False, 0)
    assert r.dbsize() == before
    assert r.exists(keys.receipt_index(TENANT)) == 0

    publish(streams, "room", 2)
    assert receipts.record("room", "alice", 0) == (False, 0)
    assert r.exists(keys.receipts(TENANT, "room"), keys.receipt_index(TENANT)) == 0
    assert receipts.record("room", "alice", 1) == (True, 1)


def test_receipts_are_per_tenant(streams: Streams, receipts: Receipts, r: redis.Redis) -> None:
    publish(streams, "room", 4)
    publish(streams, "room", 2, tenant=OTHER)
    receipts.record("room", "alice", 4)
    # The other tenant's stream of the same name has its own head and receipts.
    with pytest.raises(BeyondHead):
        receipts.record("room", "alice", 3, tenant=OTHER)
    receipts.record("room", "alice", 1, tenant=OTHER)
    assert receipts.read("room") == (4, {"alice": 4})
    assert receipts.read("room", tenant=OTHER) == (2, {"alice": 1})
    assert receipts.read("room", tenant="initech") == (0, {})
    assert r.zrange(keys.receipt_index(TENANT), 0, -1) == [b"room"]
    assert r.zrange(keys.receipt_index(OTHER), 0, -1) == [b"room"]


def test_the_index_lists_the_tenants_streams_with_receipts(
    streams: Streams, receipts: Receipts, r: redis.Redis
) -> None:
    for stream in ("a", "b:c/d", "e"):
        publish(streams, stream, 2)
    publish(streams, "quiet", 2)
    publish(streams, "elsewhere", 2, tenant=OTHER)
    receipts.record("a", "alice", 1)
    receipts.record("b:c/d", "bob", 2)
    receipts.record("e", "alice", 2)
    receipts.record("elsewhere", "alice", 2, tenant=OTHER)
    # Newest first; receipts written within one second tie, so compare as sets as well.
    r.zadd(keys.receipt_index(TENANT), {"a": time.time() - 10})
    total, listed = tenant_receipts(r, TENANT)
    assert total == 3
    assert {entry.stream for entry in listed} == {"a", "b:c/d", "e"}
    assert listed[-1].stream == "a"
    by_stream = {entry.stream: entry for entry in listed}
    assert by_stream["b:c/d"].head == 2 and by_stream["b:c/d"].receipts == {"bob": 2}
    assert by_stream["a"].receipts == {"alice": 1}
    assert all(entry.updated_at is not None for entry in listed)

    total, listed = tenant_receipts(r, TENANT, limit=1)
    assert total == 3 and len(listed) == 1 and listed[0].stream != "a"
    assert tenant_receipts(r, "initech") == (0, [])


def test_receipts_expire_with_their_stream_index_entry(
    streams: Streams, receipts: Receipts, r: redis.Redis
) -> None:
    publish(streams, "room", 3)
    receipts.record("room", "alice", 2)
    ttl_key, ttl_index = keys.receipts(TENANT, "room"), keys.receipt_index(TENANT)
    assert RECEIPT_TTL_S - 5 < r.ttl(ttl_key) <= RECEIPT_TTL_S
    assert RECEIPT_TTL_S - 5 < r.ttl(ttl_index) <= RECEIPT_TTL_S
    # An ignored receipt still says the client is active: the TTLs start over.
    r.expire(ttl_key, 100)
    r.expire(ttl_index, 100)
    assert receipts.record("room", "alice", 1) == (False, 2)
    assert r.ttl(ttl_key) > 100 and r.ttl(ttl_index) > 100

    # A stream whose receipts expired is no longer listed, and the next receipt of the
    # tenant drops it from the index.
    r.zadd(ttl_index, {"gone": time.time() - RECEIPT_TTL_S - 60})
    total, listed = tenant_receipts(r, TENANT)
    assert (total, [entry.stream for entry in listed]) == (1, ["room"])
    receipts.record("room", "alice", 3)
    assert r.zrange(ttl_index, 0, -1) == [b"room"]


def test_an_index_entry_whose_receipts_vanished_is_not_listed(
    streams: Streams, receipts: Receipts, r: redis.Redis
) -> None:
    publish(streams, "room", 1)
    receipts.record("room", "alice", 1)
    r.delete(keys.receipts(TENANT, "room"))
    assert tenant_receipts(r, TENANT) == (1, [])


# --- the admin -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_shows_a_tenants_receipts_from_redis(
    admin_client: Client, streams: Streams, receipts: Receipts
) -> None:
    tenant = Tenant.objects.create(slug=TENANT)
    Tenant.objects.create(slug=OTHER)
    publish(streams, "support:42", 7)
    receipts.record("support:42", "alice-agent", 5)
    receipts.record("support:42", "bob-customer", 7)
    publish(streams, "secret-room", 3, tenant=OTHER)
    receipts.record("secret-room", "mallory", 3, tenant=OTHER)

    listing = admin_client.get("/admin/tenants/tenant/")
    assert listing.status_code == 200
    url = f"/admin/tenants/tenant/{tenant.pk}/receipts/"
    assert url in listing.content.decode()
    assert url in admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()

    page = admin_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "support:42" in html and "head 7" in html
    for client, seq, behind in (("alice-agent", 5, 2), ("bob-customer", 7, 0)):
        assert f"<td>{client}</td><td>{seq}</td><td>{behind}</td>" in html
    assert "secret-room" not in html and "mallory" not in html


@pytest.mark.django_db
def test_the_admin_says_when_a_tenant_has_no_receipts(admin_client: Client, r: redis.Redis) -> None:
    tenant = Tenant.objects.create(slug="initech")
    page = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/receipts/")
    assert page.status_code == 200
    assert "No stream of this tenant has receipts" in page.content.decode()
    assert admin_client.get("/admin/tenants/tenant/999999/receipts/").status_code == 404


@pytest.mark.django_db
def test_the_receipts_page_is_for_staff_only(client: Client, r: redis.Redis) -> None:
    tenant = Tenant.objects.create(slug=TENANT)
    page = client.get(f"/admin/tenants/tenant/{tenant.pk}/receipts/")
    assert page.status_code == 302 and "/admin/login/" in page["Location"]
