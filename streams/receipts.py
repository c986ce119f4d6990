"""Receipts: how far each client has processed each stream, for "read up to" features.

A client's `receipt` frame records its position with one script (RECORD_RECEIPT): the
position only moves forward and never past the stream's head. Positions live in one hash
per stream (client -> seq); a sorted set per tenant lists the streams that have receipts,
so the admin needs no SCAN. Both expire RECEIPT_TTL_S after the stream's last receipt:
stream names are the clients' to choose, and an abandoned stream's read positions should
not stay in Redis for ever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis

from streams import keys, scripts
from streams.redis_clients import async_client

RECEIPT_TTL_S = 30 * 24 * 3600


class BeyondHead(Exception):
    """The receipt names a seq the stream has not assigned yet; nothing was recorded."""

    def __init__(self, seq: int, head: int) -> None:
        super().__init__(f"seq {seq} is beyond the stream's head {head}")
        self.seq = seq
        self.head = head


@dataclass(frozen=True, slots=True)
class Recorded:
    moved: bool  # False: the stored receipt was already at or past this seq
    seq: int  # the client's receipt now


@dataclass(frozen=True, slots=True)
class StreamReceipts:
    stream: str
    head: int
    receipts: dict[str, int] = field(default_factory=dict)  # client -> seq, by client
    updated_at: float | None = None  # the stream's last receipt (epoch s), when known

    def as_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "head": self.head,
            "receipts": [{"client": c, "seq": s} for c, s in self.receipts.items()],
        }


def _head(value: bytes | None) -> int:
    return int(value) if value else 0


def _positions(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {client.decode(): int(seq) for client, seq in sorted(raw.items())}


class ReceiptStore:
    """The gateway's side: record receipts and read a stream's (async Redis)."""

    def __init__(self, client: aredis.Redis, ttl_s: int = RECEIPT_TTL_S) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def record(self, tenant: str, stream: str, client: str, seq: int) -> Recorded:
        """Move the client's receipt forward to seq; raise BeyondHead past the head."""
        outcome, value = await scripts.RecordReceipt(
            seq_key=keys.stream_seq(tenant, stream),
            receipts_key=keys.receipts(tenant, stream),
            index_key=keys.receipt_index(tenant),
            client=client,
            seq=seq,
            stream=stream,
            ttl=self.ttl_s,
        ).run_async(self.client)
        if outcome == -1:
            raise BeyondHead(seq, int(value))
        return Recorded(outcome == 1, int(value))

    async def read(self, tenant: str, stream: str, client: str | None = None) -> StreamReceipts:
        """The stream's head and its receipts (only `client`'s when given), one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(keys.stream_seq(tenant, stream))
            if client is None:
                pipe.hgetall(keys.receipts(tenant, stream))
            else:
                pipe.hget(keys.receipts(tenant, stream), client)
            head, found = await pipe.execute()
        if client is None:
            positions = _positions(found)
        else:
            positions = {client: int(found)} if found is not None else {}
        return StreamReceipts(stream, _head(head), positions)


_store: ReceiptStore | None = None


def receipt_store() -> ReceiptStore:
    """The process's store, on the process's async client (rebuilt if that was replaced)."""
    global _store
    client = async_client()
    if _store is None or _store.client is not client:
        _store = ReceiptStore(client)
    return _store


def tenant_receipts(
    client: redis.Redis, tenant: str, limit: int = 100, ttl_s: int = RECEIPT_TTL_S
) -> tuple[int, list[StreamReceipts]]:
    """For the admin (sync Redis): how many of the tenant's streams have receipts, and the
    `limit` most recently receipted, newest first, each with its head and receipts."""
    index = keys.receipt_index(tenant)
    # Entries older than the TTL belong to receipts that have expired; the next receipt's
    # script removes them, and until then they are not shown.
    alive_since = f"({time.time() - ttl_s}"
    with client.pipeline(transaction=False) as pipe:
        pipe.zcount(index, alive_since, "+inf")
        pipe.zrevrangebyscore(index, "+inf", alive_since, start=0, num=limit, withscores=True)
        total, entries = pipe.execute()
    if not entries:
        return int(total), []
    with client.pipeline(transaction=False) as pipe:
        for stream, _ in entries:
            pipe.get(keys.stream_seq(tenant, stream.decode()))
            pipe.hgetall(keys.receipts(tenant, stream.decode()))
        found = pipe.execute()
    listed = []
    for position, (stream, score) in enumerate(entries):
        head, raw = found[2 * position], found[2 * position + 1]
        if raw:  # expired between the two reads: nothing to show
            listed.append(StreamReceipts(stream.decode(), _head(head), _positions(raw), score))
    return int(total), listed
