"""Capacity: Redis commands and Redis CPU per operation, and publish/send throughput by mode.

Against the real processes (daphne gateways, a Celery worker; `project/launcher.py`), one
system per mode, each on a freshly flushed data plane. Modes (`--modes`):

- `single`:    one Redis (`--redis-url`) holds the streams;
- `cluster-1`: a Redis Cluster of 1 master + 1 replica, started by the benchmark on
               `--cluster-port` and up (project/redis_cluster.py);
- `cluster-3`: a Redis Cluster of 3 masters + 3 replicas, the same way.

The Celery broker (and the channel layer) is a separate throwaway Redis in every mode
(`--broker separate`, the default), so the data plane's figures are its own and the
modes compare; `--broker same` puts it in the single Redis, as the embedded deployment
does (single mode only). The broker's commands and CPU are reported apart.

Clients are spread over `--tenants` tenants (2 on each master of a 3-master cluster: a
tenant is the unit a cluster co-locates), each connection on its own stream. Phases, each
measured by INFO commandstats and used_cpu_user+used_cpu_sys before and after, summed over
the nodes (commands over masters, since a replica counts its master's writes again; CPU
over masters, and over every node beside it), minus the background the same system
spends with no client (measured first, `--quiet` seconds, scaled to the phase's length):

  connect          `--connections` authenticated connections (welcome received)
  idle             held for `--idle` s: per connection per minute
  subscribe        each subscribes to its own stream (presence on: a join)
  idle_subscribed  held `--idle` s more, subscribed: per subscribed connection per minute
  publish          `publish` at `--publish-rate`/s for `--seconds` (to a stream with its
                   one subscriber, the publisher): per publish
  send             `send` to the echo agent (latency 0, 1 piece) at `--send-rate`/s, the run
                   included: per send
  stream           `send` whose reply streams `--deltas` pieces `--piece-ms` apart (simulated
                   model; pieces further apart than the flush interval are a delta each), at
                   `--stream-rate`/s: per streamed reply, and per reply delta delivered
                   ((stream - send) / (its deltas - send's deltas))
  publish_max      `publish` offered at `--publish-max-rate`/s, at most `--max-pending`
                   unanswered (a frame due beyond that is skipped): throughput achieved
  send_max         `send` the same way at `--send-max-rate`/s: throughput achieved
  redis_fanout     (single mode) Redis CPU per PUBLISH of a 400-byte event with 1, 10 and 50
                   connections subscribed to its channel: the price of each further
                   gateway subscribed to a stream
  idle_shared      each connection also subscribes to a stream shared with
                   `--clients-per-stream` clients of its tenant, held `--idle` s: the
                   renewal per client-minute on a shared stream (this phase's cost minus
                   idle_subscribed's)
  publish_direct   the data plane alone: `--direct-procs` processes call the publish path
                   (StreamStore.publish, the gateway's own code and Redis client) as fast
                   as Redis answers, `--direct-concurrency` in flight each, for `--seconds`:
                   publishes per second Redis sustains without a gateway in front

The throughput phases offer more than the system on this machine can do, capped by the
answers (a closed loop), so the achieved rate is its capacity; the Redis CPU beside it
says whether Redis was the limit (on a small machine it is the gateway's and the worker's
CPU; the data plane alone, with Redis the limit, is bench/data_plane.py's measurement).
Ratios: cluster-3 / cluster-1, and each mode / single.

    python -m bench.capacity                                   # every mode, full size
    python -m bench.capacity --modes single --connections 200 --idle 10 --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/capacity.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import (
    ROOT,
    BenchEnv,
    LoadClient,
    ProcessSampler,
    Results,
    benchmark_parser,
    cpu_seconds,
    describe_latency,
    describe_processes,
    fmt_ratio,
    gateway_base,
    loopback_redis_cluster,
    parse_benchmark_args,
    ratio,
    run_benchmark,
    server_processes,
    subset_argument,
    sum_counts,
    summarize,
)
from project.launcher import embedded_redis_binary, free_port, scratch_redis_argv, wait_until
from project.redis_cluster import master_index_of_tag

logger = logging.getLogger(__name__)

MODES = ("single", "cluster-1", "cluster-3")
MASTERS = {"cluster-1": 1, "cluster-3": 3}
OPEN_LIMITS = {
    "client_messages_per_s": 100_000,
    "client_burst": 100_000,
    "tenant_messages_per_s": 100_000,
    "tenant_burst": 100_000,
    "max_runs_in_flight_per_connection": 100_000,
    "max_queued_runs": 1_000_000,
    "max_connections": 1_000_000,
}
# Commands the meter itself sends, never charged to an operation.
METER_COMMANDS = {"info", "config|resetstat", "ping"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("capacity", __doc__)
    subset_argument(parser, MODES, "modes")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times each mode runs, alternating; medians"
    )
    parser.add_argument("--connections", type=int, default=1000, help="client connections")
    parser.add_argument("--tenants", type=int, default=6, help="tenants the clients spread over")
    parser.add_argument("--gateways", type=int, default=1, help="daphne processes")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=8, help="pool of each worker")
    parser.add_argument("--quiet", type=float, default=10, help="seconds of background measured")
    parser.add_argument("--idle", type=float, default=60, help="seconds each idle phase lasts")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of each load phase")
    parser.add_argument("--publish-rate", type=float, default=500, help="publishes/s")
    parser.add_argument("--send-rate", type=float, default=100, help="sends/s (echo, 1 piece)")
    parser.add_argument("--stream-rate", type=float, default=20, help="streamed replies/s")
    parser.add_argument("--deltas", type=int, default=20, help="pieces per streamed reply")
    parser.add_argument("--piece-ms", type=int, default=75, help="ms between pieces")
    parser.add_argument("--publish-max-rate", type=float, default=4000, help="offered publishes/s")
    parser.add_argument("--send-max-rate", type=float, default=1000, help="offered sends/s")
    parser.add_argument(
        "--phases",
        default="all",
        help="comma-separated phases after connect (idle,subscribe,idle_subscribed,publish,"
        "send,stream,publish_max,send_max,publish_direct); subscribe is always run before the"
        " load phases",
    )
    parser.add_argument(
        "--broker", choices=("separate", "same"), default="separate", help="see the description"
    )
    parser.add_argument(
        "--cluster-port", type=int, default=7600, help="first port of the benchmark's cluster"
    )
    parser.add_argument("--drain", type=float, default=15, help="seconds to wait for replies")
    parser.add_argument(
        "--clients-per-stream", type=int, default=100, help="sharing a stream in idle_shared"
    )
    parser.add_argument(
        "--max-pending",
        type=int,
        default=256,
        help="the throughput phases send only while fewer are unanswered (closed loop)",
    )
    parser.add_argument(
        "--direct-procs", type=int, default=2, help="processes of the publish_direct phase"
    )
    parser.add_argument(
        "--direct-concurrency", type=int, default=32, help="publishes in flight per process"
    )
    args = parse_benchmark_args(parser, argv, MODES, "modes", profile=False)
    if args.broker == "same" and any(m != "single" for m in args.modes):
        parser.error("--broker same is for --modes single only")
    return args


# --- Redis meters ----------------------------------------------------------------------------


class RedisMeter:
    """Commands (INFO commandstats, those run inside Lua scripts included) and CPU
    (used_cpu_user + used_cpu_sys) of a set of Redis servers, summed.

    Commands are counted on masters only: a replica counts again every write it applies
    from its master. CPU is counted on masters (`cpu_s`: what a master's one thread
    spends, which sizes masters) and on every node (`cpu_s_all`, replicas included: what
    the deployment spends)."""

    def __init__(self, nodes: dict[str, redis.Redis]) -> None:
        self.nodes = nodes
        self.masters = {
            name for name, node in nodes.items() if node.info("replication")["role"] == "master"
        }

    def snapshot(self) -> dict[str, Any]:
        per_node = {}
        for name, node in self.nodes.items():
            stats = node.info("commandstats")
            cpu = node.info("cpu")
            memory = int(node.info("memory")["used_memory"])
            calls = {}
            for key, value in stats.items():
                command = key.removeprefix("cmdstat_")
                if command not in METER_COMMANDS:
                    calls[command] = int(value["calls"] if isinstance(value, dict) else 0)
            per_node[name] = {
                "calls": calls,
                "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                "memory": memory,
                "master": name in self.masters,
            }
        return {"t": time.monotonic(), "nodes": per_node}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        calls: dict[str, int] = {}
        cpu_by_node: dict[str, float] = {}
        cpu_masters = 0.0
        memory = 0
        for name, now in after["nodes"].items():
            then = before["nodes"][name]
            cpu_by_node[name] = now["cpu_s"] - then["cpu_s"]
            memory += now["memory"] - then["memory"]
            if not now["master"]:
                continue
            cpu_masters += cpu_by_node[name]
            for command, count in now["calls"].items():
                diff = count - then["calls"].get(command, 0)
                if diff:
                    calls[command] = calls.get(command, 0) + diff
        return {
            "memory_bytes": memory,
            "seconds": after["t"] - before["t"],
            "commands": sum(calls.values()),
            "calls": calls,
            "cpu_s": cpu_masters,
            "cpu_s_all": sum(cpu_by_node.values()),
            "cpu_s_by_node": cpu_by_node,
        }


def redis_pid(node: redis.Redis) -> int:
    return int(node.info("server")["process_id"])


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A Redis of our own on a free loopback port (the broker kept apart from the data plane)."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="switchboard-bench-broker-"))
    proc = subprocess.Popen(
        scratch_redis_argv(shutil.which("redis-server") or embedded_redis_binary(), port, data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _pings(url), 15, "broker redis")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


# --- tenants ---------------------------------------------------------------------------------


def tenant_slugs(count: int) -> list[str]:
    """`count` tenant slugs spread evenly over the masters of a 3-master cluster (and so
    over any even split into 3), chosen by their hash slot."""
    per_master = max(1, count // 3)
    chosen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    index = 0
    while sum(len(v) for v in chosen.values()) < count:
        slug = f"cap{index}"
        index += 1
        bucket = chosen[master_index_of_tag(slug, 3)]
        if len(bucket) < per_master or all(len(v) >= per_master for v in chosen.values()):
            bucket.append(slug)
    # Interleaved, so consecutive connections (and the load's round robin) alternate masters.
    order = []
    for i in range(count):
        for m in range(3):
            if i < len(chosen[m]):
                order.append(chosen[m][i])
    return order[:count]


def prepare_tenants(env: BenchEnv, slugs: list[str]) -> dict[str, str]:
    """The tenants, created with open limits; returns each one's signing secret."""
    env.prepare()
    from tenants.models import Tenant

    for slug in slugs:
        Tenant.objects.get_or_create(slug=slug)
    Tenant.objects.filter(slug__in=slugs).update(**OPEN_LIMITS)
    return {t.slug: t.signing_secret for t in Tenant.objects.filter(slug__in=slugs)}


def client_tokens(secrets: dict[str, str], slugs: list[str], count: int) -> list[str]:
    from tenants.tokens import issue_token

    return [
        issue_token(secrets[slugs[i % len(slugs)]], slugs[i % len(slugs)], f"c{i}", 6 * 3600)
        for i in range(count)
    ]


# --- one mode --------------------------------------------------------------------------------


PHASES = (
    "idle",
    "subscribe",
    "idle_subscribed",
    "publish",
    "send",
    "stream",
    "publish_max",
    "send_max",
    "publish_direct",
    "redis_fanout",
    "idle_shared",
)


def chosen_phases(args: argparse.Namespace) -> list[str]:
    if args.phases == "all":
        return list(PHASES)
    wanted = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = wanted - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    if "idle_shared" in wanted:
        wanted.add("idle_subscribed")
    if wanted & {"publish", "send", "stream", "publish_max", "send_max", "idle_subscribed"}:
        wanted.add("subscribe")
    return [p for p in PHASES if p in wanted]


@contextlib.contextmanager
def data_plane(
    mode: str, args: argparse.Namespace
) -> Iterator[tuple[dict[str, redis.Redis], dict[str, str]]]:
    """(the data plane's nodes by name, the environment that points the system at it)."""
    if mode == "single":
        node = redis.Redis.from_url(args.redis_url)
        node.flushdb()
        yield {"redis": node}, {}
        return
    if "REDIS_CLUSTER_URL" not in (ROOT / "project" / "settings.py").read_text():
        raise SystemExit(
            f"mode {mode} needs Redis Cluster support (REDIS_CLUSTER_URL in project/settings.py)"
        )
    print(f"  starting a Redis Cluster of {MASTERS[mode]} masters + replicas ...", flush=True)
    with loopback_redis_cluster(args.cluster_port, MASTERS[mode], replicas=1) as cluster:
        named = {f"redis-{port}": node.client(timeout=10) for port, node in cluster.nodes.items()}
        yield named, {"REDIS_CLUSTER_URL": cluster.url}


def run_mode(env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace) -> dict:
    mode = mode_of(variant)
    slugs = tenant_slugs(args.tenants)
    secrets = prepare_tenants(env, slugs)
    tokens = client_tokens(secrets, slugs, args.connections)
    single_url = args.redis_url
    with contextlib.ExitStack() as stack:
        nodes, plane_env = stack.enter_context(data_plane(mode, args))
        if args.broker == "same":
            broker_url = single_url
        else:
            broker_url = stack.enter_context(throwaway_redis())
        # REDIS_URL is what the launcher flushes and hands the system: the single Redis in
        # single mode, the broker's otherwise (REDIS_CLUSTER_URL then holds the streams).
        env.redis_url = single_url if mode == "single" else broker_url
        system_env = {
            **plane_env,
            "CELERY_BROKER_URL": broker_url,
            "SWITCHBOARD_WORKER_MAX_CALLS": str(max(1000, int(args.stream_rate * 10))),
            "SWITCHBOARD_MAX_QUEUED_RUNS_PER_TENANT": "1000000",
        }
        if mode == "single" and args.broker == "separate":
            system_env["REDIS_URL"] = single_url
        broker_apart = broker_url != single_url or mode != "single"
        data_meter = RedisMeter(nodes)
        broker_meter = (
            RedisMeter({"broker": redis.Redis.from_url(broker_url)}) if broker_apart else None
        )
        with env.cluster(
            variant,
            gateways=args.gateways,
            workers=args.workers,
            worker_concurrency=args.worker_concurrency,
            env=system_env,
        ) as cluster:
            procs = server_processes(cluster)
            for name, node in nodes.items():
                procs[name] = redis_pid(node)
            if broker_meter is not None:
                procs["broker-redis"] = redis_pid(broker_meter.nodes["broker"])
            sampler = ProcessSampler(procs).start()
            try:
                result = measure(client, cluster, args, tokens, data_meter, broker_meter)
            finally:
                processes = sampler.stop()
            client.all("close", group="load")
    result["mode"] = variant
    result["per_op"] = per_op(result)
    result["server_processes"] = processes
    result["tenants"] = slugs
    result["broker"] = "separate" if broker_apart else "same Redis as the streams"
    return result


class Phases:
    """Runs and records the phases: counters around each, minus the background."""

    def __init__(
        self, data: RedisMeter, broker: RedisMeter | None, servers: dict[str, int]
    ) -> None:
        self.data = data
        self.broker = broker
        # Gateways and workers (with their pool processes): their CPU per operation too.
        self.servers = {n: pid for n, pid in servers.items() if n.startswith(("gateway", "worker"))}
        self.background: dict[str, Any] | None = None
        self.records: dict[str, dict[str, Any]] = {}

    def _server_cpu(self) -> dict[str, float]:
        cpu: dict[str, float] = {}
        for name, pid in self.servers.items():
            try:
                tree = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
            role = name.split("-")[0]
            cpu[role] = cpu.get(role, 0.0) + cpu_seconds(tree)
        return cpu

    def _snap(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.data.snapshot(), self.broker.snapshot() if self.broker else None

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {}
        before = self._snap()
        cpu_before = self._server_cpu()
        yield record
        cpu_after = self._server_cpu()
        after = self._snap()
        record["server_cpu_s"] = {
            role: round(cpu_after[role] - cpu_before.get(role, 0.0), 3) for role in cpu_after
        }
        data = RedisMeter.delta(before[0], after[0])
        broker = RedisMeter.delta(before[1], after[1]) if before[1] and after[1] else None
        record["seconds"] = round(data["seconds"], 2)
        record["data_raw"] = data
        record["broker_raw"] = broker
        if self.background is None:
            self.background = {"data": data, "broker": broker}
        record["data"] = self._net(data, self.background["data"])
        record["broker"] = self._net(broker, self.background["broker"]) if broker else None
        self.records[name] = record

    @staticmethod
    def _net(raw: dict[str, Any], background: dict[str, Any]) -> dict[str, Any]:
        """The phase's counters minus the background's rate over the phase's length."""
        scale = raw["seconds"] / background["seconds"]
        calls = {
            command: count - background["calls"].get(command, 0) * scale
            for command, count in raw["calls"].items()
        }
        return {
            "memory_bytes": raw["memory_bytes"],
            "commands": raw["commands"] - background["commands"] * scale,
            "cpu_s": raw["cpu_s"] - background["cpu_s"] * scale,
            "cpu_s_all": raw["cpu_s_all"] - background["cpu_s_all"] * scale,
            "calls": calls,
            "busiest_node_cpu_pct": round(
                100 * max(raw["cpu_s_by_node"].values()) / raw["seconds"], 1
            ),
        }


def measure(
    client: LoadClient,
    cluster: Any,
    args: argparse.Namespace,
    tokens: list[str],
    data_meter: RedisMeter,
    broker_meter: RedisMeter | None,
) -> dict[str, Any]:
    phases = Phases(data_meter, broker_meter, server_processes(cluster))
    wanted = chosen_phases(args)
    bases = [gateway_base(cluster, g) for g in range(args.gateways)]
    # Background first: the system up, no client.
    with phases.measure("quiet"):
        time.sleep(args.quiet)
    urls = [f"{bases[i % len(bases)]}/ws/v1/?token={t}" for i, t in enumerate(tokens)]
    with phases.measure("connect") as record:
        opened = client.open_spread("load", urls, "welcome")
        record["ops"] = opened["opened"]
        record["failed"] = opened["failed"]
        record["connect_ms"] = summarize(opened["latencies_ms"])
    if opened["failed"]:
        print(f"  {opened['failed']} connections failed: {opened['errors']}")
    if not opened["opened"]:
        raise RuntimeError("no connection opened: see the gateway's log")
    print(f"  connect: {opened['opened']} connections", flush=True)
    if "idle" in wanted:
        with phases.measure("idle") as record:
            time.sleep(args.idle)
            record["ops"] = opened["opened"]
    if "subscribe" in wanted:
        with phases.measure("subscribe") as record:
            client.subscribe("load", prefix="cap-")
            record["ops"] = opened["opened"]
    if "idle_subscribed" in wanted:
        with phases.measure("idle_subscribed") as record:
            time.sleep(args.idle)
            record["ops"] = opened["opened"]
    # The throughput phases are capped by --max-pending: offered far above capacity in an
    # open loop, the backlog (not the system's capacity) would decide what is measured.
    capped = {"publish_max", "send_max"}
    loads = {
        "publish": ("publish", args.publish_rate, {}),
        "send": ("switchboard", args.send_rate, {"latency_ms": 0, "chunks": 1}),
        "stream": (
            "switchboard",
            args.stream_rate,
            {"latency_ms": 0, "chunks": args.deltas, "chunk_delay_ms": args.piece_ms},
        ),
        "publish_max": ("publish", args.publish_max_rate, {}),
        "send_max": ("switchboard", args.send_max_rate, {"latency_ms": 0, "chunks": 1}),
    }
    for name, (mode, rate, options) in loads.items():
        if name not in wanted:
            continue
        print(f"  {name}: {rate:g}/s offered for {args.seconds:g} s ...", flush=True)
        # Long enough text that every piece has some (the echo model splits the prompt).
        text = "capacity " * max(4, options.get("chunks", 1))
        with phases.measure(name) as record:
            replies = client.all(
                "load",
                [{"id_prefix": f"{name}{index}-"} for index in range(client.procs)],
                group="load",
                mode=mode,
                rate=rate / client.procs,
                seconds=args.seconds,
                warmup=0,
                drain=args.drain,
                stream_prefix="cap-",
                text=text,
                agent="echo",
                options=options,
                max_pending=args.max_pending // client.procs if name in capped else 0,
            )
            record.update(merge_load(replies))
    if "redis_fanout" in wanted and data_meter.nodes.keys() == {"redis"}:
        print("  redis_fanout: Redis CPU per PUBLISH by subscribed connections ...", flush=True)
        phases.records["redis_fanout"] = redis_fanout(data_meter.nodes["redis"])
    if "idle_shared" in wanted:
        # Each connection also joins a stream shared with --clients-per-stream others of its
        # tenant (clients alternate tenants, so consecutive runs of tenants x N share one).
        group_by = args.clients_per_stream * args.tenants
        with phases.measure("subscribe_shared") as record:
            client.subscribe("load", prefix="room-", group_by=group_by)
            record["ops"] = opened["opened"]
        print(f"  idle_shared: {args.idle:g} s with a shared stream as well ...", flush=True)
        with phases.measure("idle_shared") as record:
            time.sleep(args.idle)
            record["ops"] = opened["opened"]
            record["clients_per_stream"] = args.clients_per_stream
    if "publish_direct" in wanted:
        print(f"  publish_direct: {args.direct_procs} processes for {args.seconds:g} s ...")
        with phases.measure("publish_direct") as record:
            record.update(publish_direct(cluster.child_env(), args))
    return {"phases": phases.records, "background": phases.background, "connect": opened}


def redis_fanout(
    node: redis.Redis, counts: tuple[int, ...] = (1, 10, 50), publishes: int = 20_000
) -> dict[str, Any]:
    """Redis CPU per PUBLISH of a 400-byte event by how many connections subscribe to its
    channel: what each further gateway subscribed to a stream costs Redis (single mode)."""
    pool = redis.ConnectionPool(**node.connection_pool.connection_kwargs)
    payload = b"e" * 400
    out: dict[str, Any] = {}
    for count in counts:
        subscribers = [redis.Redis(connection_pool=pool).pubsub() for _ in range(count)]
        for sub in subscribers:
            sub.subscribe("capacity-fanout")
        stop = threading.Event()

        readers = [
            threading.Thread(target=_drain, args=(sub, stop), daemon=True) for sub in subscribers
        ]
        for reader in readers:
            reader.start()
        before = node.info("cpu")
        pipe = node.pipeline(transaction=False)
        for index in range(publishes):
            pipe.publish("capacity-fanout", payload)
            if index % 500 == 499:
                pipe.execute()
        pipe.execute()
        after = node.info("cpu")
        stop.set()
        for reader in readers:
            reader.join()
        for sub in subscribers:
            sub.close()
        used = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_user", "used_cpu_sys"))
        out[str(count)] = round(1e6 * used / publishes, 2)
    return {"cpu_us_per_publish_by_subscribers": out}


def _drain(sub: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        sub.get_message(timeout=0.1)


def publish_direct(system_env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Processes calling the publish path directly; their counts and CPU summed."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    slugs = tenant_slugs(args.tenants)
    with context.Pool(args.direct_procs) as pool:
        outcomes = pool.starmap(
            direct_worker,
            [
                (system_env, slugs, index, args.seconds, args.direct_concurrency)
                for index in range(args.direct_procs)
            ],
        )
    ops = sum(o["ops"] for o in outcomes)
    span = max(o["seconds"] for o in outcomes)
    latencies: list[float] = []
    for outcome in outcomes:
        latencies += outcome["latencies_ms"]
    return {
        "ops": ops,
        "achieved_per_s": round(ops / span, 1),
        "offered_per_s": None,
        "done_ms": summarize(latencies),
        "errors": sum_counts(o["errors"] for o in outcomes),
        "unanswered": 0,
        "lost": 0,
        "client_cpu_s": round(sum(o["cpu_s"] for o in outcomes), 2),
    }


def direct_worker(
    system_env: dict[str, str], slugs: list[str], index: int, seconds: float, concurrency: int
) -> dict[str, Any]:
    """One process of publish_direct: the system's settings, then publishes until time."""
    os.environ.update(system_env)
    import django

    django.setup()
    return asyncio.run(_direct(slugs, index, seconds, concurrency))


async def _direct(slugs: list[str], index: int, seconds: float, concurrency: int) -> dict:
    from realtime.protocol import Publish
    from streams import redis_clients
    from streams.log import StreamStore

    store = StreamStore(redis_clients.async_client())
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ops = 0
    cpu0 = time.process_time()
    started = time.monotonic()
    deadline = started + seconds

    async def loop(lane: int) -> None:
        nonlocal ops
        n = 0
        tenant = slugs[(index * concurrency + lane) % len(slugs)]
        stream = f"direct-{index}-{lane}"
        while time.monotonic() < deadline:
            n += 1
            frame = Publish(f"d{index}-{lane}-{n}", stream, {"text": "capacity"})
            t = time.perf_counter()
            try:
                await store.publish(tenant, f"direct{index}", frame)
            except Exception as error:  # counted (the first of each kind with its text)
                kind = type(error).__name__
                if kind not in errors:
                    logger.warning("publish_direct: %s: %s", kind, error, exc_info=True)
                errors[kind] = errors.get(kind, 0) + 1
                continue
            latencies.append(1000 * (time.perf_counter() - t))
            ops += 1

    await asyncio.gather(*(loop(lane) for lane in range(concurrency)))
    return {
        "ops": ops,
        "seconds": time.monotonic() - started,
        "latencies_ms": latencies,
        "errors": errors,
        "cpu_s": time.process_time() - cpu0,
    }


def merge_load(replies: list[dict[str, Any]]) -> dict[str, Any]:
    done: list[float] = []
    ack: list[float] = []
    for reply in replies:
        done += reply["done_ms"]
        ack += reply["ack_ms"]
    statuses = sum_counts(r["statuses"] for r in replies)
    window_s = replies[0]["window_s"]
    return {
        "ops": sum(statuses.values()),
        "sent": sum(r["sent"] for r in replies),
        "achieved_per_s": round(sum(r["window_done"] for r in replies) / window_s, 1),
        "offered_per_s": round(sum(r["measured_sent"] for r in replies) / window_s, 1),
        "done_ms": summarize(done),
        "ack_ms": summarize(ack),
        "statuses": statuses,
        "errors": sum_counts(r["errors"] for r in replies),
        "unanswered": sum(r["unanswered"] for r in replies),
        "lost": sum(r["lost"] for r in replies),
        "deltas": sum(r["deltas"] for r in replies),
        "skipped": sum(r["skipped"] for r in replies),
        "events": sum(r["events"] for r in replies),
        "client_max_send_lag_ms": round(max(r["max_send_lag_ms"] for r in replies), 1),
    }


# --- per operation ---------------------------------------------------------------------------


def per_op(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Commands and Redis CPU (µs) per operation, data plane and broker apart."""
    phases = result["phases"]
    out: dict[str, dict[str, Any]] = {}

    def cost(name: str, ops: float, per_minute: bool = False) -> dict[str, Any] | None:
        record = phases.get(name)
        if not record or not ops:
            return None
        scale = (60 / record["seconds"]) if per_minute else 1.0
        entry = {
            "ops": ops,
            "commands": record["data"]["commands"] * scale / ops,
            "cpu_us": 1e6 * record["data"]["cpu_s"] * scale / ops,
            "cpu_all_us": 1e6 * record["data"]["cpu_s_all"] * scale / ops,
            "top": top_commands(record["data"]["calls"], ops * (1 / scale)),
        }
        if not per_minute:
            # Redis memory the operations left behind (replicas included in cluster mode).
            entry["memory_bytes"] = record["data"]["memory_bytes"] / ops
        for role, seconds in record.get("server_cpu_s", {}).items():
            entry[f"{role}_cpu_us"] = 1e6 * seconds * scale / ops
        if record["broker"]:
            entry["broker_commands"] = record["broker"]["commands"] * scale / ops
            entry["broker_cpu_us"] = 1e6 * record["broker"]["cpu_s"] * scale / ops
        return entry

    connections = phases["connect"]["ops"]
    labels = {
        "connect": ("connect", connections, False),
        "idle_minute": ("idle", connections, True),
        "subscribe": ("subscribe", connections, False),
        "subscribe_shared": ("subscribe_shared", connections, False),
        "idle_subscribed_minute": ("idle_subscribed", connections, True),
        "publish": ("publish", phases.get("publish", {}).get("ops"), False),
        "publish_direct": ("publish_direct", phases.get("publish_direct", {}).get("ops"), False),
        "send": ("send", phases.get("send", {}).get("ops"), False),
        "streamed_reply": ("stream", phases.get("stream", {}).get("ops"), False),
        # At capacity: what a gateway and a worker spend per operation when busy.
        "publish_at_capacity": ("publish_max", phases.get("publish_max", {}).get("ops"), False),
        "send_at_capacity": ("send_max", phases.get("send_max", {}).get("ops"), False),
    }
    for label, (phase, ops, per_minute) in labels.items():
        entry = cost(phase, ops or 0, per_minute)
        if entry is not None:
            out[label] = entry
    own, both = out.get("idle_subscribed_minute"), cost("idle_shared", connections, True)
    if own and both:
        # Each connection renews its own stream's member and, now, a shared stream's too.
        out["idle_shared_stream_minute"] = {
            "ops": connections,
            "clients_per_stream": phases["idle_shared"].get("clients_per_stream"),
            "commands": both["commands"] - own["commands"],
            "cpu_us": both["cpu_us"] - own["cpu_us"],
            "cpu_all_us": both["cpu_all_us"] - own["cpu_all_us"],
            "top": {},
        }
    send, stream = phases.get("send"), phases.get("stream")
    if send and stream and send.get("ops") and stream.get("ops") and "send" in out:
        deltas_send = send["deltas"] / send["ops"]
        deltas_stream = stream["deltas"] / stream["ops"]
        extra = deltas_stream - deltas_send
        if extra > 0:
            a, b = out["streamed_reply"], out["send"]
            out["reply_delta"] = {
                "ops": stream["deltas"],
                "deltas_per_streamed_reply": round(deltas_stream, 2),
                "deltas_per_send_reply": round(deltas_send, 2),
                "commands": (a["commands"] - b["commands"]) / extra,
                "cpu_us": (a["cpu_us"] - b["cpu_us"]) / extra,
                "cpu_all_us": (a["cpu_all_us"] - b["cpu_all_us"]) / extra,
                "top": {},
            }
    return out


def top_commands(calls: dict[str, float], ops: float, count: int = 6) -> dict[str, float]:
    best = sorted(calls.items(), key=lambda item: -item[1])[:count]
    return {command: round(n / ops, 2) for command, n in best if n / ops >= 0.01}


def print_mode(result: dict[str, Any]) -> None:
    phases = result["phases"]
    print(f"-- {result['mode']} (broker: {result['broker']}) --")
    bg = result["background"]["data"]
    print(
        f"  background (no client): {bg['commands'] / bg['seconds']:.1f} commands/s,"
        f" Redis CPU {100 * bg['cpu_s'] / bg['seconds']:.2f}% of a core"
    )
    costs = result["per_op"]
    print("  per operation (data plane; [broker]):")
    for label, entry in costs.items():
        unit = " per minute" if label.endswith("_minute") else ""
        line = (
            f"    {label:24s} {entry['commands']:8.2f} commands, {entry['cpu_us']:8.1f} µs"
            f" Redis CPU{unit}"
        )
        if "broker_commands" in entry:
            line += f"  [{entry['broker_commands']:.2f} commands, {entry['broker_cpu_us']:.1f} µs]"
        if entry["cpu_all_us"] - entry["cpu_us"] > 0.05 * abs(entry["cpu_us"]):
            line += f" (replicas too: {entry['cpu_all_us']:.1f} µs)"
        if label in ("connect", "subscribe"):
            line += f", {entry['memory_bytes']:.0f} B Redis memory"
        if "gateway_cpu_us" in entry:
            line += f"; gateway {entry['gateway_cpu_us']:.0f} µs"
        if "worker_cpu_us" in entry:
            line += f", worker {entry['worker_cpu_us']:.0f} µs"
        if entry["top"]:
            line += "  " + ", ".join(f"{c} {n:g}" for c, n in entry["top"].items())
        if label == "reply_delta":
            line += (
                f"  ({entry['deltas_per_streamed_reply']} deltas per streamed reply,"
                f" {entry['deltas_per_send_reply']} per 1-piece reply)"
            )
        print(line)
    for name in ("publish", "send", "stream", "publish_max", "send_max", "publish_direct"):
        record = phases.get(name)
        if not record:
            continue
        latency = record["done_ms"]
        label = "ack" if name.startswith("publish") else "send->reply.done"
        offered = (
            f"of {record['offered_per_s']}/s offered"
            if record["offered_per_s"] is not None
            else f"(closed loop; its clients' CPU {record['client_cpu_s']} s)"
        )
        print(
            f"  {name}: achieved {record['achieved_per_s']}/s {offered};"
            f" {describe_latency(label, latency)};"
            f" busiest Redis node {record['data']['busiest_node_cpu_pct']}% of a core"
        )
        problems = {**record["errors"]}
        if record["unanswered"]:
            problems["unanswered"] = record["unanswered"]
        if record["lost"]:
            problems["lost"] = record["lost"]
        if problems:
            print(f"    errors: {problems}")
    fanout = phases.get("redis_fanout")
    if fanout:
        print(
            "  redis_fanout: Redis CPU per PUBLISH (400 B) by subscribed connections: "
            + ", ".join(
                f"{n}: {us} µs" for n, us in fanout["cpu_us_per_publish_by_subscribers"].items()
            )
        )
    for line in describe_processes(result["server_processes"]):
        print(line)
    sys.stdout.flush()


def mode_of(variant: str) -> str:
    """`cluster-3.r2` (the second round of cluster-3) -> `cluster-3`."""
    return variant.split(".r")[0]


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Throughput per mode (the median over its rounds) and the ratios between modes."""
    rounds: dict[str, dict[str, list[float]]] = {}
    for variant, result in results.items():
        phases = result["phases"]
        per_mode = rounds.setdefault(mode_of(variant), {})
        for name in ("publish_max", "send_max", "publish_direct"):
            if name in phases:
                per_mode.setdefault(name, []).append(phases[name]["achieved_per_s"])
    table = {
        mode: {name: statistics.median(values) for name, values in phases.items()}
        for mode, phases in rounds.items()
    }
    if table:
        print("-- throughput achieved (offered above capacity; median of the rounds) --")
        for mode, values in table.items():
            print(
                f"  {mode:10s} "
                + ", ".join(f"{k} {v:.0f}/s {rounds[mode][k]}" for k, v in values.items())
            )
    out: dict[str, Any] = {}
    pairs = [("cluster-3", "cluster-1"), ("cluster-1", "single"), ("cluster-3", "single")]
    for a, b in pairs:
        if a in table and b in table:
            out[f"{a}/{b}"] = {
                name: ratio(table[a].get(name), table[b].get(name)) for name in table[a]
            }
            print(
                f"-- ratio {a} / {b}: "
                + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in out[f"{a}/{b}"].items())
                + " --"
            )
    return out, {"throughput": table, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "capacity",
        "Redis commands and CPU per operation; publish and send throughput by Redis mode",
        args,
        run_mode,
        print_mode,
        conclude,
        sockets=args.connections // max(1, args.client_procs),
        # Rounds alternate the modes (A B A B), so a change in the machine's load between
        # them falls on every mode alike.
        variants=[
            mode if r == 0 else f"{mode}.r{r + 1}"
            for r in range(args.rounds)
            for mode in args.modes
        ],
        announce=False,
    )


if __name__ == "__main__":
    raise SystemExit(main())
