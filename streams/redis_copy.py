"""Copying the data plane from one Redis deployment to another: from one Redis to a Redis
Cluster when one machine's Redis is no longer enough, to a bigger single Redis, or back.

A key has the same name on both (every tenant-scoped key carries its tenant's hash tag on a
single Redis too, streams/keys.py), so a copy is every key under the prefix, taken with
DUMP and its remaining time to live on the source and written with RESTORE on the target,
a batch at a time (memory bounded by the batch, whatever the key count). Pub/sub channels
are not keys and need nothing. The copy is of a still deployment: its gateways and workers
stopped, so nothing writes while keys are read (`live_writers` says what still does).

I/O only through the clients given; which deployment is which is the caller's business
(orchestration/management/commands/copy_data_plane.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ResponseError

from streams import keys
from streams.registry import tenants

# Keys read and written per round trip: big enough that round trips do not dominate, small
# enough that a batch of the largest keys (stream logs trimmed to their retention) stays a
# few megabytes in this process.
DEFAULT_BATCH = 200

DataPlaneClient = redis.Redis | RedisCluster


def is_cluster(url: str) -> bool:
    """Whether the Redis at `url` is a node of a Redis Cluster (`cluster_enabled:1`)."""
    probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    finally:
        probe.close()


def open_data_plane(url: str) -> DataPlaneClient:
    """A blocking client of the deployment at `url`: a cluster client (the other nodes
    discovered) when it is a node of a Redis Cluster, else one of that Redis and database."""
    options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30}
    if is_cluster(url):
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def describe(client: DataPlaneClient) -> str:
    """How a client's deployment is named in what the command prints."""
    if isinstance(client, RedisCluster):
        masters = client.get_primaries()
        return f"a Redis Cluster of {len(masters)} master(s)"
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return f"one Redis at {where}, database {kwargs.get('db', 0)}"


def _redis_now(client: DataPlaneClient) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


def live_writers(client: DataPlaneClient) -> list[str]:
    """What in the deployment at `client` may still write, by its own leases: gateways
    whose lease has not lapsed, and runs whose step a worker (or a publisher) holds. Empty
    for a still deployment; a killed process's leases lapse within their length."""
    now = _redis_now(client)
    found = []
    gateways = int(client.zcount(keys.GATEWAY_LEASES, f"({int(now * 1000)}", "+inf"))
    if gateways:
        found.append(f"{gateways} gateway process(es) with a live lease")
    held = 0
    for slug in tenants(cast(redis.Redis, client)):  # the same commands on either client
        held += int(client.zcount(keys.run_leases(slug), f"({now:.3f}", "+inf"))
    if held:
        found.append(f"{held} run(s) whose step a worker holds")
    return found


def _scan(client: DataPlaneClient, match: str, count: int) -> Iterator[bytes]:
    if isinstance(client, RedisCluster):
        # Every master, each to the end of its own cursor; replicas hold the same keys.
        for node in client.get_primaries():
            yield from client.get_redis_connection(node).scan_iter(match=match, count=count)
        return
    yield from client.scan_iter(match=match, count=count)


def _batches(names: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for name in names:
        batch.append(name)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _match_all(prefix: str) -> str:
    # SCAN's MATCH is a glob: the prefix's own glob characters must match only themselves.
    escaped = "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in prefix)
    return f"{escaped}:*"


def first_key(client: DataPlaneClient, prefix: str) -> str | None:
    """One key under `prefix` at `client`, or None when it holds none."""
    for name in _scan(client, _match_all(prefix), 1000):
        return name.decode(errors="replace")
    return None


@dataclass
class CopyReport:
    """What a copy did: keys written, their serialized bytes, keys by type, and keys that
    expired between the scan and their DUMP (not copied: they were gone)."""

    keys: int = 0
    bytes: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    vanished: int = 0
    seconds: float = 0.0


class CopyFailed(RuntimeError):
    """The target refused a key (a DUMP from a newer Redis than the target, say)."""


def copy_keys(
    source: DataPlaneClient,
    target: DataPlaneClient,
    prefix: str,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[CopyReport], None] | None = None,
) -> CopyReport:
    """Every key under `prefix` at `source` written to `target` with its value and its
    remaining time to live, replacing a key of the same name there. Running it again copies
    everything again: a copy stopped halfway is finished by running it once more."""
    report = CopyReport()
    started = time.monotonic()
    for names in _batches(_scan(source, _match_all(prefix), max(batch, 100)), batch):
        read = source.pipeline(transaction=False)
        for name in names:
            read.type(name)
            read.pttl(name)
            read.dump(name)
        answers = read.execute()
        write = target.pipeline(transaction=False)
        written: list[tuple[bytes, str, int]] = []
        for index, name in enumerate(names):
            kind, ttl_ms, payload = answers[3 * index : 3 * index + 3]
            if payload is None or ttl_ms == -2:
                report.vanished += 1
                continue
            # PTTL -1: no expiry, which RESTORE spells 0. A key about to expire keeps at
            # least a millisecond rather than none.
            write.restore(name, max(int(ttl_ms), 1) if ttl_ms >= 0 else 0, payload, replace=True)
            kind_name = kind.decode() if isinstance(kind, bytes) else str(kind)
            written.append((name, kind_name, len(payload)))
        if written:
            for (name, _, _), outcome in zip(
                written, write.execute(raise_on_error=False), strict=True
            ):
                if isinstance(outcome, ResponseError):
                    shown = name.decode(errors="replace")
                    raise CopyFailed(f"the target refused {shown}: {outcome}")
        for _, kind_name, size in written:
            report.keys += 1
            report.bytes += size
            report.by_type[kind_name] += 1
        report.seconds = time.monotonic() - started
        if progress is not None:
            progress(report)
    report.seconds = time.monotonic() - started
    return report


def count_keys(client: DataPlaneClient, prefix: str) -> int:
    """How many keys under `prefix` `client` holds (a full scan: for checks, not hot paths)."""
    return sum(1 for _ in _scan(client, _match_all(prefix), 1000))
