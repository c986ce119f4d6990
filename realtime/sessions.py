"""Sessions: what a reconnect restores. The subscriptions a connection had and, per stream,
the seq of the last event the gateway handed to its socket. A client that sends its own
`positions` with the resume (what it processed) goes on from those instead: only it knows
which written frames it never read (`parse_positions`, `resume_problem`).

A session is a Redis hash (`client` plus one `s:STREAM` field per subscription) so any
gateway process can resume it. It is first written by the connection's first subscription
(a connect costs no Redis round trip for it). Positions are written when a subscription
starts, every
SESSION_CHECKPOINT_S while the connection lives (only what changed), and exactly when the
connection ends. A position never passes an event still waiting in the outbound buffer,
so a resume after a slow-consumer close or a drain repeats nothing and skips nothing. A
gateway that crashes leaves positions up to one checkpoint behind: the resumed connection
then repeats those events (same seq), which clients drop; it never skips one.

While a connection is open its session key lives 2 x SESSION_TTL_S and is refreshed every
SESSION_TTL_S / 3; the connection's end sets it to SESSION_TTL_S. So a session outlives its
last connection by SESSION_TTL_S after a clean end, and by 5/3 to 2 x that after a crash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aredis

from project.conf import conf
from streams import keys
from streams.batches import Batches
from streams.events import STREAM_NAME
from streams.scripts import SaveSessions

logger = logging.getLogger(__name__)

_STREAM_FIELD = "s:"
# Sessions per SAVE_SESSIONS call. A call's arguments are built and its answer read on the
# event loop: at 500 that is about 2.5 ms, so deliveries due meanwhile wait no longer.
_SAVES_PER_CALL = 500


@dataclass(frozen=True, slots=True)
class SessionRecord:
    client: str
    positions: dict[str, int]  # stream -> seq of the last event handed to the socket


class SessionRefused(Exception):
    """A `?session=` that cannot be resumed: `code` is the protocol's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


# The alphabet of base64url; the protocol sends it without padding.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*\Z")


class BadPositions(ValueError):
    """A resume's `positions` the gateway refuses (bad_request, then close 4003)."""

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


def parse_positions(raw: str, max_bytes: int) -> dict[str, int]:
    """A resume's `positions` (base64url without padding of a JSON object: stream -> the
    last seq the client processed; `client.connection.encode_positions` writes it), checked
    for size and shape only, so it is refused before any lookup. Whether the session holds
    each stream, and whether each position is within its stream, can only be checked
    against Redis (`resume_problem`)."""
    if len(raw) > max_bytes:
        raise BadPositions(f"positions longer than the frame limit ({max_bytes} bytes)")
    if not raw or not _BASE64URL.match(raw) or len(raw) % 4 == 1:
        raise BadPositions("positions is not base64url without padding")
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        value = orjson.loads(decoded)
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise BadPositions("positions is not a JSON object encoded as base64url") from None
    if not isinstance(value, dict):
        raise BadPositions("positions must be a JSON object of stream -> seq")
    for stream, seq in value.items():
        if not STREAM_NAME.match(stream):
            raise BadPositions(f"positions names an invalid stream {stream[:100]!a}")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise BadPositions(
                f"position of stream {stream!r} must be a non-negative integer", stream=stream
            )
    return value


def resume_problem(
    positions: Mapping[str, int], held: Mapping[str, int], heads: Mapping[str, int]
) -> BadPositions | None:
    """Why a resume's positions cannot be honoured (None: they can). `held` is what the
    session records, `heads` the head now of each stream to check (one the token no longer
    allows is not looked at: it is not restored at all)."""
    for stream, seq in positions.items():
        if stream not in held:
            return BadPositions(
                f"positions names stream {stream!r}, which the session does not hold",
                stream=stream,
            )
        head = heads.get(stream)
        if head is not None and seq > head:
            return BadPositions(
                f"position {seq} of stream {stream!r} is beyond its head ({head})",
                stream=stream,
                head=head,
            )
    return None


def undelivered_floor(frames: Iterable[str]) -> dict[str, int]:
    """The lowest seq per stream among event frames still waiting to be written.

    Only called when a connection ends (or is checkpointed) with frames still buffered,
    so parsing them costs nothing on the delivery path."""
    lowest: dict[str, int] = {}
    for frame in frames:
        if not frame.startswith('{"type":"event"'):
            continue
        event = orjson.loads(frame)
        seq = event.get("seq")
        if seq is None:
            continue
        stream = event["stream"]
        if stream not in lowest or seq < lowest[stream]:
            lowest[stream] = seq
    return lowest


def delivered_positions(
    cursors: Mapping[str, int], undelivered: Mapping[str, int]
) -> dict[str, int]:
    """Per stream, the last seq the socket was handed: the cursor's, unless an earlier
    event of the stream is still buffered (then just before that one)."""
    positions = dict(cursors)
    for stream, lowest in undelivered.items():
        if stream in positions and lowest - 1 < positions[stream]:
            positions[stream] = lowest - 1
    return positions


def position_changes(
    saved: Mapping[str, int], current: Mapping[str, int]
) -> tuple[dict[str, int], list[str]]:
    """(streams whose position must be written, streams no longer subscribed)."""
    changed = {stream: seq for stream, seq in current.items() if saved.get(stream) != seq}
    gone = [stream for stream in saved if stream not in current]
    return changed, gone


@dataclass(frozen=True, slots=True)
class _ResumeRead:
    tenant: str
    client: str
    session_id: str
    heads_of: tuple[str, ...]


def _session_record(raw: Mapping[bytes, bytes], client_id: str) -> SessionRecord:
    """The record of a session read for `client_id`; SessionRefused when it cannot resume."""
    if not raw or b"client" not in raw:
        raise SessionRefused(
            "not_found",
            "session expired or unknown; connect without it and subscribe with since",
        )
    owner = raw[b"client"].decode()
    if owner != client_id:
        raise SessionRefused("forbidden", "session belongs to another client")
    positions = {
        name.decode()[len(_STREAM_FIELD) :]: int(value)
        for name, value in raw.items()
        if name.startswith(_STREAM_FIELD.encode())
    }
    return SessionRecord(owner, positions)


class SessionStore:
    def __init__(self, client: aredis.Redis) -> None:
        self.client = client
        # Saves, which a reconnect storm's closing connections make by the thousand at once,
        # and the first positions of its resumed subscriptions.
        self._saves: Batches[tuple[PendingSave, int | None], None] = Batches(self.write)
        # A storm's resumes, each a session read, arrive by the thousand at once too.
        self._resumes: Batches[_ResumeRead, tuple[SessionRecord, dict[str, int]]] = Batches(
            self._read_resumes
        )

    @staticmethod
    def _open_ttl() -> int:
        return 2 * conf().session_ttl_s

    def create(self) -> str:
        """A new session's id. Nothing is written until its first subscription: a
        connection costs no Redis round trip for a session it may never resume, and a
        session without streams has nothing to restore."""
        return new_session_id()

    async def resume(
        self, tenant: str, client_id: str, session_id: str, heads_of: Sequence[str] = ()
    ) -> tuple[SessionRecord, dict[str, int]]:
        """The session's record, refreshed for its new connection, and the head now of each
        stream of `heads_of` (the tenant's), read in the same round trip; SessionRefused
        when the session has expired, never existed, or belongs to another client. The
        resumes that arrive together share one pipeline."""
        read = _ResumeRead(tenant, client_id, session_id, tuple(heads_of))
        return await self._resumes.submit(read)

    async def _read_resumes(
        self, reads: Sequence[_ResumeRead]
    ) -> list[tuple[SessionRecord, dict[str, int]] | BaseException]:
        async with self.client.pipeline(transaction=False) as pipe:
            for read in reads:
                key = keys.session(read.tenant, read.session_id)
                pipe.hgetall(key)
                pipe.expire(key, self._open_ttl())
                if read.heads_of:
                    # As a command: a Redis Cluster's pipeline refuses redis-py's mget().
                    heads = [keys.stream_seq(read.tenant, s) for s in read.heads_of]
                    pipe.execute_command("MGET", *heads)
            answers = await pipe.execute(raise_on_error=False)
        results: list[tuple[SessionRecord, dict[str, int]] | BaseException] = []
        at = 0
        for read in reads:
            count = 3 if read.heads_of else 2
            part, at = answers[at : at + count], at + count
            failed = next((a for a in part if isinstance(a, BaseException)), None)
            if failed is not None:
                results.append(failed)
                continue
            try:
                record = _session_record(part[0], read.client)
            except SessionRefused as refused:
                results.append(refused)
                continue
            values = part[2] if read.heads_of else []
            heads = {s: int(v) if v else 0 for s, v in zip(read.heads_of, values, strict=True)}
            results.append((record, heads))
        return results

    async def subscribed(
        self, tenant: str, session_id: str, client_id: str, stream: str, position: int
    ) -> None:
        """Record a subscription's start, in the next batch of saves (a storm's resumed
        subscriptions start by the thousand at once)."""
        save = PendingSave(tenant, session_id, client_id, {stream: position}, [], True)
        await self._saves.submit((save, self._open_ttl()))

    async def unsubscribed(self, tenant: str, session_id: str, stream: str) -> None:
        await self.client.hdel(keys.session(tenant, session_id), _STREAM_FIELD + stream)

    async def save(
        self,
        tenant: str,
        session_id: str,
        client_id: str,
        changed: Mapping[str, int],
        gone: Iterable[str],
        ttl_s: int | None = None,
    ) -> None:
        """Write changed positions; `ttl_s` also resets the key's lifetime. Sent in one
        pipeline with the other saves made at the same moment: a storm's closing
        connections each make their last save at once."""
        save = PendingSave(tenant, session_id, client_id, dict(changed), list(gone), True)
        await self._saves.submit((save, ttl_s))

    async def write(
        self, saves: Sequence[tuple[PendingSave, int | None]]
    ) -> list[None | BaseException]:
        """Write `saves`, each with the lifetime to set (None: the key's is kept): one
        SAVE_SESSIONS call per tenant and `_SAVES_PER_CALL` sessions, where two or three
        commands per session cost the gateway three times the CPU. Per save, the error
        that kept it from being written (None: written)."""
        by_tenant: dict[str, list[int]] = {}
        for index, (save, _) in enumerate(saves):
            by_tenant.setdefault(save.tenant, []).append(index)
        results: list[None | BaseException] = [None] * len(saves)
        for indexes in by_tenant.values():
            for start in range(0, len(indexes), _SAVES_PER_CALL):
                part = indexes[start : start + _SAVES_PER_CALL]
                chunk = [saves[i] for i in part]
                call = SaveSessions(
                    session_keys=[keys.session(save.tenant, save.session_id) for save, _ in chunk],
                    per_save=_save_arguments(chunk),
                )
                try:
                    await call.run_async(self.client)
                except Exception as error:  # noqa: BLE001 - handed to each save's caller
                    for i in part:
                        results[i] = error
        return results


def _save_arguments(saves: Iterable[tuple[PendingSave, int | None]]) -> list[Any]:
    """SAVE_SESSIONS's per-save arguments (streams/lua/save_sessions.lua)."""
    args: list[Any] = []
    for save, ttl_s in saves:
        args += (save.client, ttl_s or 0, len(save.changed), len(save.gone))
        for stream, seq in save.changed.items():
            args += (_STREAM_FIELD + stream, seq)
        args.extend(_STREAM_FIELD + stream for stream in save.gone)
    return args


@dataclass(slots=True)
class PendingSave:
    tenant: str
    session_id: str
    client: str
    changed: dict[str, int]
    gone: list[str]
    refresh: bool  # the key's lifetime is due for a refresh


class Checkpointed(Protocol):
    """A connection whose session the checkpointer keeps current (GatewayConsumer)."""

    def session_changes(self, now: float) -> PendingSave | None: ...

    def session_saved(self, save: PendingSave, now: float) -> None: ...


class Checkpointer:
    """One task per gateway process writing every open session's progress, batched.

    Each interval it looks only at connections that delivered events since the last one
    (`dirty`); every SESSION_TTL_S / 6 it looks at all it holds, to keep idle sessions'
    keys alive. It holds only connections whose session is in Redis (resumed, or
    subscribed at least once): a socket that never subscribed costs nothing here."""

    def __init__(self, store: Callable[[], SessionStore]) -> None:
        self._store = store  # looked up when used: made before any Redis client is
        self.connections: set[Checkpointed] = set()
        self.dirty: set[Checkpointed] = set()
        self._task: asyncio.Task[None] | None = None
        self._next_full_pass = 0.0

    def start(self) -> None:
        """Start the checkpoint task (again, should it have ended); on the gateway's loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def add(self, connection: Checkpointed) -> None:
        self.connections.add(connection)
        self.start()

    def discard(self, connection: Checkpointed) -> None:
        self.connections.discard(connection)
        self.dirty.discard(connection)

    async def _run(self) -> None:
        interval = conf().session_checkpoint_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.checkpoint()
            except Exception:
                # Redis away: what was not written stays pending and is written next time.
                logger.warning("session checkpoint failed; retrying next interval", exc_info=True)

    async def checkpoint(self, full: bool = False) -> int:
        """Write what changed since the last checkpoint; returns sessions written."""
        now = time.monotonic()
        if now >= self._next_full_pass:
            full = True
            self._next_full_pass = now + conf().session_ttl_s / 6
        candidates = list(self.connections if full else self.dirty)
        store = self._store()
        self.dirty = set()
        open_ttl = SessionStore._open_ttl()
        written = 0
        batch: list[tuple[Checkpointed, PendingSave]] = []
        not_reached = iter(candidates)
        try:
            for connection in not_reached:
                save = connection.session_changes(now)
                if save is not None:
                    batch.append((connection, save))
                if len(batch) >= _SAVES_PER_CALL:
                    written += await self._write(store, batch, open_ttl, now)
                    batch = []
            if batch:
                written += await self._write(store, batch, open_ttl, now)
        except Exception:
            # Those not looked at yet are looked at next interval, as the failed ones are.
            self.dirty.update(not_reached)
            raise
        return written

    async def _write(
        self,
        store: SessionStore,
        batch: list[tuple[Checkpointed, PendingSave]],
        open_ttl: int,
        now: float,
    ) -> int:
        results = await store.write(
            [(save, open_ttl if save.refresh else None) for _, save in batch]
        )
        failure: BaseException | None = None
        for (connection, save), error in zip(batch, results, strict=True):
            if error is None:
                connection.session_saved(save, now)
            else:
                self.dirty.add(connection)  # looked at again next interval
                failure = error
        if failure is not None:
            raise failure
        return len(batch)


_store: SessionStore | None = None


def session_store() -> SessionStore:
    global _store
    if _store is None:
        from streams.redis_clients import async_client

        _store = SessionStore(async_client())
    return _store
