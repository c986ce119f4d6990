"""Connecting: the welcome, and every way a token is refused (close 4001, nothing sent)."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import websockets

from client.connection import SwitchboardClient, SwitchboardClosed
from tenants.tokens import issue_token

from .conftest import DOOMED_TENANT, TENANT, Connect, Switchboard
from .support import wait_until
from .test_metrics import scrape, value

pytestmark = pytest.mark.asyncio


async def test_welcome_names_client_tenant_session_and_limits(connect: Connect) -> None:
    client = await connect(client="welcome-1")
    welcome = client.welcome
    assert welcome["type"] == "welcome"
    assert welcome["client"] == "welcome-1"
    assert welcome["tenant"] == TENANT
    assert isinstance(welcome["session"], str) and welcome["session"]
    assert isinstance(welcome["heartbeat_s"], int) and welcome["heartbeat_s"] > 0
    assert welcome["limits"]["max_frame_bytes"] == 64 * 1024
    assert welcome["limits"]["stream_retention"] > 0
    other = await connect(client="welcome-1")
    assert other.welcome["session"] != welcome["session"], "each connection is its own session"
    assert (await client.ping())["type"] == "pong"


async def test_token_in_authorization_header(switchboard: Switchboard, connect: Connect) -> None:
    token = switchboard.token("header-client", name="Header")
    client = await connect(token=token, token_in_header=True)
    assert client.welcome["client"] == "header-client"


async def test_token_from_issue_token_command(switchboard: Switchboard, connect: Connect) -> None:
    token = switchboard.cluster.manage("issue_token", TENANT, "cli-client", "--ttl", "60")
    assert "\n" not in token, "issue_token prints the token alone"
    client = await connect(token=token)
    assert client.welcome["client"] == "cli-client"
    assert client.welcome["tenant"] == TENANT


def _unsigned(claims: dict[str, object]) -> str:
    return jwt.encode(claims, key=None, algorithm="none")


def _refused_tokens(board: Switchboard) -> dict[str, Callable[[], str | None]]:
    secret = board.secret(TENANT)
    now = int(time.time())
    return {
        "missing": lambda: None,
        "empty": lambda: "",
        "malformed": lambda: "not-a-jwt",
        "bad-signature": lambda: issue_token("not-the-secret-" * 4, TENANT, "c1", 60),
        "other-tenants-secret": lambda: issue_token(board.secret("globex"), TENANT, "c1", 60),
        "expired": lambda: issue_token(secret, TENANT, "c1", ttl_s=-30),
        "no-expiry": lambda: jwt.encode({"sub": "c1", "tnt": TENANT}, secret, "HS256"),
        "no-subject": lambda: jwt.encode({"tnt": TENANT, "exp": now + 60}, secret, "HS256"),
        "alg-none": lambda: _unsigned({"sub": "c1", "tnt": TENANT, "exp": now + 60}),
        "unknown-tenant": lambda: issue_token(secret, "no-such-tenant", "c1", 60),
        "no-tenant-claim": lambda: jwt.encode({"sub": "c1", "exp": now + 60}, secret, "HS256"),
    }


REFUSALS = [
    "missing",
    "empty",
    "malformed",
    "bad-signature",
    "other-tenants-secret",
    "expired",
    "no-expiry",
    "no-subject",
    "alg-none",
    "unknown-tenant",
    "no-tenant-claim",
]


@pytest.mark.parametrize("in_header", [False, True], ids=["query", "header"])
@pytest.mark.parametrize("case", REFUSALS)
async def test_refused_token_closes_4001_with_nothing_sent(
    switchboard: Switchboard, case: str, in_header: bool
) -> None:
    token = _refused_tokens(switchboard)[case]()
    with pytest.raises(SwitchboardClosed) as refused:
        await SwitchboardClient.connect(switchboard.url, token, token_in_header=in_header)
    assert refused.value.code == 4001, refused.value
    assert refused.value.reason, "the close carries a short reason"
    assert refused.value.frames == [], "nothing is sent before the close"


async def test_disabled_tenant_is_refused(switchboard: Switchboard, connect: Connect) -> None:
    token = switchboard.token("doomed-client", tenant=DOOMED_TENANT)
    client = await connect(token=token)
    assert client.welcome["tenant"] == DOOMED_TENANT
    switchboard.shell(
        "from tenants.models import Tenant; "
        f"Tenant.objects.filter(slug={DOOMED_TENANT!r}).update(enabled=False)"
    )

    async def refused() -> SwitchboardClosed | None:
        # The gateway caches tenants briefly; the change shows once its entry expires.
        try:
            opened = await SwitchboardClient.connect(switchboard.url, token)
        except SwitchboardClosed as closed:
            return closed
        await opened.close()
        return None

    closed = await wait_until(refused, 10, "the disabled tenant to be refused")
    assert closed.code == 4001
    assert closed.frames == []
    assert "disabled" in closed.reason


async def test_every_handshake_works_when_the_client_offers_compression(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    # Browsers and most clients offer permessage-deflate. The gateway tunes the protocol
    # class after its first connection; every later handshake must still succeed.
    for _ in range(3):
        client = await SwitchboardClient.connect(
            switchboard.url, switchboard.token(unique("deflate")), compression="deflate"
        )
        try:
            assert (await client.ping())["type"] == "pong"
        finally:
            await client.close()


async def test_a_browser_from_another_site_is_refused_at_the_handshake(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    token = switchboard.token(unique("browser"))
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{switchboard.url}?token={token}", origin="https://evil.example")
    assert refused.value.response.status_code == 403
    # The same browser on an allowed origin gets in.
    allowed = await SwitchboardClient.connect(
        switchboard.url, token, origin="http://127.0.0.1:8000"
    )
    try:
        assert allowed.welcome["type"] == "welcome"
    finally:
        await allowed.close()


async def _read_frame(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, bytes]:
    """One unmasked server frame: (first byte, payload); (0, b"") when the socket ends."""
    try:
        async with asyncio.timeout(timeout_s):
            head = await reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", await reader.readexactly(8))[0]
            return head[0], await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionResetError):  # a dropped socket: reset
        return 0, b""


async def _next_ping(reader: asyncio.StreamReader) -> bytes:
    while True:
        first, payload = await _read_frame(reader, 15)
        assert first, "the socket ended before a ping"
        if first == 0x89:  # FIN + ping
            return payload


def _pong(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x8A, 0x80 | len(payload))) + mask + masked


async def test_the_gateway_pings_keeps_a_socket_that_answers_and_drops_one_that_does_not(
    switchboard: Switchboard, start_gateway: Callable[..., Any]
) -> None:
    """Pings written straight to the socket (realtime/transport.py direct_pings) are still
    autobahn's: a pong with the ping's payload keeps the socket; none drops it."""
    url, _ = start_gateway(SWITCHBOARD_WS_PING_INTERVAL_S="0.5", SWITCHBOARD_WS_PING_TIMEOUT_S="3")
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        token = switchboard.token("pinged").encode()
        writer.write(
            b"GET /ws/v1/?token=" + token + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 101"), status
        for _ in range(3):  # answered, the socket stays: each ping is followed by another
            payload = await _next_ping(reader)
            assert len(payload) >= 12  # autobahn's: sent at (8 bytes), number (4), random
            writer.write(_pong(payload))
        await _next_ping(reader)  # unanswered: dropped once the timeout passes
        while (await _read_frame(reader, 15))[0]:
            pass
    finally:
        writer.close()


async def test_connections_past_the_accept_burst_are_taken_at_the_rate_and_all_let_in(
    switchboard: Switchboard, start_gateway: Callable[..., Any]
) -> None:
    """A gateway takes its burst of connections at once and the rest at its accept rate
    (realtime/accept_pace.py); those not yet taken wait in the kernel's accept queue and
    are each welcomed in turn, none refused or lost."""
    rate, burst, count = 20, 5, 25
    url, _ = start_gateway(
        SWITCHBOARD_ACCEPT_RATE_PER_S=str(rate), SWITCHBOARD_ACCEPT_BURST=str(burst)
    )
    gateway = len(switchboard.cluster.gateway_ports) - 1
    pauses = value(await scrape(switchboard, gateway), "switchboard_accept_pauses_total")
    started = time.monotonic()
    clients = await asyncio.gather(
        *(
            SwitchboardClient.connect(url, switchboard.token(f"paced-{n}"), timeout=30)
            for n in range(count)
        )
    )
    taken_in = time.monotonic() - started
    try:
        assert sorted(client.welcome["client"] for client in clients) == sorted(
            f"paced-{n}" for n in range(count)
        )
        # The limiter's own floor, not a speed: the scrape above spent one of the burst,
        # so at least count - burst connections waited for the rate's tokens.
        assert taken_in >= (count - burst) / rate * 0.9
        after = value(await scrape(switchboard, gateway), "switchboard_accept_pauses_total")
        assert after > pauses
    finally:
        await asyncio.gather(*(client.close() for client in clients))
