"""A minimal WebSocket client for the load engine: an asyncio Protocol that hands each
message to a callback as it is parsed.

A load generator holds thousands of sockets and reads every frame the gateways fan out, on
the same cores as the servers it measures; what it spends per frame is taken from them and
added to every latency it reports. A general client (the `websockets` library) wakes a
reader task through a queue for each message and parses frames through generators; here
`data_received` parses the frames of a read in one loop and calls `on_message(payload)`
directly. It speaks only what a client of the gateway needs (RFC 6455): the upgrade
handshake, unmasked server frames (text, binary, continuation, close, ping), masked client
frames; no extensions (the gateway's handshake answer is not checked for them, nor its
Sec-WebSocket-Accept: this is a load generator on a trusted loopback).

Each message comes with the moment its bytes reached this machine's socket (the kernel's
receive stamp of the read that carried it, SO_TIMESTAMP, on Linux), not the moment this
process got round to reading them: a load generator's loop runs late when it shares the
cores with the servers (thousands of reconnects at once), and a client on its own device
would not have waited for it. Where the stamp is not available, the read's own time.

The kernel stamps a read with the arrival of its last segment, and bytes that wait in the
socket are merged into the segment that arrives after them, taking its stamp. So a stamp is
a message's own only when the message ends the read; a message earlier in a read (its
reader was late, and more came meanwhile) gets a stamp from after it arrived. Each message
comes with both ends of when it can have arrived: `earliest`, when the last read before it
that emptied the socket began (it was not there yet), and `received_at`; the two are the
same when the stamp is the message's own.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from websockets.utils import apply_mask  # C speedups where built

MAX_HANDSHAKE_BYTES = 64 * 1024
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
NO_STATUS = 1005  # a close frame without a code
ABNORMAL = 1006  # the connection ended without a close frame


# SO_TIMESTAMP (= SCM_TIMESTAMP) as Linux numbers it; a struct timeval comes with each read.
SO_TIMESTAMP = 29 if sys.platform.startswith("linux") else None
_TIMEVAL = struct.Struct("@ll")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMEVAL.size)


class StampedSocket(socket.socket):
    """A TCP socket whose reads keep the kernel's receive stamp of their last segment
    (`received_at`, epoch seconds) and when the last earlier read that emptied the socket
    began (`arrived_after`: the bytes were not there yet; 0 before any did): asyncio's
    transport reads through `recv`/`recv_into`, so the protocol finds both for the bytes it
    is handed here."""

    received_at = 0.0
    arrived_after = 0.0
    _emptied_at = 0.0

    def recv(self, size: int, flags: int = 0) -> bytes:
        began = time.time()
        try:
            data, ancillary, _, _ = self.recvmsg(size, _STAMP_SPACE, flags)
        except (BlockingIOError, InterruptedError):
            self._emptied_at = began
            raise
        self._keep_stamp(ancillary, began, emptied=len(data) < size)
        return data

    def recv_into(self, buffer: Any, size: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        if size:
            view = view[:size]
        began = time.time()
        try:
            count, ancillary, _, _ = self.recvmsg_into([view], _STAMP_SPACE, flags)
        except (BlockingIOError, InterruptedError):
            self._emptied_at = began
            raise
        self._keep_stamp(ancillary, began, emptied=count < len(view))
        return count

    def _keep_stamp(
        self, ancillary: list[tuple[int, int, bytes]], began: float, emptied: bool
    ) -> None:
        # A read that filled its buffer may have left older bytes behind: only one that
        # did not says the next read's bytes came after it.
        self.arrived_after = self._emptied_at
        if emptied:
            self._emptied_at = began
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(data) >= _TIMEVAL.size:
                seconds, micros = _TIMEVAL.unpack_from(data)
                self.received_at = seconds + micros / 1e6
                return
        self.received_at = time.time()


class HandshakeRefused(Exception):
    """The server answered the upgrade with another HTTP status than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class WireConnection(asyncio.Protocol):
    def __init__(
        self,
        on_message: Callable[[bytes, float, float], None],
        on_close: Callable[[WireConnection], None] | None = None,
        stamps: StampedSocket | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_close = on_close
        self._stamps = stamps
        self.received_at = 0.0  # the current read's receive stamp (epoch seconds)
        self.arrived_after = 0.0  # its bytes were not in the socket yet (StampedSocket)
        self._ends_read = False  # the frame being handled ends the current read
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self._close_sent = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        stamps = self._stamps
        if stamps is not None:
            self.received_at, self.arrived_after = stamps.received_at, stamps.arrived_after
        else:  # the read's own time is all there is: taken as every message's
            self.received_at = self.arrived_after = time.time()
        self._buffer += data
        if not self.handshake.done():
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HANDSHAKE_BYTES:
                    self._fail_handshake(ConnectionError("handshake answer too long"))
                return
            status_line = bytes(self._buffer[: self._buffer.find(b"\r\n")])
            del self._buffer[: end + 4]
            try:
                status = int(status_line.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail_handshake(ConnectionError(f"bad status line {status_line!r}"))
                return
            if status != 101:
                self._fail_handshake(HandshakeRefused(status))
                return
            self.handshake.set_result(None)
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = ABNORMAL
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("closed during the handshake"))
            self.handshake.exception()  # retrieved: the caller may have timed out first
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    # --- frames ---------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buffer
        size = len(buf)
        pos = 0
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            mask = None
            if second & 0x80:  # servers must not mask; tolerated all the same
                if size - pos < head + 4:
                    break
                mask = bytes(buf[pos + head : pos + head + 4])
                head += 4
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self._ends_read = pos == size
            if mask is not None:
                payload = apply_mask(payload, mask)
            self._frame(first & 0x80, first & 0x0F, payload)
            if self.transport is None or self.transport.is_closing():
                break
        del buf[:pos]

    def _earliest(self) -> float:
        """When the message being handled can have reached the socket at the soonest: its
        read's stamp if the message ends the read (the stamp is its own), else when the
        read before it that emptied the socket began (module doc)."""
        return self.received_at if self._ends_read else self.arrived_after

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.on_message(payload, self.received_at, self._earliest())
            else:
                self._fragments = [payload]
        elif opcode == OP_CONTINUATION:
            if self._fragments is None:
                return
            self._fragments.append(payload)
            if fin:
                message, self._fragments = b"".join(self._fragments), None
                self.on_message(message, self.received_at, self._earliest())
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else NO_STATUS
            if not self._close_sent:
                self._write(OP_CLOSE, payload[:2])
                self._close_sent = True
            if self.transport is not None:
                self.transport.close()
        elif opcode == OP_PING:
            self._write(OP_PONG, payload)

    def _write(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionError("the connection is closed")
        length = len(payload)
        header = bytearray((0x80 | opcode,))
        if length < 126:
            header.append(0x80 | length)
        elif length < 65536:
            header.append(0x80 | 126)
            header += length.to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += length.to_bytes(8, "big")
        mask = os.urandom(4)
        header += mask
        transport.write(bytes(header) + apply_mask(payload, mask))

    def _fail_handshake(self, error: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
            self.handshake.exception()
        if self.transport is not None:
            self.transport.abort()

    # --- what the engine calls ------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, text: str) -> None:
        """One text message (ConnectionError once the connection is closing)."""
        self._write(OP_TEXT, text.encode())

    def abort(self) -> None:
        """Cut the socket without a close frame, as a network blip does."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """The closing handshake: a close frame, then the server's, then the socket."""
        if self.open and not self._close_sent:
            self._close_sent = True
            self._write(OP_CLOSE, code.to_bytes(2, "big"))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()
            await self.closed


async def connect(
    url: str,
    on_message: Callable[[bytes, float, float], None],
    on_close: Callable[[WireConnection], None] | None = None,
    timeout: float = 10.0,
) -> WireConnection:
    """Open `url` (ws:// or wss://HOST:PORT/PATH?QUERY) and finish the upgrade: HandshakeRefused
    for an HTTP answer, OSError or TimeoutError for a socket that does not get there.
    `on_message(payload, received_at, earliest)` gets each message, from the first after
    the upgrade on (the same read may carry it), with the span in which it reached the
    socket: its read's receive stamp and the soonest it can have come, equal when the stamp
    is the message's own (module doc);
    `on_close(connection)` is called once the socket is gone."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"a ws:// or wss:// URL, not {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        sock = await _open_socket(loop, host, port)
        stamps = sock if isinstance(sock, StampedSocket) else None
        try:
            transport, protocol = await loop.create_connection(
                lambda: WireConnection(on_message, on_close, stamps),
                sock=sock,
                ssl=ssl.create_default_context() if secure else None,
                server_hostname=host if secure else None,
            )
        except BaseException:
            sock.close()
            raise
        try:
            transport.write(request)
            await protocol.handshake
        except BaseException:
            transport.abort()
            raise
    return protocol


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to host:port, stamping its reads where the
    platform can (the first address that answers, as create_connection would)."""
    try:  # an address as it is: no resolver thread for each of a storm's thousands
        literal = ipaddress.ip_address(host)
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        addresses = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    except ValueError:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock: socket.socket = (
            StampedSocket(family, kind, proto)
            if SO_TIMESTAMP
            else socket.socket(family, kind, proto)
        )
        try:
            sock.setblocking(False)
            if SO_TIMESTAMP:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as failed:
            sock.close()
            error = failed
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}:{port}")
