"""A second gateway process, stopped and overrun on purpose: drain on SIGTERM with 1012, and
4008 for a reader too slow for its outbound buffer. In both cases the client loses nothing:
it resumes on the other gateway with `subscribe` and `since`."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import websockets

from client.connection import SwitchboardClient
from project.launcher import Proc

from .conftest import TENANT, Connect, StartGateway, Switchboard

pytestmark = pytest.mark.asyncio

SMALL_OUTBOX = 20


@pytest.fixture
def second_gateway(start_gateway: StartGateway) -> tuple[str, Proc]:
    """Gateway 1 with a tiny outbound buffer, so a slow reader trips it quickly."""
    return start_gateway(SWITCHBOARD_OUTBOX_MAX_EVENTS=str(SMALL_OUTBOX))


async def _closed_code(client: SwitchboardClient, timeout: float = 15) -> int | None:
    await asyncio.wait_for(client.wait_closed(), timeout)
    return client.close_code


async def _readers_of_one_event(
    switchboard: Switchboard,
    url: str,
    publisher: SwitchboardClient,
    stream: str,
    count: int,
    name: str,
) -> list[SwitchboardClient]:
    """`count` clients on the gateway at `url`, subscribed to `stream`, each holding the
    first event the publisher sent there."""
    readers = [
        await SwitchboardClient.connect(url, switchboard.token(f"{name}-{n}", TENANT))
        for n in range(count)
    ]
    for reader in readers:
        await reader.subscribe(stream)
    first = await publisher.publish(stream, {"n": 1})
    for reader in readers:
        assert (await reader.next_event(stream, timeout=10))["seq"] == first["seq"]
    return readers


async def _each_recovers_the_next_event(
    connect: Connect, publisher: SwitchboardClient, stream: str, gone: list[SwitchboardClient]
) -> None:
    """Published while the clients were away: each gets it, once, on another gateway."""
    second = await publisher.publish(stream, {"n": 2})
    for client in gone:
        resumed = await connect(client=client.welcome["client"])
        answer = await resumed.subscribe(stream, since=client.last_seq(stream))
        assert answer["recovered"] is True
        event = await resumed.next_event(stream, timeout=10)
        assert (event["seq"], event["data"]) == (second["seq"], {"n": 2})


async def test_sigterm_closes_every_socket_with_1012_and_clients_resume_elsewhere(
    switchboard: Switchboard,
    second_gateway: tuple[str, Proc],
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    url, proc = second_gateway
    stream = unique("drain")
    publisher = await connect()
    doomed = await _readers_of_one_event(switchboard, url, publisher, stream, 5, unique("d"))

    proc.signal(signal.SIGTERM)
    codes = [await _closed_code(client) for client in doomed]
    assert codes == [1012] * len(doomed)
    await asyncio.to_thread(proc.popen.wait, 20)
    assert proc.popen.returncode == 0
    await _each_recovers_the_next_event(connect, publisher, stream, doomed)


async def test_a_socket_refused_while_draining_gets_1012(
    switchboard: Switchboard, second_gateway: tuple[str, Proc], unique: Callable[[str], str]
) -> None:
    url, proc = second_gateway
    holder = await SwitchboardClient.connect(url, switchboard.token(unique("h"), TENANT))
    proc.signal(signal.SIGTERM)
    assert await _closed_code(holder) == 1012


async def test_a_reader_too_slow_for_its_buffer_is_closed_4008_and_recovers(
    switchboard: Switchboard,
    second_gateway: tuple[str, Proc],
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    url, _ = second_gateway
    stream = unique("slow")
    token = switchboard.token(unique("slow"), TENANT)
    # A raw socket that reads its welcome and `subscribed`, then nothing: websockets stops
    # reading the TCP socket once max_queue frames wait, so the kernel's buffers and then
    # Twisted's fill, the gateway's writer pauses and the outbox overflows.
    # A small receive buffer also turns off the kernel's autotuning, which on loopback may
    # otherwise grow it to tens of megabytes.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    slow = await websockets.connect(
        f"{url}?token={token}", sock=sock, max_queue=1, compression=None
    )
    try:
        await slow.recv()
        await slow.send(json.dumps({"type": "subscribe", "stream": stream}))
        subscribed = json.loads(await slow.recv())
        assert subscribed["type"] == "subscribed"
        since = subscribed["head"]

        publisher = await connect()
        # More than the socket buffers on both ends (the server's send buffer grows to
        # 4 MiB on Linux), Twisted's 64 KiB and the outbox hold together: it must give up.
        payload = "x" * 8000
        published = [
            (await publisher.publish(stream, {"i": index, "pad": payload}))["seq"]
            for index in range(1500)
        ]
        # Now read: the close frame arrives after whatever the buffers still held.
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(slow.recv(), 30)
    finally:
        await slow.close()
    assert slow.close_code == 4008

    # Nothing it missed is lost: a fresh connection resumes from where it stopped.
    resumed = await connect()
    answer = await resumed.subscribe(stream, since=since)
    assert answer["recovered"] is True
    got = [(await resumed.next_event(stream, timeout=10))["seq"] for _ in published]
    assert got == published


async def test_a_socket_past_its_age_limit_is_closed_1012_and_resumes(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    """SWITCHBOARD_WS_MAX_AGE_S: each socket is closed 1012 once it is that old (less up to
    a tenth, drawn per socket), its session saved, and its client resumes elsewhere with
    nothing lost."""
    max_age_s = 2.0
    url, _ = start_gateway(SWITCHBOARD_WS_MAX_AGE_S=str(max_age_s))
    stream = unique("aged")
    publisher = await connect()
    opened = time.monotonic()
    aging = await _readers_of_one_event(switchboard, url, publisher, stream, 3, unique("a"))

    codes = [await _closed_code(client) for client in aging]
    assert codes == [1012] * len(aging)
    # Not before its age less a tenth (the limit's own floor, not a speed).
    assert time.monotonic() - opened >= max_age_s * 0.9
    await _each_recovers_the_next_event(connect, publisher, stream, aging)
