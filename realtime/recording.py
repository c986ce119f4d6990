"""Traffic recording in the gateway, for load replay (`manage.py record_traffic`).

An operator's `record_traffic` writes a tenant's switch key (streams/keys.py) holding a
`RecordingConfig`, renews it while it runs and deletes it at the end; the key expires on
its own when the recorder dies. Gateways never read it per frame: each process keeps the
last answer per tenant and looks again, in the background, at most once every
RECHECK_S and only for tenants that are sending frames. While a tenant is not recorded a
frame costs a dict lookup and a clock read; an idle process issues no Redis command.

Sampling is per connection, so a sampled session is recorded whole: a connection is in
the sample when a hash of its id falls below the rate. A sampled connection's frames and
its open and close are appended, in order, to the tenant's capped recording stream,
batched (one pipeline per FLUSH_S) from a bounded buffer: a Redis that cannot keep up
loses recorded frames, never delays the connection. What is written leaves secrets out:
tokens and session ids are not in frames at all; connections and clients appear as labels
hashed with the recording's salt (the salt stays in Redis); message ids are hashed the
same way (a `cancel` still names its `send`); `prev` (an event id of this deployment) is
dropped; `text` and publish `data` are replaced by placeholders of the same length when
the recording redacts them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis

from realtime.protocol import (
    Cancel,
    Frame,
    Ping,
    Presence,
    Publish,
    Receipt,
    Send,
    Subscribe,
    Unsubscribe,
)
from streams import keys

logger = logging.getLogger(__name__)

# How stale a process's view of a tenant's switch may get: how long after record_traffic
# starts (or stops) a busy gateway follows.
RECHECK_S = 1.0
# Recorded entries are written in batches this far apart: one pipeline, not one command
# per frame.
FLUSH_S = 0.05
# Entries waiting to be written, at most; past it new ones are dropped (and counted).
MAX_BUFFERED = 10_000
FLUSH_BATCH = 500
PLACEHOLDER = "x"


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    """What the switch key holds."""

    id: str  # names the recording in its entries (leftovers of another are ignored)
    salt: str  # keys the label hashes; never written to the trace
    rate: float  # share of connections sampled, 0..1
    redact_text: bool = False
    max_len: int = 100_000  # the recording stream's cap (approximate trimming)

    def dumps(self) -> str:
        return orjson.dumps(
            {
                "id": self.id,
                "salt": self.salt,
                "rate": self.rate,
                "redact_text": self.redact_text,
                "max_len": self.max_len,
            }
        ).decode()

    @classmethod
    def loads(cls, raw: bytes | str | None) -> RecordingConfig | None:
        """The switch's config, or None for no key (or one this version cannot read)."""
        if not raw:
            return None
        try:
            data = orjson.loads(raw)
            return cls(
                id=str(data["id"]),
                salt=str(data["salt"]),
                rate=float(data["rate"]),
                redact_text=bool(data.get("redact_text", False)),
                max_len=int(data.get("max_len", 100_000)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("unreadable recording switch ignored: %r", raw[:200])
            return None


def sample_point(connection_id: str) -> float:
    """Where a connection falls in [0, 1): it is sampled when this is below the rate."""
    digest = hashlib.blake2b(connection_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def label(salt: str, value: str) -> str:
    """An anonymous, stable name for `value` within one recording."""
    return hashlib.blake2b(value.encode(), key=salt.encode()[:64], digest_size=6).hexdigest()


def _placeholder(value: Any) -> str:
    """A stand-in as long as the value's text (its JSON for anything but a string)."""
    size = len(value) if isinstance(value, str) else len(orjson.dumps(value).decode())
    return PLACEHOLDER * size


def frame_record(frame: Frame, config: RecordingConfig) -> dict[str, Any]:
    """The recorded form of a parsed client frame: only the protocol's fields, ids hashed,
    `prev` dropped, text and data replaced when the recording redacts them."""
    if isinstance(frame, Send):
        record: dict[str, Any] = {
            "type": "send",
            "id": label(config.salt, "msg:" + frame.id),
            "stream": frame.stream,
            "agent": frame.agent,
            "text": _placeholder(frame.text) if config.redact_text else frame.text,
        }
        if frame.options:
            record["options"] = frame.options
        return record
    if isinstance(frame, Publish):
        return {
            "type": "publish",
            "id": label(config.salt, "msg:" + frame.id),
            "stream": frame.stream,
            "data": _placeholder(frame.data) if config.redact_text else frame.data,
        }
    if isinstance(frame, Subscribe):
        record = {"type": "subscribe", "stream": frame.stream}
        if frame.since is not None:
            record["since"] = frame.since
        if frame.compact:
            record["compact"] = True
        return record
    if isinstance(frame, Unsubscribe):
        return {"type": "unsubscribe", "stream": frame.stream}
    if isinstance(frame, Receipt):
        return {"type": "receipt", "stream": frame.stream, "seq": frame.seq}
    if isinstance(frame, Cancel):
        return {"type": "cancel", "id": label(config.salt, "msg:" + frame.id)}
    if isinstance(frame, Presence):
        return {"type": "presence", "stream": frame.stream}
    if isinstance(frame, Ping):
        return {"type": "ping"}
    raise TypeError(f"not a client frame: {frame!r}")


@dataclass(slots=True)
class _Sampled:
    """A connection's place in one recording."""

    tenant: str
    recording: str  # RecordingConfig.id it was decided for
    sampled: bool
    conn: str = ""  # labels, set when sampled
    client: str = ""


class Recorder:
    """One per gateway process: the cached switches, the sampling decisions of open
    connections, and the buffer of entries waiting to be written."""

    def __init__(
        self,
        client_factory: Callable[[], aredis.Redis],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_factory = client_factory
        self._clock = clock
        # tenant -> (its config or None when off, when it was last looked at)
        self._switches: dict[str, tuple[RecordingConfig | None, float]] = {}
        self._due: set[str] = set()
        self._refreshing: asyncio.Task[None] | None = None
        self._connections: dict[str, _Sampled] = {}
        self._buffer: list[tuple[str, int, bytes]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.dropped = 0

    # --- the switch ------------------------------------------------------------------

    def config(self, tenant: str) -> RecordingConfig | None:
        """The tenant's recording as last seen (no I/O); a stale view is refreshed in the
        background, so the answer may be up to RECHECK_S old."""
        entry = self._switches.get(tenant)
        if entry is None or self._clock() - entry[1] >= RECHECK_S:
            self._due.add(tenant)
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            return entry[0] if entry is not None else None
        return entry[0]

    async def _refresh(self) -> None:
        while self._due:
            tenants = sorted(self._due)
            self._due.clear()
            now = self._clock()
            try:
                # One GET per tenant in a pipeline, not an MGET: in a Redis Cluster each
                # tenant's switch is in its own tenant's slot.
                async with self._client_factory().pipeline(transaction=False) as pipe:
                    for tenant in tenants:
                        pipe.get(keys.recording(tenant))
                    values = await pipe.execute()
            except Exception as error:
                # Keep what was known and look again after RECHECK_S: a Redis away must not
                # turn every frame into a retry.
                logger.warning("recording switch unreadable: %s", error)
                for tenant in tenants:
                    entry = self._switches.get(tenant)
                    self._switches[tenant] = (entry[0] if entry else None, now)
                return
            for tenant, raw in zip(tenants, values, strict=True):
                config = RecordingConfig.loads(raw)
                previous = self._switches.get(tenant)
                if (previous[0] if previous else None) != config:
                    logger.info(
                        "traffic recording %s tenant=%s%s",
                        "on" if config else "off",
                        tenant,
                        f" rate={config.rate}" if config else "",
                    )
                self._switches[tenant] = (config, now)

    # --- connections -----------------------------------------------------------------

    def _sampled(self, tenant: str, client: str, connection_id: str) -> _Sampled | None:
        config = self.config(tenant)
        if config is None:
            return None
        state = self._connections.get(connection_id)
        if state is None or state.recording != config.id:
            sampled = sample_point(connection_id) < config.rate
            state = _Sampled(tenant, config.id, sampled)
            if sampled:
                state.conn = label(config.salt, "conn:" + connection_id)
                state.client = label(config.salt, "client:" + client)
            self._connections[connection_id] = state
        return state if state.sampled else None

    def opened(self, tenant: str, client: str, connection_id: str, resumed: bool) -> None:
        """A connection was welcomed."""
        state = self._sampled(tenant, client, connection_id)
        if state is not None:
            self._add(tenant, state, {"event": "open", "resumed": resumed})

    def frame(self, tenant: str, client: str, connection_id: str, frame: Frame) -> None:
        """A well-formed frame arrived (before it is handled)."""
        entry = self._switches.get(tenant)
        if entry is not None and entry[0] is None and self._clock() - entry[1] < RECHECK_S:
            return  # the common case: not recorded, and known to be not
        state = self._sampled(tenant, client, connection_id)
        if state is not None:
            config = self._switches[tenant][0]
            assert config is not None
            self._add(tenant, state, {"event": "frame", "frame": frame_record(frame, config)})

    def closed(self, connection_id: str, code: int | None) -> None:
        """A connection ended (whatever happened before: refused ones included)."""
        state = self._connections.pop(connection_id, None)
        if state is None or not state.sampled:
            return
        config = self.config(state.tenant)
        if config is not None and config.id == state.recording:
            self._add(state.tenant, state, {"event": "close", "code": code})

    # --- writing ---------------------------------------------------------------------

    def _add(self, tenant: str, state: _Sampled, entry: dict[str, Any]) -> None:
        if len(self._buffer) >= MAX_BUFFERED:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                logger.warning("recording buffer full: %s entries dropped", self.dropped)
            return
        config = self._switches[tenant][0]
        assert config is not None
        entry.update(rec=state.recording, ts=time.time(), conn=state.conn, client=state.client)
        self._buffer.append((keys.recording_log(tenant), config.max_len, orjson.dumps(entry)))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(FLUSH_S)  # gather a batch
        while self._buffer:
            batch = self._buffer[:FLUSH_BATCH]
            del self._buffer[:FLUSH_BATCH]
            try:
                async with self._client_factory().pipeline(transaction=False) as pipe:
                    for key, max_len, payload in batch:
                        pipe.xadd(key, {"e": payload}, maxlen=max_len, approximate=True)
                    await pipe.execute()
            except Exception as error:
                self.dropped += len(batch)
                logger.warning("recorded frames lost (%s entries): %s", len(batch), error)


_recorder: Recorder | None = None


def get_recorder() -> Recorder:
    global _recorder
    if _recorder is None:
        from streams.redis_clients import async_client

        _recorder = Recorder(async_client)
    return _recorder
