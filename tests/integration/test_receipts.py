"""Receipts end to end: recorded over the WebSocket, read over the gateway's own HTTP port
(`GET /api/v1/receipts`), with the same tokens and the same tenant and stream rules."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from client.connection import SwitchboardClient
from tenants.tokens import issue_token

from .conftest import OTHER_TENANT, TENANT, Connect, Switchboard
from .support import take

pytestmark = pytest.mark.asyncio

DISABLED_TENANT = "receipts-off"


async def http(
    switchboard: Switchboard,
    params: dict[str, str],
    token: str | None = None,
    method: str = "GET",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of one request to the receipts endpoint."""
    netloc = urlsplit(switchboard.url).netloc
    url = f"http://{netloc}/api/v1/receipts?{urlencode(params)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def fetch() -> tuple[int, dict[str, Any], dict[str, str]]:
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read()), dict(error.headers)

    return await asyncio.to_thread(fetch)


async def published(client: SwitchboardClient, stream: str, count: int) -> None:
    """Publish `count` events and wait until the client has them all."""
    for n in range(count):
        await client.publish(stream, {"n": n})
    await take(client, stream, count)


async def test_receipts_sent_over_the_websocket_are_read_over_http(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("support:ticket/7+a")  # ':', '/' and '+' travel percent-encoded
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await connect(client=alice_id)
    bob = await connect(client=bob_id)
    await alice.subscribe(stream)
    await bob.subscribe(stream)
    await published(alice, stream, 4)
    await take(bob, stream, 4)
    await alice.receipt(stream, 4)
    await bob.receipt(stream, 2)
    await alice.ping()  # frames are handled in order: the receipts are recorded
    await bob.ping()
    assert alice.unread_frames() == [] and bob.unread_frames() == []

    token = switchboard.token(unique("reader"), streams=["support:*"])
    status, body, headers = await http(switchboard, {"stream": stream}, token)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert body == {
        "stream": stream,
        "head": 4,
        "receipts": sorted(
            [{"client": alice_id, "seq": 4}, {"client": bob_id, "seq": 2}],
            key=lambda receipt: receipt["client"],
        ),
    }
    # One client's receipt; the token may come in the query string as well.
    status, body, _ = await http(switchboard, {"stream": stream, "client": bob_id, "token": token})
    assert (status, body) == (
        200,
        {"stream": stream, "head": 4, "receipts": [{"client": bob_id, "seq": 2}]},
    )
    status, body, _ = await http(switchboard, {"stream": stream, "client": "nobody"}, token)
    assert (status, body["receipts"]) == (200, [])


async def test_a_receipt_moving_backwards_is_ignored(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("backwards")
    client_id = unique("reader")
    client = await connect(client=client_id)
    await client.subscribe(stream)
    await published(client, stream, 5)
    for seq in (3, 5, 4, 1):  # a late, reordered pair: neither undoes the 5
        await client.receipt(stream, seq)
    await client.ping()
    assert client.unread_frames() == []  # ignored quietly, not an error
    status, body, _ = await http(switchboard, {"stream": stream}, switchboard.token(client_id))
    assert (status, body["receipts"]) == (200, [{"client": client_id, "seq": 5}])


async def test_a_receipt_beyond_the_head_is_refused(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("ahead")
    client_id = unique("reader")
    client = await connect(client=client_id)
    await client.subscribe(stream)
    await published(client, stream, 2)
    await client.receipt(stream, 1)
    await client.receipt(stream, 3)
    error = await client.recv_frame()
    assert error["type"] == "error"
    assert (error["code"], error["status"], error["id"]) == ("bad_request", 400, None)
    assert (error["stream"], error["head"]) == (stream, 2)
    assert (await client.ping())["type"] == "pong"  # the connection goes on
    status, body, _ = await http(switchboard, {"stream": stream}, switchboard.token(client_id))
    assert (status, body["head"], body["receipts"]) == (200, 2, [{"client": client_id, "seq": 1}])


async def test_another_tenant_sees_nothing_of_a_streams_receipts(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("shared-name")
    client = await connect()
    await client.subscribe(stream)
    await published(client, stream, 3)
    await client.receipt(stream, 3)
    await client.ping()
    outsider = switchboard.token(unique("outsider"), tenant=OTHER_TENANT)
    status, body, _ = await http(switchboard, {"stream": stream}, outsider)
    assert (status, body) == (200, {"stream": stream, "head": 0, "receipts": []})


async def test_a_token_for_other_streams_is_forbidden(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("private")
    client = await connect()
    await client.subscribe(stream)
    await published(client, stream, 1)
    await client.receipt(stream, 1)
    await client.ping()
    token = switchboard.token(unique("limited"), streams=["lobby", "public:*"])
    status, body, _ = await http(switchboard, {"stream": stream}, token)
    assert status == 403
    assert body == {
        "type": "error",
        "id": None,
        "code": "forbidden",
        "status": 403,
        "detail": f"token does not allow stream {stream!r}",
    }


async def test_bad_tokens_are_unauthorized(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    switchboard.shell(
        "from tenants.models import Tenant\n"
        f"Tenant.objects.get_or_create(slug={DISABLED_TENANT!r}, defaults={{'enabled': False}})"
    )
    secret = switchboard.secret(TENANT)
    cases = {
        "missing token": None,
        "malformed token": "not-a-jwt",
        "bad signature": issue_token("a-secret-that-is-not-the-tenants-" * 2, TENANT, "x"),
        "token expired": issue_token(secret, TENANT, "x", ttl_s=-60),
        "unknown tenant": issue_token(secret, "no-such-tenant", "x"),
        "tenant disabled": issue_token(switchboard.secret(DISABLED_TENANT), DISABLED_TENANT, "x"),
    }
    for detail, token in cases.items():
        status, body, headers = await http(switchboard, {"stream": unique("s")}, token)
        assert status == 401, (detail, body)
        assert body == {
            "type": "error",
            "id": None,
            "code": "unauthorized",
            "status": 401,
            "detail": detail,
        }
        assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_bad_requests(switchboard: Switchboard, unique: Callable[[str], str]) -> None:
    token = switchboard.token(unique("reader"))
    for params in ({}, {"stream": ""}, {"stream": "-starts-badly"}, {"stream": "a b"}):
        status, body, _ = await http(switchboard, params, token)
        assert (status, body["code"], body["status"]) == (400, "bad_request", 400), params
    status, body, _ = await http(switchboard, {"stream": "s", "client": "x" * 201}, token)
    assert (status, body["code"]) == (400, "bad_request")
    for method in ("POST", "PUT", "DELETE"):
        status, body, headers = await http(switchboard, {"stream": "s"}, token, method)
        assert (status, body["code"], body["status"]) == (405, "method_not_allowed", 405), method
        assert headers["Allow"] == "GET"
