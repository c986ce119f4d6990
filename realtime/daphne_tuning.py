"""Daphne's HTTP side bounded, two per-connection costs of autobahn (daphne's WebSocket
library) paid once per process, its timeout walk spread out, its accepts paced and its
event loop's long turns timed.

Bounds (`bound_http_requests`): daphne reads requests with Twisted's HTTPChannel, which
waits up to twelve hours for a request's headers while any byte arrives (its idle timeout
restarts on each), and daphne's own timeouts (`--http-timeout`, the WebSocket handshake
timeout) only start once a whole request has been read. A client sending one header line
every few seconds held its socket for ever. Here every request must have arrived whole
(line, headers, body) within SWITCHBOARD_REQUEST_TIMEOUT_S of the connection opening, or
of the last response on a kept-alive connection, else it is answered 408 and closed (a
kept-alive connection on which nothing of a next request came is just closed). And where
Twisted drops a request line over 16 KiB without a word (a long token in the URL), it is
answered 414 (431 for headers over 16 KiB in all), so a client learns why.

Costs, both measured on the handshake path and in idle memory (docs/performance.md):

1. Every new protocol copies about forty options from its factory into its own
   `__dict__` (autobahn's `_connectionMade` copies each one the instance does not already
   have). Setting them once on daphne's protocol class makes every later instance find
   them there and keep a small `__dict__`: the values are the factory's, which daphne
   fixes before it accepts the first connection.
2. Every handshake formats two debug lines with `pprint.pformat` (the option list and the
   transport details) even when debug logging is off. autobahn's module-level `pformat`
   is replaced by one that defers the formatting until a log line is really written.

Both apply to the protocol class and module autobahn ships with daphne; each is checked
before it is applied, so an autobahn that changes these internals just runs untuned.

Reaping (`reap_on_change`): each second daphne's `application_checker` walks every
connection of the process to find the few whose application finished or whose socket
closed: at 12,500 sockets a process, 6-9% of its CPU and a stall of the event loop every
second. Here a connection is marked when one of those happens (its application instance
completes, daphne records its disconnect), and the same check with daphne's rules runs
each second on the marked ones only (those still waiting for their application to end
stay marked). The number daphne tracks is exported as `switchboard_daphne_connections`,
and the collector's pauses of the last second (ops/collector.py) are reported then too.

Timeouts (`spread_timeout_walk`): every 2 s daphne's `timeout_checker` walks every
connection in one go to enforce its timeouts and send the pings that are due. At 12,500
sockets a process that walk, the tenth of the sockets it pings and the pongs that answer
together in the next turn stopped the event loop for 45-85 ms each, every 2 s: measured
(a probe timing each turn of the loop), the longest regular stalls of a gateway between
storms. Here the same checks run in 20 slices 0.1 s apart, each connection still checked
once per 2 s, so pings go out and pongs come back spread over the 2 s.

Accepts (`pace_accepts`): each port daphne listens on takes new connections at the rate
of realtime/accept_pace.py, so a reconnect storm's upgrades are spread out.

Turns (`time_loop_turns`): each turn of the event loop that runs 10 ms or more is
observed by its length (`switchboard_loop_long_turn_seconds`): every delivery of the
process that came in during one waited for the rest of it.
"""

from __future__ import annotations

import inspect
import logging
import pprint
import time
from asyncio import CancelledError
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from ops import metrics
from ops.collector import report_pauses
from realtime.accept_pace import AcceptPace

logger = logging.getLogger(__name__)

_class_tuned = False


class _DeferredPformat:
    """Formats like pprint.pformat, but only when a log line is actually rendered."""

    __slots__ = ("value",)

    def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def defer_debug_formatting() -> None:
    try:
        from autobahn.websocket import protocol as autobahn_protocol
    except ImportError:  # pragma: no cover - autobahn comes with daphne
        return
    if getattr(autobahn_protocol, "pformat", None) is not pprint.pformat:
        return
    autobahn_protocol.pformat = _DeferredPformat
    timings = getattr(autobahn_protocol, "Timings", None)
    if timings is not None:
        # Timings.__str__ must still return a real string.
        timings.__str__ = lambda self: pprint.pformat(self._timings)


def share_factory_options(protocol: Any) -> None:
    """Make the factory's options class attributes of this protocol's class (once)."""
    global _class_tuned
    if _class_tuned:
        return
    _class_tuned = True
    cls = type(protocol)
    factory = getattr(protocol, "factory", None)
    names = getattr(cls, "CONFIG_ATTRS", None)
    if factory is None or not names:
        return
    for name in names:
        # An option the class already has (anywhere in its bases) is not copied by autobahn
        # either: leave it as it is.
        if hasattr(cls, name) or not hasattr(factory, name):
            continue
        value = getattr(factory, name)
        # A plain function on a class would turn into a method and get `self` as its first
        # argument (perMessageCompressionAccept is one): keep it a plain callable.
        setattr(cls, name, staticmethod(value) if inspect.isfunction(value) else value)
    logger.debug("autobahn options shared on %s: %s", cls.__name__, len(names))


# Twisted's HTTPChannel internals the bounds rely on; each is checked before patching.
_CHANNEL_NEEDS = (
    "connectionMade",
    "connectionLost",
    "allContentReceived",
    "requestDone",
    "lineReceived",
    "lineLengthExceeded",
    "loseConnection",
    "totalHeadersSize",
    "_receivedHeaderSize",
    "_HTTPChannel__first_line",
)
_DEADLINE = "_switchboard_request_deadline"
_KEPT_ALIVE = "_switchboard_kept_alive"
_bounded = False


def lacks_internals(owner: object, names: tuple[str, ...], consequence: str) -> bool:
    """Whether `owner` lacks any of the internals a patch of it relies on (then the patch
    is not applied, and `consequence` is logged with what is missing)."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        name = getattr(owner, "__qualname__", None) or repr(owner)
        logger.warning("%s: %s lacks %s", consequence, name, missing)
    return bool(missing)


def _answer_and_close(channel: Any, status: bytes) -> None:
    transport = channel.transport
    if transport is None or getattr(transport, "disconnecting", False):
        return
    transport.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    channel.loseConnection()


def _too_large_status(channel: Any) -> bytes:
    # Still on the request line (the URL, where a token goes): 414; else the headers: 431.
    if getattr(channel, "_HTTPChannel__first_line", 0):
        return b"414 URI Too Long"
    return b"431 Request Header Fields Too Large"


def bound_http_requests(timeout_s: float) -> None:
    """Patch Twisted's HTTPChannel (daphne's) as the module doc says; once per process."""
    global _bounded
    if _bounded:
        return
    from twisted.web.http import HTTPChannel

    if lacks_internals(HTTPChannel, _CHANNEL_NEEDS, "HTTP requests not bounded"):
        return
    _bounded = True

    def disarm(channel: Any) -> None:
        call = channel.__dict__.pop(_DEADLINE, None)
        if call is not None and call.active():
            call.cancel()

    def overdue(channel: Any) -> None:
        channel.__dict__.pop(_DEADLINE, None)
        idle = (
            channel.__dict__.get(_KEPT_ALIVE)
            and not channel._receivedHeaderSize
            and not getattr(channel, "_buffer", b"")
        )
        if idle:
            # Kept alive after a response and nothing of another request came: just close,
            # as a client reusing the connection expects.
            if channel.transport is not None and not channel.transport.disconnecting:
                channel.loseConnection()
            return
        _answer_and_close(channel, b"408 Request Timeout")

    def arm(channel: Any) -> None:
        disarm(channel)
        if timeout_s > 0:
            setattr(channel, _DEADLINE, channel.callLater(timeout_s, lambda: overdue(channel)))

    connection_made = HTTPChannel.connectionMade
    connection_lost = HTTPChannel.connectionLost
    all_content_received = HTTPChannel.allContentReceived
    request_done = HTTPChannel.requestDone
    line_received = HTTPChannel.lineReceived

    def connectionMade(self: Any) -> None:  # noqa: N802 - Twisted's names
        connection_made(self)
        arm(self)

    def connectionLost(self: Any, reason: Any) -> None:  # noqa: N802
        disarm(self)
        connection_lost(self, reason)

    def allContentReceived(self: Any) -> None:  # noqa: N802
        # The request is whole: daphne answers it, or hands the socket to the WebSocket.
        disarm(self)
        all_content_received(self)

    def requestDone(self: Any, request: Any) -> None:  # noqa: N802
        # Armed before the next request's buffered bytes are read, which may complete it.
        setattr(self, _KEPT_ALIVE, True)
        arm(self)
        request_done(self, request)

    def lineReceived(self: Any, line: bytes) -> None:  # noqa: N802
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            _answer_and_close(self, _too_large_status(self))
            return
        line_received(self, line)

    def lineLengthExceeded(self: Any, line: bytes) -> None:  # noqa: N802
        _answer_and_close(self, _too_large_status(self))

    HTTPChannel.connectionMade = connectionMade
    HTTPChannel.connectionLost = connectionLost
    HTTPChannel.allContentReceived = allContentReceived
    HTTPChannel.requestDone = requestDone
    HTTPChannel.lineReceived = lineReceived
    HTTPChannel.lineLengthExceeded = lineLengthExceeded
    logger.debug("HTTP requests bounded to %s s", timeout_s)


# Daphne's Server methods the reaping relies on; each is checked before patching (its
# `connections` and `application_close_timeout` are set per instance, when it is made).
_SERVER_NEEDS = ("application_checker", "create_application", "protocol_disconnected")
_MARKED = "_switchboard_marked"
_reaping = False


def check_application(server: Any, protocol: Any, details: dict[str, Any]) -> bool:
    """Daphne's rule for one connection (its `application_checker`): an application
    still running `application_close_timeout` after its socket closed is cancelled; a
    finished one is reaped (its exception logged, and answered on a socket still open);
    the connection is forgotten once its socket and its application are both gone.
    True while the connection must be looked at again: closed, its application running."""
    disconnected = details.get("disconnected")
    instance = details.get("application_instance")
    if disconnected and time.time() - disconnected > server.application_close_timeout:
        if instance is not None and not instance.done():
            logger.warning(
                "application instance for connection %r took too long to shut down; cancelled",
                protocol,
            )
            instance.cancel()
    if instance is not None and instance.done():
        try:
            exception = instance.exception()
        except CancelledError:
            exception = None
        if isinstance(exception, KeyboardInterrupt):
            server.stop()  # daphne's way for an application to stop the server
        elif exception is not None:
            logger.error("exception inside application: %s", exception, exc_info=exception)
            if not disconnected:
                protocol.handle_exception(exception)
        del details["application_instance"]
        instance = None
    if instance is None and disconnected:
        server.connections.pop(protocol, None)
        return False
    return bool(disconnected)


def reap_marked(server: Any, marked: set[Any]) -> None:
    """Check the marked connections (daphne's rules), keeping marked those to look at
    again."""
    for protocol in list(marked):
        details = server.connections.get(protocol)
        keep = False
        if details is not None:
            try:
                keep = check_application(server, protocol, details)
            except Exception:
                logger.exception("daphne connection check failed for %r", protocol)
        if not keep:
            marked.discard(protocol)


def _marked(server: Any) -> set[Any]:
    found = server.__dict__.get(_MARKED)
    if found is None:
        found = server.__dict__[_MARKED] = set()
    return found


def reap_on_change() -> None:
    """Replace daphne's every-connection walk with checks of the marked ones (module
    doc); once per process, before daphne's server starts."""
    global _reaping
    if _reaping:
        return
    from daphne.server import Server

    if lacks_internals(Server, _SERVER_NEEDS, "daphne's connections reaped by its own walk"):
        return
    _reaping = True
    create_application = Server.create_application
    protocol_disconnected = Server.protocol_disconnected

    def create_application_marking(self: Any, protocol: Any, scope: Any) -> Any:
        queue = create_application(self, protocol, scope)
        instance = self.connections.get(protocol, {}).get("application_instance")
        if instance is not None:
            marked = _marked(self)
            instance.add_done_callback(lambda _: marked.add(protocol))
        return queue

    def protocol_disconnected_marking(self: Any, protocol: Any) -> None:
        protocol_disconnected(self, protocol)
        _marked(self).add(protocol)

    def application_checker(self: Any) -> None:
        from twisted.internet import reactor

        reap_marked(self, _marked(self))
        metrics.daphne_connections(len(self.connections))
        report_pauses()
        reactor.callLater(1, self.application_checker)

    Server.create_application = create_application_marking
    Server.protocol_disconnected = protocol_disconnected_marking
    Server.application_checker = application_checker
    logger.debug("daphne's connections reaped on change")


_pinging = False


def set_socket_timeouts(server: Any, ping_interval_s: float, ping_timeout_s: float) -> None:
    """What pings_every sets on daphne's server before it runs."""
    server.ping_interval, server.ping_timeout = ping_interval_s, ping_timeout_s
    server.websocket_timeout = -1  # daphne's "no limit" on a socket's age


def pings_every(interval_s: float, timeout_s: float) -> None:
    """Daphne pings each socket every `interval_s` and drops it when a pong is `timeout_s`
    late (SWITCHBOARD_WS_PING_INTERVAL_S / _TIMEOUT_S, in place of daphne's command-line
    flags); once per process, before daphne's server runs (it hands the timeout to
    autobahn when it starts).

    Daphne's own limit on a socket's age (`--websocket_timeout`, 24 h by default) is lifted
    at the same time: it closes without a close code, and closes every socket that opened
    together (after a deploy, or a reconnect storm) together, a day later: a storm of its
    own making. The gateway bounds ages itself when asked (SWITCHBOARD_WS_MAX_AGE_S: 1012,
    spread out)."""
    global _pinging
    if _pinging:
        return
    from daphne.server import Server

    if lacks_internals(Server, ("run",), "daphne's own ping interval kept"):
        return
    _pinging = True
    run = Server.run

    def run_with_pings(self: Any) -> Any:
        set_socket_timeouts(self, interval_s, timeout_s)
        return run(self)

    Server.run = run_with_pings


# Daphne's period for its timeout walk, split into this many slices.
TIMEOUT_WALK_PERIOD_S = 2.0
TIMEOUT_WALK_SLICES = 20
_WALK = "_switchboard_walk"
_walk_spread = False

Walked = TypeVar("Walked")


class SlicedRounds(Generic[Walked]):
    """Every item of a changing collection once per round, a round taken in `slices`
    even parts. A round is a snapshot: an item added meanwhile waits for the next one,
    and the caller skips one gone meanwhile."""

    def __init__(self, slices: int) -> None:
        self.slices = max(1, slices)
        self._round: list[Walked] = []
        self._next = 0
        self._per_slice = 1

    def next_slice(self, items: Iterable[Walked]) -> list[Walked]:
        if self._next >= len(self._round):
            self._round = list(items)
            self._next = 0
            self._per_slice = max(1, -(-len(self._round) // self.slices))
        start, self._next = self._next, self._next + self._per_slice
        return self._round[start : self._next]


def check_timeouts_slice(server: Any, rounds: SlicedRounds[Any]) -> None:
    """Daphne's timeout and ping check (its `check_timeouts`) for the next slice of its
    connections."""
    connections = server.connections
    for protocol in rounds.next_slice(connections):
        if protocol in connections:
            protocol.check_timeouts()


def spread_timeout_walk() -> None:
    """Daphne's 2-second timeout walk in slices (module doc); once per process, before
    daphne's server starts."""
    global _walk_spread
    if _walk_spread:
        return
    from daphne.server import Server

    if lacks_internals(Server, ("timeout_checker",), "daphne's timeout walk kept whole"):
        return
    _walk_spread = True

    def timeout_checker(self: Any) -> None:
        from twisted.internet import reactor

        rounds = self.__dict__.get(_WALK)
        if rounds is None:
            rounds = self.__dict__[_WALK] = SlicedRounds(TIMEOUT_WALK_SLICES)
        check_timeouts_slice(self, rounds)
        reactor.callLater(TIMEOUT_WALK_PERIOD_S / TIMEOUT_WALK_SLICES, self.timeout_checker)

    Server.timeout_checker = timeout_checker
    logger.debug("daphne's timeout walk spread over %s slices", TIMEOUT_WALK_SLICES)


_pacing = False
# Twisted's tcp.Port internals the pacing relies on.
_PORT_NEEDS = ("doRead", "numberAccepts", "sessionno", "startReading", "stopReading")


def pace_port(port: Any, pace: AcceptPace, reactor: Any) -> None:
    """Accept on `port` only what `pace` allows: each read of the listening socket takes
    at most the allowance (Twisted's `numberAccepts`, which it otherwise grows by 20 for
    each read that fills it), and once the allowance is spent the port stops reading
    until a connection may be taken again (realtime/accept_pace.py)."""
    accept = port.doRead
    paused = False

    def resume() -> None:
        nonlocal paused
        paused = False
        if port.connected and not port.disconnecting:
            port.startReading()

    def pause(now: float) -> None:
        nonlocal paused
        if paused:
            return
        paused = True
        port.stopReading()
        metrics.accepts_paused()
        reactor.callLater(pace.wait_s(now), resume)

    def accept_paced() -> Any:
        now = time.monotonic()
        allowed = pace.allowance(now)
        if allowed < 1:
            pause(now)
            return None
        port.numberAccepts = min(port.numberAccepts, allowed)
        before = port.sessionno
        result = accept()
        pace.took(port.sessionno - before, now)
        if pace.allowance(now) < 1:
            pause(now)
        return result

    port.doRead = accept_paced


def pace_accepts(rate_per_s: float, burst: int) -> None:
    """Every port daphne listens on takes at most `burst` connections at once and
    `rate_per_s` a second (SWITCHBOARD_ACCEPT_RATE_PER_S / _BURST; 0: as fast as they
    come); once per process, before daphne's server starts."""
    global _pacing
    if _pacing or rate_per_s <= 0:
        return
    from daphne.server import Server

    if lacks_internals(Server, ("listen_success",), "connections accepted unpaced"):
        return
    _pacing = True
    listen_success = Server.listen_success

    def listen_success_paced(self: Any, port: Any) -> Any:
        from twisted.internet import reactor

        if not lacks_internals(port, _PORT_NEEDS, "accepts unpaced"):
            pace_port(port, AcceptPace(rate_per_s, burst, time.monotonic()), reactor)
        return listen_success(self, port)

    Server.listen_success = listen_success_paced


# A turn of the event loop that ran this long is observed: every delivery of the process
# that came in meanwhile waited for the rest of it.
LONG_TURN_S = 0.010


def time_turns(
    selector: Any, observe: Callable[[float], None], clock: Callable[[], float] = time.monotonic
) -> None:
    """Call `observe` with the length of each turn of the loop that runs on `selector` and
    lasts LONG_TURN_S or more: a turn starts when the selector answers and ends when the
    loop asks it again (the loop looks `select` up at every turn)."""
    select = selector.select
    started = 0.0

    def select_timing_turns(timeout: float | None = None) -> Any:
        nonlocal started
        if started:
            ran_s = clock() - started
            if ran_s >= LONG_TURN_S:
                observe(ran_s)
        ready = select(timeout)
        started = clock()
        return ready

    selector.select = select_timing_turns


_timing = False


def time_loop_turns() -> None:
    """Observe the gateway's long turns in `switchboard_loop_long_turn_seconds`; once per
    process, before daphne's server runs."""
    global _timing
    if _timing:
        return
    from twisted.internet import reactor

    selector = getattr(getattr(reactor, "_asyncioEventloop", None), "_selector", None)
    if selector is None or lacks_internals(selector, ("select",), "loop turns not timed"):
        return
    _timing = True
    time_turns(selector, metrics.long_loop_turn)
