"""The cost of SWITCHBOARD_REPLICA_ACKS: a client `publish`'s ack latency when the ack waits
for one replica (Redis `WAIT 1` behind the append, on its connection) versus on the
master's word, in the same run, on the same servers.

It measures the gateway's write path itself (streams/log.py StreamStore.publish, the
script and, with the setting, the WAIT), without sockets, so the difference is the WAIT's
alone. `--writers` concurrent writers each publish one message after another to their own
stream of one tenant for `--seconds`, alternating the two settings `--rounds` times (so a
drift of the machine hits both). On a Redis Cluster of 3 masters and 3 replicas started
here (project/redis_cluster.py), and on a single Redis with one replica.

    python -m bench.replica_acks
    python -m bench.replica_acks --writers 32 --seconds 5 --rounds 3 --targets cluster
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/replica_acks.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    benchmark_parser,
    command_line,
    describe_latency,
    fmt_ratio,
    print_header,
    ratio,
    relative,
    summarize,
    write_results,
)

TENANT = "bench"
# "0": the setting off (the script alone, through redis-py's client); "0-direct": the
# replica-ack path with `WAIT 0` (its pipeline on the slot owner's connection, no replica
# waited for), which isolates the wait itself; "1": the setting at 1.
SETTINGS = ("0", "0-direct", "1")
TARGETS = ("cluster", "single")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("replica_acks", __doc__)
    parser.add_argument("--writers", type=int, default=16, help="concurrent writers")
    parser.add_argument("--seconds", type=float, default=5.0, help="per setting per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the settings")
    parser.add_argument("--data-bytes", type=int, default=100, help="size of each publish")
    parser.add_argument("--timeout-ms", type=int, default=1000, help="the WAIT's timeout")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    return args


@dataclass(frozen=True, slots=True)
class Frame:
    id: str
    stream: str
    data: Any


@contextmanager
def single_redis_with_replica() -> Iterator[str]:
    """A master and one replica on loopback, from the Redis Cluster's redis-server."""
    from project.launcher import free_port, scratch_redis_argv, wait_until
    from project.redis_cluster import find_server

    server = find_server()
    root = Path(tempfile.mkdtemp(prefix="switchboard-bench-redis-"))
    master, replica = free_port(), free_port()
    procs = []
    try:
        for port, extra in ((master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])):
            (root / str(port)).mkdir()
            procs.append(
                subprocess.Popen(
                    scratch_redis_argv(server, port, root / str(port), *extra),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        import redis

        def linked() -> bool:
            try:
                info = redis.Redis(port=replica).info("replication")
            except redis.RedisError:
                return False
            return info.get("master_link_status") == "up"

        wait_until(linked, 30, "replica in sync")
        yield f"redis://127.0.0.1:{master}/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def store_on(target: str, url: str) -> AsyncIterator[Any]:
    from streams import redis_clients
    from streams.log import StreamStore

    # The gateway's own client (a Redis Cluster one when REDIS_CLUSTER_URL is set), with
    # its pool and options.
    redis_clients.reset_after_fork()
    client: Any = redis_clients.async_client()
    if target == "cluster":
        # redis-py 8.1's asyncio cluster client fails commands sent concurrently before
        # its first one has read the slot map ('NoneType' object has no attribute
        # 'writelines'): read it first.
        await client.initialize()
    try:
        yield {"0": StreamStore(client), "0-direct": direct_store(client), "1": StreamStore(client)}
    finally:
        await client.aclose()
        redis_clients.reset_after_fork()


def direct_store(client: Any) -> Any:
    """A StreamStore whose writes take the replica-ack path with `WAIT 0`."""
    from streams import replication
    from streams.log import StreamStore

    class Direct(StreamStore):
        async def _write(self, call: Any, dedupe_key: str) -> Any:
            answer, _ = await replication.run_replicated(call, self.client, 0, 0)
            return answer

    return Direct(client)


async def measure(
    stores: dict[str, Any], acks: str, args: argparse.Namespace, round_no: int
) -> list[float]:
    """Ack latencies (ms) of every publish in one window at one setting."""
    store = stores[acks]
    store.replica_acks = 1 if acks == "1" else 0
    store.replica_ack_timeout_ms = args.timeout_ms
    data = {"pad": "x" * args.data_bytes}
    latencies: list[float] = []
    deadline = time.monotonic() + args.seconds

    async def writer(index: int) -> None:
        number = 0
        while time.monotonic() < deadline:
            frame = Frame(f"r{round_no}-a{acks}-w{index}-{number}", f"s{index}", data)
            started = time.perf_counter()
            await store.publish(TENANT, f"writer-{index}", frame)
            latencies.append((time.perf_counter() - started) * 1000)
            number += 1

    await asyncio.gather(*(writer(i) for i in range(args.writers)))
    return latencies


async def run_target(target: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    by_setting: dict[str, list[float]] = {acks: [] for acks in SETTINGS}
    async with store_on(target, url) as stores:
        warm_up = argparse.Namespace(**{**vars(args), "seconds": 1.0})
        for acks in SETTINGS:
            await measure(stores, acks, warm_up, -1)
        for round_no in range(args.rounds):
            for acks in SETTINGS if round_no % 2 == 0 else tuple(reversed(SETTINGS)):
                by_setting[acks].extend(await measure(stores, acks, args, round_no))
    seconds = args.seconds * args.rounds
    result: dict[str, Any] = {}
    for acks, values in by_setting.items():
        stats = summarize(values)
        stats["per_s"] = len(values) / seconds
        result[f"acks={acks}"] = stats
    return result


def report(target: str, result: dict[str, Any]) -> None:
    print(f"\n-- {target} --")
    for acks in SETTINGS:
        stats = result[f"acks={acks}"]
        label = f"REPLICA_ACKS={acks}"
        print(describe_latency(f"{label} ack latency", stats) + f", {stats['per_s']:.0f} acks/s")
    waited = result["acks=1"]
    for base_name in ("0", "0-direct"):
        base = result[f"acks={base_name}"]
        print(
            f"ratios (1 / {base_name}): p50 "
            + fmt_ratio(ratio(waited["p50"], base["p50"]))
            + ", p99 "
            + fmt_ratio(ratio(waited["p99"], base["p99"]))
            + ", p99.9 "
            + fmt_ratio(ratio(waited["p99.9"], base["p99.9"]))
            + ", throughput "
            + fmt_ratio(ratio(waited["per_s"], base["per_s"]))
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    # A broker apart from the streams' Redis on both targets, as a Redis Cluster requires:
    # the same script calls on each (no publish here starts a trigger, so it is not used).
    os.environ["CELERY_BROKER_URL"] = "memory://"
    import django

    django.setup()
    from django.test import override_settings

    from project.redis_cluster import RedisCluster

    params = {k: v for k, v in vars(args).items()}
    machine = print_header("replica acks: ack latency with and without WAIT 1", params)
    results: dict[str, Any] = {}
    for target in args.targets:
        if target == "cluster":
            with (
                RedisCluster.start_new() as running,
                override_settings(REDIS_CLUSTER_URL=running.url),
            ):
                results[target] = asyncio.run(run_target(target, running.url, args))
        else:
            with single_redis_with_replica() as url, override_settings(REDIS_URL=url):
                results[target] = asyncio.run(run_target(target, url, args))
        report(target, results[target])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = write_results(
        "replica_acks",
        stamp,
        {"command": command_line(), "machine": machine, "params": params, "results": results},
    )
    print(f"\nresults: {relative(path)}")


if __name__ == "__main__":
    main()
