"""The load engine: plays `ConnectionPlan`s against a gateway and measures what happens.

One task per planned connection (asyncio, with the minimal client of loadtest/wire.py,
which hands each message over as it is parsed) connects at its offset, sends each planned
frame at its offset and reads everything the server says:

- ack latency: a `send` or `publish` leaving -> its `ack` (or `error`, counted by code);
- reply latency: a `send` leaving -> the `reply.done` of its run, matched by the event's
  `cause` (this connection's client id and the message id; runs other agents' replies
  started carry a `depth` and are not that send's reply);
- delivery latency: a `publish` leaving -> each copy of its `published` event any
  connection of the run receives (fan-out);
- connect latency: the handshake starting -> `welcome`.

With `check_seqs` (the seed-night scenario) it also checks and times what every reader
gets: each stream event's `seq` must follow the last one this connection processed on
that stream (a gap counts as lost events, a repeat as a duplicate; a resume sends the
last seqs as its `positions`); its delivery lag is its receipt minus its `ts` (the
server's clock, the same machine's), receipt being when its bytes reached this machine's
socket (loadtest/wire.py), and also taken as this process read it; and a connection
dropped and resumed is caught up once its `pong` is in and it holds every stream's head
as its process had seen it at the drop (reconnect-to-caught-up time). At its close,
events of its streams it never got up to the head its process saw are counted as lost
too.

A connection holds a `send` back while it has as many runs without their `reply.done` as
the server allows per connection (the welcome's `max_runs_in_flight_per_connection`, or
`max_in_flight`), like a well-behaved client: a replay faster than the recorded traffic
then shows as schedule lag and latency instead of 429s. It holds an `unsubscribe` back
until its replies on that stream are in (the recorded client saw them, so it had them).
Frames of one connection leave in order. A connection stays open past its planned close
until its sends are answered, for at most `drain_timeout_s`; what is still unanswered
then is counted. A connection the server closes is reopened (with its session) for its
next frame, as a client would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from client.connection import encode_positions, with_query
from loadtest.report import Measurements
from loadtest.schedule import ConnectionPlan, prepare_frame, total_frames
from loadtest.wire import HandshakeRefused, WireConnection
from loadtest.wire import connect as wire_connect

logger = logging.getLogger(__name__)

# Consecutive failed connects after which a planned connection gives up its remaining frames.
MAX_CONNECT_FAILURES = 3
CLOSE_FORBIDDEN = 4003  # a refused session: connect again without it


@dataclass(frozen=True, slots=True)
class EngineOptions:
    # Runs without reply.done a connection may have before it holds sends back; None: the
    # server's limit from the welcome; 0: no bound (the server answers 429 past its own).
    max_in_flight: int | None = None
    drain_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    # Handshakes in progress at once: a storm of thousands must not exhaust the client.
    connect_concurrency: int = 500
    # Tasks are created before the clock starts, so the first offsets are kept.
    start_delay_s: float = 0.2
    # Wall-clock time (epoch seconds) of offset 0, instead of start_delay_s: several
    # processes playing shards of one run keep one schedule (a storm hits them together).
    start_at: float | None = None
    # Check seqs per stream per connection, time delivery lag and catch-up (module doc).
    check_seqs: bool = False


class _Refused(Exception):
    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Engine:
    def __init__(
        self,
        url: str | Sequence[str],
        tokens: Mapping[str, str],
        options: EngineOptions | None = None,
    ) -> None:
        # Several gateways: connection i goes to urls[i % len(urls)].
        self.urls = [url] if isinstance(url, str) else list(url)
        self.url = self.urls[0]
        self.tokens = tokens
        self.options = options or EngineOptions()
        self.m = Measurements()
        self.frames_sent = 0  # read by the progress bar
        self.frames_planned = 0
        # (client, message id) -> when that publish left, for delivery latency.
        self.published: dict[tuple[str, str], float] = {}
        self._start = 0.0
        self._last_activity = 0.0
        self._connect_slots: asyncio.Semaphore | None = None
        # stream -> the highest seq any connection of this engine has seen on it.
        self.heads: dict[str, int] = {}

    def now(self) -> float:
        """Seconds since the run started."""
        return asyncio.get_running_loop().time() - self._start

    def touch(self) -> float:
        now = self.now()
        self._last_activity = max(self._last_activity, now)
        return now

    async def sleep_until(self, at: float) -> None:
        delay = at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def run(self, plans: list[ConnectionPlan]) -> Measurements:
        loop = asyncio.get_running_loop()
        if self.options.start_at is not None:
            self._start = loop.time() + (self.options.start_at - time.time())
        else:
            self._start = loop.time() + self.options.start_delay_s
        self._connect_slots = asyncio.Semaphore(self.options.connect_concurrency)
        self.frames_planned = self.m.frames_planned = total_frames(plans)
        self.m.connections_planned = len(plans)
        connections = [
            _Connection(self, plan, self.urls[index % len(self.urls)])
            for index, plan in enumerate(plans)
        ]
        monitor = loop.create_task(self._watch_loop()) if self.options.check_seqs else None
        await asyncio.gather(*(connection.run() for connection in connections))
        if monitor is not None:
            monitor.cancel()
        planned_end = max((plan.end() for plan in plans), default=0.0)
        self.m.duration_s = max(self._last_activity, planned_end)
        return self.m

    async def _watch_loop(self, interval_s: float = 0.05) -> None:
        """How late this process's own event loop wakes up: every latency taken here
        includes it, so a starved load generator shows apart from a slow server."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval_s)
            late = loop.time() - before - interval_s
            self.m.loop_lag.append((self.now(), max(0.0, late) * 1000))


class _Connection:
    def __init__(self, engine: Engine, plan: ConnectionPlan, url: str) -> None:
        self.engine = engine
        self.plan = plan
        self.url = url
        self.check_seqs = engine.options.check_seqs
        # While resuming: when the socket was dropped, the heads to reach, whether the
        # pong after the resume is in (None: not catching up).
        self.dropped_at = 0.0
        self.catch_up: dict[str, int] | None = None
        self.pong_seen = False
        # When the handshake of the connection now open began and when its welcome came
        # (wall clock): an event stamped before the first was published while this client
        # had no connection; one between the two, while it was being let back in.
        self.connecting_since = 0.0
        self.welcomed_at = 0.0
        # When the bytes of the message being read reached this machine's socket: at the
        # latest and at the soonest, the same when its stamp is its own (loadtest/wire.py).
        self.received_at = 0.0
        self.earliest = 0.0
        self.client = plan.client
        self.ws: WireConnection | None = None
        self.session: str | None = None
        self.max_in_flight = engine.options.max_in_flight
        self.last_seqs: dict[str, int] = {}
        self.acks: dict[str, tuple[float, str]] = {}  # message id -> (sent at, frame type)
        # message id of a send -> (sent at, its stream)
        self.replies: dict[str, tuple[float, str]] = {}
        self.answered = asyncio.Event()  # set whenever an answer (or the close) arrives
        self.failures = 0
        self.opened_once = False
        self._welcome: asyncio.Future[dict[str, Any]] | None = None
        self._leaving = False  # we are closing or dropping the socket ourselves

    # --- the plan --------------------------------------------------------------------

    async def run(self) -> None:
        engine = self.engine
        await engine.sleep_until(self.plan.open_at)
        await self.open()
        for action in self.plan.actions:
            await engine.sleep_until(action.at)
            if action.reconnect:
                await self.drop_and_resume()
                continue
            if action.frame is None:
                continue
            if self.ws is None and not await self.open(resume=self.session is not None):
                engine.m.frames_skipped += 1
                continue
            await self.send(action.frame, action.at)
        if self.plan.close_at is not None:
            await engine.sleep_until(self.plan.close_at)
        await self.wait_answered(self.engine.options.drain_timeout_s)
        if self.check_seqs and self.ws is not None:
            # What this connection never got of its streams, up to what its process saw.
            for stream, last in self.last_seqs.items():
                engine.m.seq_lost_at_end += max(0, engine.heads.get(stream, 0) - last)
        engine.m.unanswered_acks += len(self.acks)
        engine.m.unanswered_replies += len(self.replies)
        self.acks.clear()  # counted: the close must not count them again
        self.replies.clear()
        await self.close()

    async def wait_answered(self, timeout: float) -> None:
        """Until every ack and reply is in, the timeout, or the socket is gone."""
        try:
            async with asyncio.timeout(timeout):
                while (self.acks or self.replies) and self.ws is not None:
                    self.answered.clear()
                    await self.answered.wait()
        except TimeoutError:
            pass

    # --- connecting ------------------------------------------------------------------

    async def open(self, resume: bool = False) -> bool:
        """Connect (with the session when resuming); False when it failed."""
        if self.failures >= MAX_CONNECT_FAILURES:
            return False
        engine = self.engine
        session = self.session if resume else None
        try:
            welcome = await self._connect(session)
        except _Refused as refused:
            if session is not None and refused.code == CLOSE_FORBIDDEN:
                # The session could not be resumed: start over, as a client must.
                self.session = None
                return await self.open()
            self.failures += 1
            engine.m.connect_failures[refused.reason] += 1
            return False
        self.failures = 0
        self.session = welcome.get("session")
        if self.max_in_flight is None:
            limits = welcome.get("limits") or {}
            self.max_in_flight = limits.get("max_runs_in_flight_per_connection") or 0
        if self.opened_once:
            engine.m.reconnects += 1
            if welcome.get("resumed"):
                engine.m.resumed += 1
        else:
            self.opened_once = True
            engine.m.connections_opened += 1
        return True

    async def _connect(self, session: str | None) -> dict[str, Any]:
        engine = self.engine
        assert engine._connect_slots is not None
        positions = None
        if session is not None and self.last_seqs:
            # What this connection processed: nothing skipped, nothing repeated.
            positions = encode_positions(self.last_seqs)
        url = with_query(
            self.url, token=engine.tokens[self.client], session=session, positions=positions
        )
        timeout = engine.options.connect_timeout_s
        async with engine._connect_slots:
            started = engine.now()
            if self.opened_once:  # a reconnect: what came before it is the resume's to deliver
                self.connecting_since = time.time()
            self._welcome = asyncio.get_running_loop().create_future()
            self._leaving = False
            try:
                ws = await wire_connect(url, self._on_message, self._on_close, timeout)
            except HandshakeRefused as error:
                raise _Refused(f"http {error.status}") from None
            except (OSError, TimeoutError) as error:
                raise _Refused(type(error).__name__) from None
            if not ws.closed.done():
                self.ws = ws
            try:
                async with asyncio.timeout(timeout):
                    welcome = await asyncio.shield(self._welcome)
            except TimeoutError:
                await self._abandon(ws)
                raise _Refused("no welcome") from None
            except _Refused:
                await self._abandon(ws)
                raise
        engine.m.connect.append((engine.touch(), (engine.now() - started) * 1000))
        return welcome

    async def _abandon(self, ws: WireConnection) -> None:
        self._leaving = True
        ws.abort()
        await ws.closed
        self.ws = None

    async def drop_and_resume(self) -> None:
        """Cut the socket without a close frame (a network blip, a dead gateway) and come
        back at once with the session."""
        if self.ws is not None:
            await self._abandon(self.ws)
        if self.check_seqs:
            self.dropped_at = self.engine.now()
            self.catch_up = {stream: self.engine.heads.get(stream, 0) for stream in self.last_seqs}
            self.pong_seen = False
        await self.open(resume=self.session is not None)

    async def close(self) -> None:
        ws = self.ws
        if ws is None:
            return
        self._leaving = True
        try:
            await ws.close()
        except Exception:  # noqa: BLE001 - a socket that will not close is cut
            logger.debug("close failed client=%s", self.client, exc_info=True)
            ws.abort()
        self.ws = None

    # --- sending ---------------------------------------------------------------------

    async def send(self, planned: dict[str, Any], at: float) -> None:
        engine = self.engine
        frame = prepare_frame(planned, self.last_seqs)
        kind = frame.get("type")
        if kind == "send" and self.max_in_flight:
            await self._wait_until(lambda: len(self.replies) < self.max_in_flight)
        elif kind == "unsubscribe":
            # The recorded client had its replies before it left the stream (it would not
            # have seen them otherwise); a faster replay must not leave before they come.
            stream = frame.get("stream")
            await self._wait_until(lambda: all(s != stream for _, s in self.replies.values()))
        ws = self.ws
        if ws is None:
            engine.m.frames_skipped += 1
            return
        now = engine.touch()
        message_id = frame.get("id")
        tracked = kind in ("send", "publish") and isinstance(message_id, str)
        if tracked:
            self.acks[message_id] = (now, kind)
            if kind == "send":
                self.replies[message_id] = (now, str(frame.get("stream")))
            else:
                engine.published[(self.client, message_id)] = now
        try:
            ws.send(orjson.dumps(frame).decode())
        except ConnectionError:
            if tracked:
                self.acks.pop(message_id, None)
                self.replies.pop(message_id, None)
            engine.m.frames_skipped += 1
            return
        engine.m.lag.append((now, max(0.0, now - at) * 1000))
        engine.m.frames_by_type[str(kind)] += 1
        engine.frames_sent += 1

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Hold the next frame until `ready()` (checked as answers arrive), at most
        drain_timeout_s: replies lost or very late must not stall the plan for good."""
        try:
            async with asyncio.timeout(self.engine.options.drain_timeout_s):
                while not ready() and self.ws is not None:
                    self.answered.clear()
                    await self.answered.wait()
        except TimeoutError:
            pass

    # --- receiving -------------------------------------------------------------------

    def _on_message(self, payload: bytes, received_at: float, earliest: float) -> None:
        """Each message, as the connection parses it, with its read's receive stamp and the
        soonest it can have come (loadtest/wire.py)."""
        self.received_at = received_at
        self.earliest = earliest
        try:
            self._on_frame(orjson.loads(payload))
        except Exception:
            logger.exception("load connection failed to read client=%s", self.client)
            if self.ws is not None:
                self.ws.abort()

    def _on_close(self, ws: WireConnection) -> None:
        code = ws.close_code
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(_Refused(f"close {code}", code))
            self._welcome.exception()  # retrieved: the connect may have timed out first
        elif not self._leaving:
            self.engine.m.server_closes[str(code)] += 1
        if self.ws is ws:
            self.ws = None
            # Lost with the socket; replies may still come after a resume.
            self.engine.m.unanswered_acks += len(self.acks)
            self.acks.clear()
        self.answered.set()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame)
        elif kind == "ack":
            self._on_answer(frame, error=False)
        elif kind == "error":
            self._on_answer(frame, error=True)
        elif kind == "welcome":
            if self.opened_once:
                self.welcomed_at = time.time()
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(frame)
        elif kind == "pong" and self.catch_up is not None:
            self.pong_seen = True
            self._check_caught_up()

    def _check_caught_up(self) -> None:
        """A resuming connection has its `pong` (the restore is done) and every stream's
        head as its process saw it at the drop: the catch-up time is taken."""
        targets = self.catch_up
        if targets is None or not self.pong_seen:
            return
        last = self.last_seqs
        if all(last.get(stream, 0) >= head for stream, head in targets.items()):
            engine = self.engine
            now = engine.touch()
            engine.m.caught_up.append((now, (now - self.dropped_at) * 1000))
            self.catch_up = None

    def _on_answer(self, frame: dict[str, Any], error: bool) -> None:
        engine = self.engine
        m = engine.m
        message_id = frame.get("id")
        sent = self.acks.pop(message_id, None) if isinstance(message_id, str) else None
        now = engine.touch()
        if error:
            code = str(frame.get("code"))
            m.errors[code] += 1
            if frame.get("status") == 429:
                m.rate_limited[code] += 1
            if isinstance(message_id, str):
                self.replies.pop(message_id, None)  # refused: no run, no reply
        elif sent is not None:
            m.ack.append((now, (now - sent[0]) * 1000))
            m.acks_by_type[sent[1]] += 1
            if frame.get("duplicate"):
                m.duplicates += 1
        self.answered.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        stream = event.get("stream")
        seq = event.get("seq")
        if self.check_seqs:
            if not self._check_event(event, stream, seq):
                return
        elif isinstance(seq, int) and isinstance(stream, str):
            if seq > self.last_seqs.get(stream, 0):
                self.last_seqs[stream] = seq
        kind = event.get("kind")
        if kind == "reply.done":
            cause = event.get("cause") or {}
            if cause.get("client") != self.client or cause.get("depth"):
                return
            sent = self.replies.pop(cause.get("message"), None)
            if sent is not None:
                engine = self.engine
                now = engine.touch()
                engine.m.reply.append((now, (now - sent[0]) * 1000))
                engine.m.reply_status[str((event.get("data") or {}).get("status"))] += 1
                self.answered.set()
        elif kind == "reply.restart":
            # Only counted: replies are timed to their reply.done, whose text is the whole
            # reply whatever restarted before it.
            cause = event.get("cause") or {}
            if cause.get("client") == self.client and not cause.get("depth"):
                if cause.get("message") in self.replies:
                    self.engine.m.reply_restarts += 1
        elif kind == "published":
            engine = self.engine
            if engine.published:
                cause = event.get("cause") or {}
                sent = engine.published.get((cause.get("client"), cause.get("message")))
                if sent is not None:
                    now = engine.touch()
                    engine.m.delivery.append((now, (now - sent) * 1000))

    def _check_event(self, event: dict[str, Any], stream: Any, seq: Any) -> bool:
        """Seq order, delivery lag and catch-up of one event (check_seqs); False: a
        duplicate, not to be processed again."""
        m = self.engine.m
        if not isinstance(stream, str):
            return True
        if not isinstance(seq, int):
            m.presence_events += 1  # join/leave: no seq, not in the log
            return True
        last = self.last_seqs.get(stream)
        if last is not None:
            if seq <= last:
                m.seq_duplicates += 1
                return False
            if seq > last + 1:
                m.seq_lost += seq - last - 1
        self.last_seqs[stream] = seq
        heads = self.engine.heads
        if seq > heads.get(stream, 0):
            heads[stream] = seq
        m.events += 1
        targets = self.catch_up
        if targets is not None and seq <= targets.get(stream, 0):
            # Replayed by the resume: timed by the catch-up, not as a live delivery.
            self._check_caught_up()
            return True
        ts = event.get("ts")
        if isinstance(ts, str):
            try:
                sent = datetime.fromisoformat(ts).timestamp()
            except ValueError:
                return True
            # Published while this client was cut off, or while its resume was being let
            # in: the resume delivers it, and its lag is the reconnect's, counted apart
            # from what readers that were connected got.
            # `ts` has millisecond resolution: only a stamp a whole millisecond before the
            # moment counts as before it, so no live delivery is taken for a resume's.
            # The lag to this machine's socket (the read's receive stamp); the live ones
            # also as this process read them, its own loop's lateness included.
            now = self.engine.now()
            sample = (now, (self.received_at - sent) * 1000)
            stamped = sent + 0.001
            if stamped < self.connecting_since:
                m.away_lag.append(sample)
            elif stamped < self.welcomed_at:
                m.rejoining_lag.append(sample)
            else:
                m.event_lag.append(sample)
                m.event_lag_read.append((now, (time.time() - sent) * 1000))
                if self.earliest == self.received_at:
                    m.event_lag_own.append(sample)
                else:
                    soonest = max(0.0, self.earliest - sent) * 1000
                    m.event_lag_merged_soonest.append((now, soonest))
        if targets is not None:
            self._check_caught_up()
        return True


async def run_plans(
    url: str,
    tokens: Mapping[str, str],
    plans: list[ConnectionPlan],
    options: EngineOptions | None = None,
) -> Measurements:
    """Play `plans` and return what was measured."""
    return await Engine(url, tokens, options).run(plans)
