"""Hostile clients over real sockets: what one sends may cost the gateway, Redis and the
workers only a bounded amount, and nothing of it reaches other tenants.

Each test here failed before its bound existed (docs/guarantees.md lists them)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
import pytest

from client.connection import SwitchboardClient, SwitchboardClosed, SwitchboardError
from tenants.tokens import MAX_TOKEN_CHARS, issue_token

from .conftest import (
    FRUGAL_TENANT,
    NARROW_TENANT,
    REHEARSAL_TENANT,
    TENANT,
    Connect,
    StartGateway,
    Switchboard,
)
from .support import collect_run, split_run
from .test_metrics import scrape, value

pytestmark = pytest.mark.asyncio

# Handshakes and requests in flight at once from the tests' flood.
FLOOD_CONCURRENCY = 20
# How many made-up tenants one gateway remembers as "no such tenant" in these tests.
MISSES_KEPT = 50


def forged_token(tenant: str, client: str = "mallory") -> str:
    """A token naming `tenant`, signed with a secret nobody has."""
    claims = {"sub": client, "tnt": tenant, "exp": int(time.time()) + 600}
    return jwt.encode(claims, secrets.token_urlsafe(32), algorithm="HS256")


def random_slug() -> str:
    """Shaped like a tenant slug (so it is looked up), and never a tenant."""
    return "x" + secrets.token_hex(31)


async def flood(work: Iterable[Callable[[], Awaitable[None]]]) -> None:
    gate = asyncio.Semaphore(FLOOD_CONCURRENCY)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(one(job) for job in work))


async def refused_handshake(url: str, token: str) -> SwitchboardClosed:
    with pytest.raises(SwitchboardClosed) as refused:
        await SwitchboardClient.connect(url, token)
    assert refused.value.code == 4001, refused.value
    return refused.value


def receipts_status(port: int, token: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/receipts?stream=s",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


async def test_garbage_tokens_cost_a_bounded_tenant_cache(
    switchboard: Switchboard, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Thousands of handshakes and API requests naming made-up tenants, with any signature:
    a slug of the wrong shape is never looked up, each well-shaped one is read from the
    database once, and the gateway remembers at most MISSES_KEPT of them."""
    metrics_dir = tmp_path / "metrics"  # this gateway's metrics alone
    metrics_dir.mkdir()
    url, gateway = start_gateway(
        SWITCHBOARD_TENANT_CACHE_MAX_MISSES=str(MISSES_KEPT),
        SWITCHBOARD_TENANT_CACHE_S="3600",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    port = gateway.port  # type: ignore[attr-defined]
    shaped = [random_slug() for _ in range(600)]
    garbage = [secrets.token_urlsafe(1500) for _ in range(200)]  # ~2 KB, not a slug
    too_long = [secrets.token_urlsafe(6200) for _ in range(20)]  # ~8 KB: token too long

    async def handshake(tenant: str, reason: str) -> None:
        closed = await refused_handshake(url, forged_token(tenant))
        assert closed.reason == reason, closed

    async def api_request(tenant: str) -> None:
        assert await asyncio.to_thread(receipts_status, port, forged_token(tenant)) == 401

    await flood(
        [lambda t=t: handshake(t, "unknown tenant") for t in shaped[:300] + garbage[:100]]
        + [
            lambda t=t: handshake(t, f"token longer than {MAX_TOKEN_CHARS} characters")
            for t in too_long
        ]
        + [lambda t=t: api_request(t) for t in shaped[300:] + garbage[100:]]
    )
    samples = await scrape(switchboard, gateway=len(switchboard.cluster.gateway_ports) - 1)
    # One database read per well-shaped slug, none for the rest ...
    assert value(samples, "switchboard_tenant_lookups_total", result="missing") == len(shaped)
    assert value(samples, "switchboard_tenant_lookups_total", result="found") == 0
    # ... and no more of them kept than the bound.
    assert value(samples, "switchboard_tenant_cache_entries", kind="missing") == MISSES_KEPT
    # The gateway still serves real tenants.
    client = await SwitchboardClient.connect(url, switchboard.token("after-flood"))
    try:
        assert (await client.ping())["type"] == "pong"
    finally:
        await client.close()


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sent before closing (b"" for nothing), or None while it is open."""
    try:
        answer = await asyncio.wait_for(reader.read(4096), timeout)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""
    return answer


async def trickle(port: int, first: bytes | None, lines: int, every_s: float) -> bytes | None:
    """Send `first`, then one more header line every `every_s` while the server listens
    (None: send nothing at all, just wait as long); returns what the server answered
    before closing, or None if it never did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first or b"")
        await writer.drain()
        for n in range(lines):
            answer = await read_answer(reader, every_s)
            if answer is not None:
                return answer
            if first is None:
                continue
            try:
                writer.write(f"X-Trickle-{n}: {n}\r\n".encode())
                await writer.drain()
            except ConnectionError:
                return b""
        return None
    finally:
        writer.close()


async def test_a_request_that_trickles_in_is_answered_408_and_closed(
    switchboard: Switchboard, start_gateway: StartGateway
) -> None:
    """Partial requests used to hold their sockets for ever (one header line every few
    seconds kept Twisted's idle timeout from firing). Every client here keeps trickling
    for far longer than the bound; each is cut off, answered 408."""
    url, gateway = start_gateway(SWITCHBOARD_REQUEST_TIMEOUT_S="2")
    port = gateway.port  # type: ignore[attr-defined]
    # A WebSocket's handshake was whole: it outlives the bound.
    connected = await SwitchboardClient.connect(url, switchboard.token("patient"))
    handshake = b"GET /ws/v1/?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    page = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    answers = await asyncio.gather(
        *(trickle(port, handshake, lines=60, every_s=0.5) for _ in range(30)),
        *(trickle(port, page, lines=60, every_s=0.5) for _ in range(10)),
        *(trickle(port, None, lines=60, every_s=0.5) for _ in range(10)),  # sends nothing
    )
    assert all(answer is not None for answer in answers), "a trickling client stayed open"
    assert {answer.split(b"\r\n")[0] for answer in answers} == {b"HTTP/1.1 408 Request Timeout"}
    assert (await connected.ping())["type"] == "pong"
    await connected.close()
    # A kept-alive HTTP connection serves request after request, each within the bound.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b'{"ok": true}')
        # Then, idle past the bound, it is closed without a word.
        assert await read_answer(reader, 30) == b""
    finally:
        writer.close()


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await read_answer(reader, 10)
        assert answer is not None, "no answer"
        return answer
    finally:
        writer.close()


WS_HEADERS = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def test_an_over_long_token_gets_a_status_not_a_dropped_connection(
    switchboard: Switchboard,
) -> None:
    port = switchboard.cluster.gateway_ports[0]
    in_url = b"GET /ws/v1/?token=" + b"a" * 20_000 + b" HTTP/1.1\r\n" + WS_HEADERS + b"\r\n"
    answer = await raw_request(port, in_url)
    assert answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), answer[:100]
    header = b"Authorization: Bearer " + b"a" * 20_000 + b"\r\n"
    answer = await raw_request(port, b"GET /ws/v1/ HTTP/1.1\r\n" + WS_HEADERS + header + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:100]
    # Under the request line's limit but over the token's: refused with a reason.
    closed = await refused_handshake(switchboard.url, "a" * (MAX_TOKEN_CHARS + 1))
    assert closed.reason == f"token longer than {MAX_TOKEN_CHARS} characters"


async def test_a_token_valid_for_longer_than_the_tenant_allows_is_refused(
    switchboard: Switchboard, connect: Connect
) -> None:
    # NARROW_TENANT allows 2 hours; every tenant has a cap (30 days by default).
    secret = switchboard.secret(NARROW_TENANT)
    closed = await refused_handshake(
        switchboard.url, issue_token(secret, NARROW_TENANT, "long-lived", ttl_s=3 * 3600)
    )
    assert closed.reason == "token lifetime exceeds the tenant's maximum of 7200 s"
    await connect(tenant=NARROW_TENANT)  # tokens of an hour
    forever = {"sub": "forever", "tnt": TENANT, "exp": 10**30}
    closed = await refused_handshake(
        switchboard.url, jwt.encode(forever, switchboard.secret(TENANT), algorithm="HS256")
    )
    assert closed.reason.startswith("token lifetime exceeds the tenant's maximum")


async def test_a_client_id_with_a_newline_is_refused(switchboard: Switchboard) -> None:
    token = switchboard.token("mallory\n2026-01-01 00:00:00 INFO forged line")
    closed = await refused_handshake(switchboard.url, token)
    assert closed.reason == "invalid client id"
    assert "INFO forged line" not in switchboard.log("gateway-0")


async def test_subscriptions_per_connection_are_capped(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect(tenant=NARROW_TENANT)  # 3 subscriptions per connection
    streams = [unique(f"cap-{n}") for n in range(5)]
    for stream in streams[:3]:
        await client.subscribe(stream)
    await client.subscribe(streams[0])  # already subscribed: not one more
    with pytest.raises(SwitchboardError) as refused:
        await client.subscribe(streams[3])
    error = refused.value
    assert (error.code, error.status, error.frame["stream"]) == ("rate_limited", 429, streams[3])
    assert "unsubscribe" in error.detail and error.retry_after_ms
    # A send subscribes its sender to the stream: past the cap it is refused too.
    with pytest.raises(SwitchboardError) as refused:
        await client.send(streams[4], "echo", "one stream too many")
    assert refused.value.code == "rate_limited"
    await client.unsubscribe(streams[0])
    await client.subscribe(streams[3])
    assert (await client.ping())["type"] == "pong"


async def test_unsubscribe_checks_the_tokens_streams(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect(streams=["mine-*"])
    with pytest.raises(SwitchboardError) as refused:
        await client.unsubscribe(unique("theirs"))
    assert (refused.value.code, refused.value.status) == ("forbidden", 403)


async def frames_until_pong(client: SwitchboardClient) -> list[dict[str, Any]]:
    """Ping, and every frame the server sent before the pong (receipts have no answer)."""
    await client.send_raw(json.dumps({"type": "ping"}))
    frames = []
    while (frame := await client.recv_frame())["type"] != "pong":
        frames.append(frame)
    return frames


def stream_keys(switchboard: Switchboard, fragment: str) -> list[bytes]:
    return list(switchboard.redis().scan_iter(match=f"{switchboard.key_prefix}:*{fragment}*"))


async def test_receipts_on_streams_with_no_events_write_nothing(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    """One socket sending receipts of seq 0 for made-up stream names used to create a
    30-day hash and an index entry for each."""
    client = await connect()
    prefix = unique("never-written")
    for n in range(300):
        await client.send_raw(json.dumps({"type": "receipt", "stream": f"{prefix}-{n}", "seq": 0}))
    assert await frames_until_pong(client) == []  # seq 0 is no error: it records nothing
    assert stream_keys(switchboard, prefix) == []


async def test_receipts_pay_a_rate_of_their_own(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    # 1 receipt a second, a burst of 3; and the same for messages.
    client = await connect(tenant=FRUGAL_TENANT)
    prefix = unique("frugal")
    for n in range(12):
        await client.send_raw(json.dumps({"type": "receipt", "stream": f"{prefix}-{n}", "seq": 0}))
    errors = await frames_until_pong(client)
    assert errors, "receipts were never rate limited"
    assert {(e["type"], e["code"], e["status"]) for e in errors} == {("error", "rate_limited", 429)}
    assert all(e["retry_after_ms"] > 0 and e["stream"].startswith(prefix) for e in errors)
    # A bucket of their own: what the client may send is untouched.
    for n in range(3):
        await client.publish(f"{prefix}-sent", {"n": n})


async def echo_status(client: SwitchboardClient, stream: str, options: dict[str, Any]) -> str:
    ack = await client.send(stream, "echo", "rehearsed", options=options)
    _, done = split_run(await collect_run(client, stream, ack["id"], timeout=30), ack["id"])
    return done["data"]["status"]


async def test_fault_options_are_honoured_only_where_enabled(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> None:
    """`fail`, `latency_ms` and `chunk_delay_ms` stall or fail runs on workers every tenant
    shares: a gateway without SWITCHBOARD_FAULT_INJECTION drops them, except for a
    tenant whose settings allow them."""
    url, _ = start_gateway(SWITCHBOARD_FAULT_INJECTION="0")
    ordinary = await SwitchboardClient.connect(url, switchboard.token(unique("plain")))
    rehearsing = await SwitchboardClient.connect(
        url, switchboard.token(unique("drill"), tenant=REHEARSAL_TENANT)
    )
    try:
        faults = {"fail": "error", "latency_ms": 600_000, "chunk_delay_ms": 600_000}
        assert await echo_status(ordinary, unique("faults-off"), faults) == "ok"
        assert await echo_status(rehearsing, unique("faults-on"), {"fail": "error"}) == "degraded"
    finally:
        await ordinary.close()
        await rehearsing.close()
