"""How frames reach a socket: straight to daphne's protocol when we run under daphne.

Under daphne, the ASGI `send` of a WebSocket is `partial(server.handle_reply, protocol)`
and does its work synchronously. Writing through the protocol object directly lets the
gateway do three things ASGI cannot express:

- frame each event once and write the same bytes to every socket (autobahn's prepared
  messages), which is most of the cost of fanning one event out to many sockets;
- see backpressure: Twisted pauses a registered producer when a socket's kernel and user
  buffers fill, so a slow reader's frames stay in our bounded outbox (and it is closed with
  4008 when that fills) instead of piling up without bound in Twisted's write buffer;
- close with a reason (daphne's ASGI close drops it).

Under any other ASGI server the plain `send` is used, without those three.

Pings (`direct_pings`): daphne pings every socket each `--ping-interval` through autobahn,
whose write goes through Twisted's: an epoll change to start writing, a loop turn, another
to stop, and a debug line's arguments formatted. At 12,500 sockets a process that is 625
pings a second and, measured in a reconnect storm, most of the time daphne's timeout walk
takes. A socket the gateway writes to directly gets its pings written the same way; the
pong's check and the timeout stay autobahn's.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

try:
    from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
except ImportError:  # pragma: no cover - autobahn comes with daphne
    PreparedMessage = None  # type: ignore[assignment,misc]
    WebSocketProtocol = None  # type: ignore[assignment,misc]

from realtime.daphne_tuning import lacks_internals, share_factory_options  # noqa: E402

_PREPARED_CACHE_LIMIT = 512
CLOSE_HANDSHAKE_TIMEOUT_S = 30
_prepared: dict[str, Any] = {}


def prepared_message(text: str) -> Any:
    """One framed message per distinct text; the same event to many sockets frames once."""
    message = _prepared.get(text)
    if message is None:
        if len(_prepared) >= _PREPARED_CACHE_LIMIT:
            _prepared.clear()
        message = _prepared[text] = PreparedMessage(text.encode(), False, False, True)
    return message


class DaphneSocket:
    """Direct writes to an autobahn protocol, with Twisted's flow control."""

    __slots__ = ("protocol", "paused", "on_resume", "_transport", "_socket", "_previous_producer")

    direct = True

    def __init__(self, protocol: Any, on_resume: Callable[[], None]) -> None:
        self.protocol = protocol
        self.paused = False
        self.on_resume = on_resume
        self._transport: Any = None
        self._socket: Any = None
        self._previous_producer: Any = None

    def start(self) -> None:
        """Call once the socket is accepted."""
        # A frame over daphne's size limit then gets a 1009 close frame, not a dropped TCP
        # connection the client can only see as 1006.
        self.protocol.failByDrop = False
        share_factory_options(self.protocol)
        transport = getattr(self.protocol, "transport", None)
        if transport is not None and hasattr(transport, "registerProducer"):
            # Daphne's HTTP channel is still registered from the upgrade; we take its place
            # and pass its calls on, so what it did on pause and resume still happens.
            self._previous_producer = getattr(transport, "producer", None)
            if self._previous_producer is not None:
                transport.unregisterProducer()
            transport.registerProducer(self, True)
        if _plain_tcp(transport):
            self._transport = transport
            self._socket = transport.socket

    @property
    def open(self) -> bool:
        return self.protocol.state == WebSocketProtocol.STATE_OPEN

    def write(self, text: str) -> None:
        self.write_frame(prepared_message(text).payloadHybi)

    def write_frame(self, data: bytes) -> None:
        """Write one framed WebSocket message or control frame."""
        protocol = self.protocol
        if protocol.send_queue:
            protocol.sendData(data)  # keep order behind autobahn's own queued frames
        elif self._socket is not None and _buffer_empty(self._transport):
            # Twisted only writes when the reactor says the socket is writable: two epoll
            # changes and a loop turn per frame, most of a 10,000-socket fan-out. Like
            # asyncio's transports, try the socket first and buffer only what it refuses.
            try:
                sent = self._socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # Twisted's own write below notices the broken socket and closes it
            if sent < len(data):
                self._transport.write(data[sent:])
        else:
            # What sendData() does, minus a debug-log line whose arguments it formats on
            # every call.
            protocol.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        if self.protocol.state == WebSocketProtocol.STATE_OPEN:
            # A client reads the close frame only after what is buffered ahead of it (a slow
            # reader's backlog): give it time to, rather than abort and make it a bare 1006.
            self.protocol.closeHandshakeTimeout = CLOSE_HANDSHAKE_TIMEOUT_S
            # sendClose() refuses 1012 (it allows only 1000 and 3000-4999); the frame is valid.
            self.protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:120])

    # Twisted IPushProducer
    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's interface
        self.paused = True
        if self._previous_producer is not None:
            self._previous_producer.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        if self._previous_producer is not None:
            self._previous_producer.resumeProducing()
        self.on_resume()

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = True
        if self._previous_producer is not None:
            self._previous_producer.stopProducing()


# What autobahn's auto-ping relies on, checked before patching; its per-socket state
# (autoPingPending, autoPingPendingSeq, autoPingSize, the timeout call) is set as autobahn
# sets it, and the pong is matched and the timeout cancelled by autobahn's own code.
_PING_NEEDS = ("_sendAutoPing", "onAutoPingTimeout", "onAutoPong")
_PING_OPCODE = 0x89  # FIN + ping; a server's frames are not masked
_pings_direct = False


def ping_frame(payload: bytes) -> bytes:
    """A server's ping frame (control frames carry at most 125 bytes)."""
    if len(payload) > 125:
        raise ValueError("a ping's payload is at most 125 bytes")
    return bytes((_PING_OPCODE, len(payload))) + payload


def direct_pings() -> None:
    """Write daphne's automatic pings as the gateway writes its frames (module doc); once
    per process, before daphne's server starts."""
    global _pings_direct
    if _pings_direct or WebSocketProtocol is None:
        return
    if lacks_internals(WebSocketProtocol, _PING_NEEDS, "pings written through Twisted"):
        return
    _pings_direct = True
    send_through_autobahn = WebSocketProtocol._sendAutoPing

    def send_auto_ping(protocol: Any) -> None:
        producer = getattr(getattr(protocol, "transport", None), "producer", None)
        if not isinstance(producer, DaphneSocket) or protocol.state != WebSocketProtocol.STATE_OPEN:
            send_through_autobahn(protocol)
            return
        sent, number = time.time_ns(), protocol.autoPingPendingSeq + 1
        # autobahn's payload: when it was sent, its number, then random bytes to the size.
        payload = struct.pack(">QL", sent, number) + os.urandom(protocol.autoPingSize - 12)
        protocol.autoPingPendingCall = None
        protocol.autoPingPendingSent, protocol.autoPingPendingSeq = sent, number
        protocol.autoPingPending = payload
        producer.write_frame(ping_frame(payload))
        if protocol.autoPingTimeout:
            protocol.autoPingTimeoutCall = protocol.factory._batched_timer.call_later(
                protocol.autoPingTimeout, protocol.onAutoPingTimeout
            )

    WebSocketProtocol._sendAutoPing = send_auto_ping


def daphne_protocol(send: Callable[[dict[str, Any]], Awaitable[None]]) -> Any | None:
    """The autobahn protocol behind a daphne ASGI `send`, or None under other servers."""
    if WebSocketProtocol is None or not isinstance(send, functools.partial):
        return None
    protocol = send.args[0] if send.args else None
    return protocol if isinstance(protocol, WebSocketProtocol) else None


def _plain_tcp(transport: Any) -> bool:
    """A non-TLS Twisted TCP transport whose buffers we know how to inspect."""
    return (
        transport is not None
        and getattr(transport, "TLS", True) is False
        and hasattr(transport, "socket")
        and hasattr(transport, "_tempDataBuffer")
        and hasattr(transport, "dataBuffer")
        and hasattr(transport, "offset")
    )


def _buffer_empty(transport: Any) -> bool:
    return (
        transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    )
