"""How long moving a deployment's data plane from one Redis to a Redis Cluster takes
(`manage.py copy_data_plane`, streams/redis_copy.py), against Redis's own tool for it,
`redis-cli --cluster import --cluster-copy --cluster-replace`, in the same run.

A single Redis (the source) is filled with a deployment's keyspace at rest: per client a
session and a dedupe key (with their TTLs); per stream its log of `--events` events, its
seq, presence and receipts; two tenants. A Redis Cluster of 3 masters and 3 replicas is
started here; the two copiers take turns (`--rounds`), the cluster emptied before each.
Ours runs in a process of its own, so its peak RSS is the copy's; for redis-cli, the
source Redis does the work (MIGRATE), so each turn also reports the source's CPU.

    python -m bench.copy_data_plane
    python -m bench.copy_data_plane --clients 5000 --streams 50 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/copy_data_plane.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import (
    ROOT,
    benchmark_parser,
    command_line,
    describe_latency,
    fmt_ratio,
    loopback_redis_cluster,
    print_header,
    ratio,
    relative,
    summarize,
    write_results,
)

PREFIX = "sb"
TENANTS = ("acme", "globex")
COPIERS = ("copy_data_plane", "redis-cli")
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("copy_data_plane", __doc__)
    parser.add_argument("--clients", type=int, default=50_000, help="sessions and dedupe keys")
    parser.add_argument("--streams", type=int, default=500, help="stream logs")
    parser.add_argument("--events", type=int, default=1_000, help="events per stream log")
    parser.add_argument("--event-bytes", type=int, default=200, help="size of an event's data")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each copier")
    parser.add_argument("--batch", type=int, default=200, help="keys per round trip (ours)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "TARGET"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the copy itself, in a process of its own ---------------------------------------------


def run_child(source_url: str, target_url: str, batch: int) -> None:
    from streams.redis_copy import copy_keys, open_data_plane

    batch_seconds: list[float] = []
    last = time.perf_counter()

    def progress(_: Any) -> None:
        nonlocal last
        now = time.perf_counter()
        batch_seconds.append(now - last)
        last = now

    report = copy_keys(
        open_data_plane(source_url), open_data_plane(target_url), PREFIX, batch, progress
    )
    print(
        json.dumps(
            {
                "keys": report.keys,
                "bytes": report.bytes,
                "batch_ms": [s * 1000 for s in batch_seconds],
            }
        )
    )


# --- the servers and the keyspace ---------------------------------------------------------


@contextmanager
def source_redis() -> Iterator[tuple[str, psutil.Process]]:
    import redis

    from project.launcher import free_port, scratch_redis_argv, wait_until
    from project.redis_cluster import find_server

    root = Path(tempfile.mkdtemp(prefix="switchboard-bench-copy-"))
    port = free_port()
    proc = subprocess.Popen(
        scratch_redis_argv(find_server(), port, root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=port).ping())
            except redis.RedisError:
                return False

        wait_until(answers, 30, "source Redis")
        yield f"redis://127.0.0.1:{port}/0", psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


def fill(url: str, args: argparse.Namespace) -> int:
    """The keyspace of a deployment at rest; returns how many keys."""
    import redis

    client = redis.Redis.from_url(url)
    # Random text, as model output is to a compressor: DUMP compresses what repeats.
    noise = secrets.token_urlsafe(1_000_000)
    pipe = client.pipeline(transaction=False)
    for n in range(args.clients):
        tenant = TENANTS[n % len(TENANTS)]
        tag = f"{{{tenant}}}"
        pipe.hset(
            f"{PREFIX}:sess:{tag}:session-{n}",
            mapping={"client": f"client-{n}", "s:room-1": 10, "s:room-2": 20},
        )
        pipe.expire(f"{PREFIX}:sess:{tag}:session-{n}", 3600)
        pipe.set(f"{PREFIX}:m:{tag}:8:client-{n}:m-{n}", f"{n} e{n}", ex=86_400)
        if n % 1000 == 999:
            pipe.execute()
    for s in range(args.streams):
        tenant = TENANTS[s % len(TENANTS)]
        base = f"{PREFIX}:s:{{{tenant}}}:room-{s}"
        for seq in range(1, args.events + 1):
            start = (seq * 104_729 + s * 7_919) % (len(noise) - args.event_bytes)
            data = noise[start : start + args.event_bytes]
            event = json.dumps({"seq": seq, "kind": "message", "data": data})
            pipe.xadd(f"{base}:log", {"e": event}, id=f"{seq}-0")
            if seq % 1000 == 0:
                pipe.execute()
        pipe.set(f"{base}:seq", args.events)
        pipe.hset(f"{base}:presence.names", mapping={f"client-{s}": "a name"})
        pipe.hset(f"{base}:receipts", mapping={f"client-{s}": args.events})
        pipe.execute()
    pipe.sadd(f"{PREFIX}:tenants", *TENANTS)
    pipe.execute()
    return int(client.dbsize())


def empty(cluster_url: str) -> None:
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(cluster_url)
    for node in client.get_primaries():
        client.get_redis_connection(node).flushall()
    client.close()


def held(cluster_url: str) -> int:
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(cluster_url)
    total = sum(int(client.get_redis_connection(n).dbsize()) for n in client.get_primaries())
    client.close()
    return total


def timed_child(argv: list[str], source: psutil.Process) -> dict[str, Any]:
    """Run `argv` to its end: wall time, its peak RSS, the source Redis's CPU meanwhile."""
    cpu_before = sum(source.cpu_times()[:2])
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        # Sampled, not the rusage's peak: that counts the fork of this process before exec.
        peak_rss = 0
        watched = psutil.Process(proc.pid)
        while True:
            with contextlib.suppress(psutil.Error):
                peak_rss = max(peak_rss, watched.memory_info().rss)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{text[-2000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss / MIB,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "source_redis_cpu_s": sum(source.cpu_times()[:2]) - cpu_before,
        "output": text,
    }


def copier_argv(copier: str, source_url: str, cluster_url: str, batch: int) -> list[str]:
    if copier == "copy_data_plane":
        return [
            sys.executable, "-m", "bench.copy_data_plane",
            "--child", source_url, cluster_url, "--batch", str(batch),
        ]  # fmt: skip
    source = source_url.removeprefix("redis://").rsplit("/", 1)[0]
    node = cluster_url.removeprefix("redis://")
    return [
        shutil.which("redis-cli") or "redis-cli", "--cluster", "import", node,
        "--cluster-from", source, "--cluster-copy", "--cluster-replace",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(*args.child, args.batch)
        return 0
    if shutil.which("redis-cli") is None:
        raise SystemExit("redis-cli is needed for the baseline (Debian's redis-tools)")
    params = {k: v for k, v in vars(args).items() if k != "child"}
    machine = print_header("copy_data_plane: one Redis to a Redis Cluster", params)
    from project.launcher import free_port

    results: dict[str, list[dict[str, Any]]] = {copier: [] for copier in COPIERS}
    with source_redis() as (source_url, source_proc):
        keys = fill(source_url, args)
        print(f"source: {keys} keys, {source_proc.memory_info().rss / MIB:.0f} MiB RSS")
        with loopback_redis_cluster(free_port() + 100, masters=3, replicas=1) as cluster:
            for turn in range(args.rounds):
                for copier in COPIERS:
                    empty(cluster.url)
                    run = timed_child(
                        copier_argv(copier, source_url, cluster.url, args.batch), source_proc
                    )
                    run["keys_at_target"] = held(cluster.url)
                    if copier == "copy_data_plane":
                        line = run["output"].strip().splitlines()[-1]
                        copied = json.loads(line)
                        run["bytes"] = copied["bytes"]
                        run["batch_ms"] = summarize(copied.pop("batch_ms"))
                    run.pop("output")
                    run["keys_per_s"] = run["keys_at_target"] / run["seconds"]
                    results[copier].append(run)
                    print(
                        f"round {turn + 1} {copier}: {run['keys_at_target']} keys in "
                        f"{run['seconds']:.1f} s ({run['keys_per_s']:,.0f} keys/s), peak RSS "
                        f"{run['peak_rss_mib']:.0f} MiB, its CPU {run['cpu_s']:.1f} s, the "
                        f"source Redis's CPU {run['source_redis_cpu_s']:.1f} s"
                    )
                    if "batch_ms" in run:
                        print("  " + describe_latency("per batch of keys", run["batch_ms"]))
                    if run["keys_at_target"] != keys:
                        raise SystemExit(f"{copier} left {run['keys_at_target']} of {keys} keys")
    best = {copier: min(r["seconds"] for r in runs) for copier, runs in results.items()}
    time_ratio = ratio(best["copy_data_plane"], best["redis-cli"])
    print(
        f"-- ratio: copy_data_plane's time / redis-cli's (best of each): {fmt_ratio(time_ratio)} --"
    )
    path = write_results(
        "copy_data_plane",
        time.strftime("%Y%m%d-%H%M%S"),
        {
            "benchmark": "copy_data_plane",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "keys": keys,
            "results": results,
            "ratios": {"time": time_ratio},
        },
    )
    print(f"results: {relative(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
