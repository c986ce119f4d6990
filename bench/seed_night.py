"""The seed's night, on one box: 50,000 WebSocket clients held by 4 gateway processes.

2 tenants, 500 streams (250 each), every client subscribed to one stream and so present
on it (100 per stream: joins and leaves are announced, SWITCHBOARD_PRESENCE_ANNOUNCE_MAX
is 100). After the ramp and a quiet `--settle`, each minute 1% of the clients (picked at
random) send once to the `echo` agent, whose reply streams for `--model-seconds` (the
simulated model: `--pieces` pieces, the first after one piece's time); the rest read.
Midway, 10% of the clients drop at once (the socket cut, no close frame) and resume with
their session and positions.

The clients are `manage.py loadgen --scenario night`, one asyncio process per `--clients /
--client-procs` clients (each plays one shard of one tenant's clients, all on one
wall-clock schedule), spread over the gateways in turn. The clients the storm drops are
played by load generators of their own (`--storm-apart`, the default; `--storm-procs` per
tenant): on the clients' machines a reconnecting client does not share an event loop with
the readers that stay, and here the storm's client-side work (5,000 connects at once)
would otherwise hold up every reader sharing its generator's loop. Every reader checks
every seq of its stream (losses and duplicates must be 0) and times each event's delivery
lag: the event's `ts` to when its bytes reached the reader's socket (the kernel's receive
stamp, on the machine's one clock: a client on its own device does not wait for a load
generator's loop that shares 2 cores with the servers), and beside it the same lag as
the generator read the event, its loop's lateness included. An
event published while its reader was cut off (stamped before the handshake of the resumed
connection began: `away_lag`) or while its resume was being let in (after that, before its
`welcome`: `rejoining_lag`) reaches it through the resume, and that lag is the
reconnect's: both are reported apart, with reconnect-to-caught-up and every delivery
together beside them. The delivery targets are on the rest: what connected readers get
while the storm goes on.

Reported: send->reply.done and delivery lag p50/p99/p99.9 (all, before the storm, the
storm's 30 s), reconnect-to-caught-up time (drop -> the resumed connection holds every
seq its process had seen at the drop and its `pong` is in), losses and duplicates,
refusals by reason (error codes, failed connects, server closes), RSS (peak) and CPU of
each process: gateways, worker, Redis, the load generators. Targets: delivery p99 <=
250 ms and p99.9 <= 1 s through the storm, nothing lost or repeated.

Redis: `--redis-url` (FLUSHED). With REDIS_CLUSTER_URL in the environment the data plane
is that Redis Cluster (FLUSHED too), and `--redis-url` is only the Celery broker.

    python -m bench.seed_night                                   # 50,000 clients
    python -m bench.seed_night --clients 4000 --duration 60 --ramp 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/seed_night.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import (
    ROOT,
    BenchEnv,
    ProcessSampler,
    Profiler,
    command_line,
    describe_processes,
    describe_profile,
    fmt_ms,
    gateway_base,
    print_header,
    raise_open_files_limit,
    relative,
    server_processes,
    sum_counts,
    summarize,
    write_results,
)

TARGET_P99_MS = 250.0
TARGET_P999_MS = 1000.0
STORM_WINDOW_S = 30.0  # the storm's figures: from the drops on, this long
# --profile: py-spy starts this long before the drops (its own start-up is not in the
# storm) and stops with the storm's window.
PROFILE_LEAD_S = 10.0
VERDICTS = {
    True: "MET",
    False: "NOT MET",
    None: "NOT SHOWN (within its bounds at the soonest, not at the latest)",
}
LATENCIES = (
    "event_lag",
    "event_lag_own",
    "event_lag_soonest",
    "event_lag_read",
    "away_lag",
    "rejoining_lag",
    "reply",
    "ack",
    "caught_up",
    "connect",
    "loop_lag",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.seed_night",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=50_000, help="connected clients")
    parser.add_argument("--gateways", type=int, default=4, help="daphne gateway processes")
    parser.add_argument("--tenants", type=int, default=2, help="tenants the clients split into")
    parser.add_argument("--streams", type=int, default=500, help="streams, over all tenants")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="load-generator processes, a multiple of --tenants (0: one per 12,500 clients)",
    )
    parser.add_argument(
        "--ramp", type=float, default=None, help="seconds to connect everyone (default clients/200)"
    )
    parser.add_argument("--settle", type=float, default=30.0, help="quiet after ramp and sends")
    parser.add_argument(
        "--duration", type=float, default=240.0, help="seconds of sends; the storm is midway"
    )
    parser.add_argument("--send-share", type=float, default=0.01, help="senders each minute")
    parser.add_argument("--storm-share", type=float, default=0.1, help="clients dropped midway")
    parser.add_argument(
        "--wave-spread", type=float, default=0.5, help="seconds the storm's drops spread over"
    )
    parser.add_argument(
        "--storm-apart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the clients the storm drops are played by load generators of their own"
        " (--storm-procs per tenant, beside --client-procs), as they would be on other"
        " machines: the storm's client-side work then does not delay the readers that stay"
        " connected",
    )
    parser.add_argument(
        "--storm-procs",
        type=int,
        default=1,
        help="with --storm-apart, load generators per tenant for the clients the storm drops",
    )
    parser.add_argument("--model-seconds", type=float, default=5.0, help="model time per reply")
    parser.add_argument("--pieces", type=int, default=10, help="pieces (deltas) per reply")
    parser.add_argument("--text-chars", type=int, default=200, help="a message's length")
    parser.add_argument("--worker-concurrency", type=int, default=2, help="dispatcher threads")
    parser.add_argument(
        "--lead", type=float, default=20.0, help="seconds the load generators get to start"
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"),
        help="Redis database of the run (FLUSHED; only the broker with REDIS_CLUSTER_URL)",
    )
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of the servers")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateways, the worker and the load generators over the storm's"
        f" {STORM_WINDOW_S:g} s, from {PROFILE_LEAD_S:g} s before it (where the time goes)",
    )
    args = parser.parse_args(argv)
    if args.client_procs <= 0:
        per_tenant = max(1, round(args.clients / 12_500 / args.tenants))
        args.client_procs = per_tenant * args.tenants
    if args.storm_procs < 1:
        parser.error("--storm-procs must be 1 or more")
    if args.client_procs % args.tenants:
        parser.error("--client-procs must be a multiple of --tenants")
    if args.streams % args.tenants or args.clients % args.tenants:
        parser.error("--streams and --clients must divide by --tenants")
    if args.ramp is None:
        # Every join is announced to the stream's others (100 a stream: the crowd limit),
        # so the ramp delivers ~clients x 50 join frames: on 2 cores it is not quick.
        args.ramp = max(5.0, args.clients / 200)
    return args


def tenant_slugs(args: argparse.Namespace) -> list[str]:
    return [f"night-{index}" for index in range(args.tenants)]


def prepare_tenants(env: BenchEnv, args: argparse.Namespace) -> dict[str, Any]:
    """The tenants, with what the load needs changed from the defaults: each holds its
    share of the clients and the storm's reconnects (max_connections, 20,000 by default;
    an old socket may still count while its resume arrives). The rest of the defaults
    allow the load as they are: 8 runs in flight per connection, 2,000 queued runs,
    20 messages/s per client and 2,000 per tenant (the load sends a few per second)."""
    env.prepare()
    from tenants.models import Tenant

    per_tenant = args.clients // args.tenants
    settings = {"max_connections": per_tenant + per_tenant // 5 + 1000, "all_agents": True}
    for slug in tenant_slugs(args):
        Tenant.objects.update_or_create(slug=slug, defaults=settings)
    return settings


def redis_pids(args: argparse.Namespace) -> dict[str, int]:
    """The Redis server processes of the run (on this machine): `redis` for a single one,
    `redis-HOST:PORT` per node of a Redis Cluster."""
    import redis

    cluster_url = os.environ.get("REDIS_CLUSTER_URL", "")
    clients: dict[str, Any] = {}
    if cluster_url:
        from redis.cluster import RedisCluster

        rc = RedisCluster.from_url(cluster_url)
        for node in rc.get_nodes():
            clients[f"redis-{node.port}"] = node.redis_connection
    else:
        clients["redis"] = redis.Redis.from_url(args.redis_url)
    pids = {}
    for name, client in clients.items():
        try:
            pids[name] = int(client.info("server")["process_id"])
        except Exception:  # noqa: BLE001 - a Redis elsewhere is left out of the report
            continue
    return {name: pid for name, pid in pids.items() if psutil.pid_exists(pid)}


def flush_redis_cluster() -> None:
    """With REDIS_CLUSTER_URL, every primary of the cluster is flushed (the single Redis
    is flushed by BenchEnv.cluster)."""
    cluster_url = os.environ.get("REDIS_CLUSTER_URL", "")
    if not cluster_url:
        return
    from redis.cluster import RedisCluster

    RedisCluster.from_url(cluster_url).flushall(target_nodes=RedisCluster.PRIMARIES)


def loadgen_command(
    args: argparse.Namespace,
    urls: str,
    tenant: str,
    seed: int,
    shard: str,
    start_at: float,
    part: str = "all",
) -> list[str]:
    piece_ms = args.model_seconds * 1000 / args.pieces
    options = {"latency_ms": piece_ms, "chunks": args.pieces, "chunk_delay_ms": piece_ms}
    return [
        *(sys.executable, "manage.py", "loadgen", "--scenario", "night"),
        *("--url", urls, "--tenant", tenant, "--client-prefix", "c"),
        *("--clients", str(args.clients // args.tenants)),
        *("--streams", str(args.streams // args.tenants)),
        *("--duration", str(args.duration), "--ramp", str(args.ramp)),
        *("--settle", str(args.settle), "--wave-spread", str(args.wave_spread)),
        *("--send-share", str(args.send_share), "--storm-share", str(args.storm_share)),
        *("--agent", "echo", "--options", json.dumps(options)),
        *("--text-chars", str(args.text_chars), "--seed", str(seed)),
        *("--part", part, "--shard", shard, "--start-at", f"{start_at:.3f}", "--no-progress"),
        *("--drain-timeout", str(args.model_seconds + 30)),
    ]


# The gateways' own view of delivery (event ts -> handed to every local subscriber, once per
# event per process), scraped from /metrics: the part of each lag that is not the load
# generators' (whose loops run late in a storm and add that to every figure they take).
METRICS_TOKEN = "seed-night-metrics"
GATEWAY_LAG = "switchboard_delivery_lag_seconds"
# Turns of a gateway's event loop of 10 ms or more (realtime/daphne_tuning.py): what a
# delivery of that process waited for.
GATEWAY_LONG_TURNS = "switchboard_loop_long_turn_seconds"
GATEWAY_HISTOGRAMS = (GATEWAY_LAG, GATEWAY_LONG_TURNS)


def generator_parts(
    args: argparse.Namespace, tenant_index: int, procs_per_tenant: int
) -> list[tuple[str, str, str]]:
    """(name, --part, --shard) of one tenant's load generators: its shards of the clients,
    and with --storm-apart the clients the storm drops in --storm-procs generators of their own."""
    first = tenant_index * procs_per_tenant
    part = "steady" if args.storm_apart else "all"
    parts = [
        (f"loadgen-{first + k}", part, f"{k}/{procs_per_tenant}") for k in range(procs_per_tenant)
    ]
    if args.storm_apart:
        procs = args.storm_procs
        parts += [
            (f"loadgen-storm-{tenant_index}-{k}", "reconnecting", f"{k}/{procs}")
            for k in range(procs)
        ]
    return parts


def scrape_gateway_histograms(cluster: Any) -> dict[str, dict[float, float]] | None:
    """Cumulative bucket counts (upper bound in s -> count) of GATEWAY_HISTOGRAMS, every
    gateway process's summed (they share the multiprocess registry); None when the scrape
    fails."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = gateway_base(cluster, 0).replace("ws://", "http://") + "/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read().decode()
    except OSError as error:
        print(f"  (gateway metrics not scraped: {error})", flush=True)
        return None
    found: dict[str, dict[float, float]] = {name: {} for name in GATEWAY_HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        if family.name not in found:
            continue
        buckets = found[family.name]
        for sample in family.samples:
            if sample.name == family.name + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return found


def histogram_between(
    name: str,
    before: dict[str, dict[float, float]] | None,
    after: dict[str, dict[float, float]] | None,
) -> dict[str, Any]:
    return bucket_quantiles((before or {}).get(name), (after or {}).get(name))


def bucket_quantiles(
    before: dict[float, float] | None, after: dict[float, float] | None
) -> dict[str, Any]:
    """p50/p99/p99.9 of the events observed between two scrapes, each as the upper bound
    of its bucket (ms; the buckets grow by about 1.6x, so read them as 'at most')."""
    if before is None or not after:  # a scrape failed; an empty `before`: none yet
        return {"count": 0}
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    found: dict[str, Any] = {"count": int(total)}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        bound = next((b for b, c in zip(bounds, counts, strict=True) if c >= q * total), None)
        found[name] = None if bound is None or not total else round(bound * 1000, 1)
    return found


def run(env: BenchEnv, args: argparse.Namespace) -> dict[str, Any]:
    tenant_settings = prepare_tenants(env, args)
    flush_redis_cluster()
    out_dir = env.log_root / "loadgen"
    out_dir.mkdir(parents=True, exist_ok=True)
    with env.cluster(
        "night",
        gateways=args.gateways,
        workers=1,
        worker_concurrency=args.worker_concurrency,
        env={"SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN},
    ) as cluster:
        urls = ",".join(f"{gateway_base(cluster, i)}/ws/v1/" for i in range(args.gateways))
        start_at = time.time() + args.lead
        procs_per_tenant = args.client_procs // args.tenants
        children: dict[str, subprocess.Popen[bytes]] = {}
        outputs = []
        child_env = cluster.child_env()
        for t, tenant in enumerate(tenant_slugs(args)):
            for name, part, shard in generator_parts(args, t, procs_per_tenant):
                command = loadgen_command(args, urls, tenant, t, shard, start_at, part)
                out, raw = out_dir / f"{name}.json", out_dir / f"{name}-raw.json"
                command += ["--out", str(out), "--raw", str(raw)]
                log = open(out_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
                children[name] = subprocess.Popen(
                    command, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT
                )
                log.close()
                outputs.append(raw)
        procs = server_processes(cluster) | redis_pids(args)
        procs |= {name: child.pid for name, child in children.items()}
        whole = ProcessSampler(procs, interval_s=0.5).start()
        night_start = start_at + args.ramp + args.settle
        night_end = night_start + args.duration
        storm_at = night_start + args.duration / 2
        load_at_start = os.getloadavg()
        print(
            f"  {len(children)} load generators; connecting {args.clients} clients over"
            f" {args.ramp:g} s from {time.strftime('%H:%M:%S', time.localtime(start_at))};"
            f" sends from +{args.ramp + args.settle:g} s for {args.duration:g} s,"
            f" storm at +{storm_at - start_at:g} s",
            flush=True,
        )
        _sleep_until(night_start)
        window = ProcessSampler(procs, interval_s=0.5).start()
        psutil.cpu_percent()  # the machine's busy share from here
        lag_at_night_start = scrape_gateway_histograms(cluster)
        profiler = None
        if args.profile:
            _sleep_until(storm_at - PROFILE_LEAD_S)
            spied = {name: pid for name, pid in procs.items() if not name.startswith("redis")}
            profiler = Profiler(spied, env.log_root / "night").start()
        _sleep_until(storm_at - 1)
        lag_before_storm = scrape_gateway_histograms(cluster)
        storm = ProcessSampler(procs, interval_s=0.5).start()
        machine_at_storm = psutil.cpu_times()
        _sleep_until(storm_at + STORM_WINDOW_S)
        lag_after_storm = scrape_gateway_histograms(cluster)
        storm_report = storm.stop()
        machine_in_storm = machine_share(machine_at_storm, psutil.cpu_times())
        profile = profiler.stop() if profiler is not None else None
        _sleep_until(night_end)
        machine_busy = psutil.cpu_percent()
        load_in_window = os.getloadavg()
        window_report = window.stop()
        # Past the deadline a generator is told to stop (SIGTERM: it reports what it
        # measured until then), and killed only if it cannot.
        deadline = night_end + args.settle + args.model_seconds + 300
        for name, child in children.items():
            try:
                child.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child.terminate()
                print(f"  {name} had not finished by the deadline; stopped", flush=True)
        for name, child in children.items():
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
                print(f"  {name} did not stop; killed (its figures are missing)", flush=True)
        whole_report = whole.stop()
    merged = merge_raw([path for path in outputs if path.exists()])
    storm_from = storm_at - start_at
    result = summarise(merged, storm_from, args)
    result["latency_ms"]["storm_by_generator_part"] = storm_by_part(outputs, storm_from)
    result |= {
        "tenants": tenant_slugs(args),
        "tenant_settings": tenant_settings,
        "redis": "cluster" if os.environ.get("REDIS_CLUSTER_URL") else "single",
        "load_average": {
            "at_start": [round(x, 2) for x in load_at_start],
            "at_end_of_sends": [round(x, 2) for x in load_in_window],
        },
        "machine_busy_pct_during_sends": machine_busy,
        "machine_storm": machine_in_storm,
        "processes_whole_run": whole_report,
        "processes_during_sends": window_report,
        "processes_storm": storm_report,
        "gateway_delivery_lag_ms": {
            "before_storm": histogram_between(GATEWAY_LAG, lag_at_night_start, lag_before_storm),
            "storm": histogram_between(GATEWAY_LAG, lag_before_storm, lag_after_storm),
        },
        "gateway_long_turns_ms": {
            "before_storm": histogram_between(
                GATEWAY_LONG_TURNS, lag_at_night_start, lag_before_storm
            ),
            "storm": histogram_between(GATEWAY_LONG_TURNS, lag_before_storm, lag_after_storm),
        },
        "profile": profile,
        "generators_finished": len(outputs) == len(children)
        and all(child.returncode == 0 for child in children.values()),
    }
    return result


def machine_share(before: Any, after: Any) -> dict[str, float]:
    """The machine's CPU between two `psutil.cpu_times()`, in percent of all its cores:
    busy (what ran: the processes reported and any other), and stolen (what the host of a
    virtual machine gave to others; counted apart, as /proc/stat does)."""
    spent = {field: getattr(after, field) - getattr(before, field) for field in after._fields}
    total = sum(spent.values()) or 1.0
    idle = spent.get("idle", 0.0) + spent.get("iowait", 0.0)
    steal = spent.get("steal", 0.0)
    # guest time is counted in user time as well: not twice.
    doubled = spent.get("guest", 0.0) + spent.get("guest_nice", 0.0)
    total -= doubled
    return {
        "busy_pct": round(100 * (total - idle - steal) / total, 1),
        "steal_pct": round(100 * steal / total, 1),
    }


def storm_by_part(outputs: list[Path], storm_from: float) -> dict[str, Any]:
    """The storm's delivery lag as the steady readers' generators took it and as the
    reconnecting clients' generators did (their deliveries once resumed), at the socket and
    as read, beside the generators' own loop lateness: a reconnecting generator replays
    thousands of resumes in those seconds, and its loop's lateness is in every lag it
    reads."""
    parts: dict[str, list[Path]] = {"steady": [], "reconnecting": []}
    for path in outputs:
        if path.exists():
            parts["reconnecting" if "-storm-" in path.name else "steady"].append(path)
    storm_to = storm_from + STORM_WINDOW_S
    found: dict[str, Any] = {}
    for part, paths in parts.items():
        if not paths:
            continue
        raw = merge_raw(paths)
        found[part] = {
            "event_lag": _latency(raw.get("event_lag", []), storm_from, storm_to),
            "event_lag_own": _latency(raw.get("event_lag_own", []), storm_from, storm_to),
            "event_lag_soonest": _latency(raw["event_lag_soonest"], storm_from, storm_to),
            "event_lag_read": _latency(raw.get("event_lag_read", []), storm_from, storm_to),
            "loop_lag": _latency(raw.get("loop_lag", []), storm_from, storm_to),
        }
    return found


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def merge_raw(paths: list[Path]) -> dict[str, Any]:
    """The shards' raw samples and counters as one run's."""
    merged: dict[str, Any] = {}
    for path in paths:
        raw = json.loads(path.read_text())
        for key, value in raw.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                merged[key] = sum_counts([merged.get(key, {}), value])
            elif key == "duration_s":
                merged[key] = max(merged.get(key, 0.0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    # Every live delivery at the soonest it can have reached its reader's socket (its own
    # stamp, or the merged ones' earliest): the lower bound of each lag, event_lag the upper.
    merged["event_lag_soonest"] = merged.get("event_lag_own", []) + merged.get(
        "event_lag_merged_soonest", []
    )
    return merged


def _latency(samples: list[list[float]], start: float = 0.0, end: float = 1e12) -> dict:
    stats = summarize([v for t, v in samples if start <= t < end])
    return {key: (round(v, 2) if isinstance(v, float) else v) for key, v in stats.items()}


def summarise(m: dict[str, Any], storm_from: float, args: argparse.Namespace) -> dict[str, Any]:
    storm_to = storm_from + STORM_WINDOW_S
    lag = m.get("event_lag", [])
    lost = m.get("seq_lost", 0) + m.get("seq_lost_at_end", 0)
    latency = {name: _latency(m.get(name, [])) for name in LATENCIES}
    latency["event_lag_before_storm"] = _latency(lag, 0, storm_from)
    latency["event_lag_storm"] = _latency(lag, storm_from, storm_to)
    lag_own = m.get("event_lag_own", [])
    latency["event_lag_own_before_storm"] = _latency(lag_own, 0, storm_from)
    latency["event_lag_own_storm"] = _latency(lag_own, storm_from, storm_to)
    latency["event_lag_soonest_storm"] = _latency(
        m.get("event_lag_soonest", []), storm_from, storm_to
    )
    lag_read = m.get("event_lag_read", [])
    latency["event_lag_read_before_storm"] = _latency(lag_read, 0, storm_from)
    latency["event_lag_read_storm"] = _latency(lag_read, storm_from, storm_to)
    latency["away_lag_storm"] = _latency(m.get("away_lag", []), storm_from, storm_to)
    latency["rejoining_lag_storm"] = _latency(m.get("rejoining_lag", []), storm_from, storm_to)
    # Every delivery, whatever its reader was doing: what a target on all of them would see.
    every = lag + m.get("away_lag", []) + m.get("rejoining_lag", [])
    latency["every_delivery"] = _latency(every)
    latency["every_delivery_storm"] = _latency(every, storm_from, storm_to)
    latency["reply_storm"] = _latency(m.get("reply", []), storm_from, storm_to)
    latency["loop_lag_storm"] = _latency(m.get("loop_lag", []), storm_from, storm_to)
    # Per 10 s: how the lag moved through the night.
    timeline = []
    if lag:
        first, last = min(t for t, _ in lag), max(t for t, _ in lag)
        at = first - first % 10
        while at <= last:
            stats = _latency(lag, at, at + 10)
            timeline.append([at, stats["count"], stats["p99"], stats["p99.9"]])
            at += 10
    # When the last first connection was made: whether everyone was in before the sends.
    connects = sorted(t for t, _ in m.get("connect", []) if t < storm_from)
    opened = m.get("connections_opened", 0)
    all_in_at = connects[opened - 1] if 0 < opened <= len(connects) else None
    return {
        "clients": args.clients,
        "connections_opened": opened,
        "all_connected_at_s": all_in_at,
        "sends_from_s": args.ramp + args.settle,
        "generators_interrupted": m.get("interrupted", 0),
        "sends": m.get("frames_by_type", {}).get("send", 0),
        "replies": len(m.get("reply", [])),
        "reply_status": m.get("reply_status", {}),
        "latency_ms": latency,
        "event_lag_timeline_10s": timeline,
        "events_checked": m.get("events", 0),
        "presence_events": m.get("presence_events", 0),
        "lost": lost,
        "lost_between": m.get("seq_lost", 0),
        "lost_at_end": m.get("seq_lost_at_end", 0),
        "duplicates": m.get("seq_duplicates", 0),
        "ack_duplicates": m.get("duplicates", 0),
        "reconnects": m.get("reconnects", 0),
        "resumed": m.get("resumed", 0),
        "caught_up": len(m.get("caught_up", [])),
        "refusals": {
            "errors": m.get("errors", {}),
            "connect_failures": m.get("connect_failures", {}),
            "closed_by_server": m.get("server_closes", {}),
        },
        "unanswered_acks": m.get("unanswered_acks", 0),
        "unanswered_replies": m.get("unanswered_replies", 0),
        "frames_skipped": m.get("frames_skipped", 0),
        "storm_at_s": round(storm_from, 1),
    }


def verdict(result: dict[str, Any]) -> bool | None:
    """The targets over the night and over the storm's window: True when the lags at their
    latest (every message at its read's stamp) meet them, False when even at their soonest
    they do not (or anything was lost, duplicated or not connected), None in between: the
    stamps cannot tell."""
    latency = result["latency_ms"]
    if (
        result["lost"]
        or result["duplicates"]
        or result["connections_opened"] != result["clients"]
        or not latency["event_lag"]["count"]
    ):
        return False

    def within(*names: str) -> bool:
        return all(
            latency[name]["p99"] <= TARGET_P99_MS and latency[name]["p99.9"] <= TARGET_P999_MS
            for name in names
            if latency[name]["count"]
        )

    if within("event_lag", "event_lag_storm"):
        return True
    if not within("event_lag_soonest", "event_lag_soonest_storm"):
        return False
    return None


def _line(label: str, stats: dict[str, Any]) -> str:
    return (
        f"  {label}: p50 {fmt_ms(stats['p50'])} / p99 {fmt_ms(stats['p99'])} /"
        f" p99.9 {fmt_ms(stats['p99.9'])} ms, max {fmt_ms(stats['max'])} ms (n={stats['count']})"
    )


def _bounds(stats: dict[str, Any]) -> str:
    """A gateway histogram's quantiles (bucket upper bounds, bucket_quantiles)."""
    return (
        f"p50 {fmt_ms(stats.get('p50'))} / p99 {fmt_ms(stats.get('p99'))} /"
        f" p99.9 {fmt_ms(stats.get('p99.9'))} ms"
    )


def print_result(result: dict[str, Any]) -> None:
    latency = result["latency_ms"]
    print(
        f"  clients: {result['connections_opened']} of {result['clients']} connected;"
        f" {result['sends']} sends, {result['replies']} replies {result['reply_status']}"
    )
    print(
        f"  the last client connected at +{fmt_ms(result['all_connected_at_s'])} s"
        f" (sends from +{result['sends_from_s']:g} s); generators stopped before their"
        f" end: {result['generators_interrupted']}"
    )
    print(_line("delivery lag (event ts -> the reader's socket)", latency["event_lag"]))
    print(_line("  before the storm", latency["event_lag_before_storm"]))
    print(_line(f"  storm ({STORM_WINDOW_S:g} s from the drops)", latency["event_lag_storm"]))
    print(_line("  those whose stamp is their own (they ended a read)", latency["event_lag_own"]))
    print(_line("    before the storm", latency["event_lag_own_before_storm"]))
    print(_line("    storm", latency["event_lag_own_storm"]))
    print(_line("  every one at the soonest it can have come", latency["event_lag_soonest"]))
    print(_line("    storm", latency["event_lag_soonest_storm"]))
    print(_line("  the same, as the generators read them", latency["event_lag_read"]))
    print(_line("    before the storm", latency["event_lag_read_before_storm"]))
    print(_line("    storm", latency["event_lag_read_storm"]))
    print(_line("published while the reader was cut off, got on resume", latency["away_lag"]))
    print(_line(f"  storm ({STORM_WINDOW_S:g} s from the drops)", latency["away_lag_storm"]))
    print(_line("published while the reader's resume was let in", latency["rejoining_lag"]))
    print(_line(f"  storm ({STORM_WINDOW_S:g} s from the drops)", latency["rejoining_lag_storm"]))
    print(_line("every delivery, the three above together", latency["every_delivery"]))
    print(_line(f"  storm ({STORM_WINDOW_S:g} s from the drops)", latency["every_delivery_storm"]))
    for label, key in (("before the storm", "before_storm"), ("storm", "storm")):
        gateway = result["gateway_delivery_lag_ms"][key]
        print(
            f"  at the gateways (ts -> handed to every local subscriber), {label}: at most"
            f" {_bounds(gateway)} (n={gateway['count']} event handings)"
        )
    for part, figures in latency.get("storm_by_generator_part", {}).items():
        print(_line(f"  storm, {part} readers' generators", figures["event_lag"]))
        print(_line("    stamps their own", figures["event_lag_own"]))
        print(_line("    every one at its soonest", figures["event_lag_soonest"]))
        print(_line("    as they read them", figures["event_lag_read"]))
        print(_line("    their own loop lateness", figures["loop_lag"]))
    for label, key in (("before the storm", "before_storm"), ("storm", "storm")):
        turns = result["gateway_long_turns_ms"][key]
        if turns["count"]:
            print(
                f"  gateways' loop turns of 10 ms or more, {label}: {turns['count']}, at most"
                f" {_bounds(turns)}"
            )
        else:
            print(f"  gateways' loop turns of 10 ms or more, {label}: none")
    print(_line("send -> reply.done", latency["reply"]))
    print(_line("  ending in the storm", latency["reply_storm"]))
    print(_line("send -> ack", latency["ack"]))
    print(_line("reconnect -> caught up", latency["caught_up"]))
    print(_line("connect (handshake -> welcome)", latency["connect"]))
    print(_line("load generators' own loop lateness", latency["loop_lag"]))
    print(_line("  in the storm", latency["loop_lag_storm"]))
    print(
        f"  seqs: {result['events_checked']} events checked, {result['lost']} lost"
        f" ({result['lost_between']} between, {result['lost_at_end']} at the end),"
        f" {result['duplicates']} duplicates; {result['presence_events']} join/leave"
    )
    print(
        f"  storm: {result['reconnects']} reconnects, {result['resumed']} resumed,"
        f" {result['caught_up']} caught up"
    )
    print(f"  refusals: {result['refusals']}")
    print(
        f"  unanswered: {result['unanswered_acks']} acks, {result['unanswered_replies']}"
        f" replies; frames skipped {result['frames_skipped']}"
    )
    print(
        f"  machine: load average {result['load_average']}, busy"
        f" {result['machine_busy_pct_during_sends']}% during the sends; in the storm's"
        f" {STORM_WINDOW_S:g} s busy {result['machine_storm']['busy_pct']}%, stolen by the"
        f" host {result['machine_storm']['steal_pct']}%"
    )
    print("  processes during the sends (peak RSS over the whole run below):")
    for line in describe_processes(result["processes_during_sends"]):
        print("  " + line)
    print("  processes during the storm's 30 s:")
    for line in describe_processes(result["processes_storm"]):
        print("  " + line)
    print("  processes over the whole run:")
    for line in describe_processes(result["processes_whole_run"]):
        print("  " + line)
    if result.get("profile"):
        print(
            f"  where the time goes from {PROFILE_LEAD_S:g} s before the storm to its"
            f" {STORM_WINDOW_S:g} s's end (py-spy):"
        )
        for line in describe_profile(result["profile"], top=10):
            print("  " + line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header("bench.seed_night: the seed's night on one box", params)
    # Each process holds its share: a gateway clients/gateways, a generator its shard.
    per_process = max(args.clients // args.gateways, args.clients // args.client_procs)
    limit = raise_open_files_limit(per_process + 1024)
    env = BenchEnv("seed_night", args.redis_url, args.log_level)
    try:
        result = run(env, args)
    finally:
        env.cleanup()
    print_result(result)
    met = verdict(result)
    storm, soonest = (
        result["latency_ms"]["event_lag_storm"],
        result["latency_ms"]["event_lag_soonest_storm"],
    )
    print(
        f"target (delivery p99 <= {TARGET_P99_MS:g} ms and p99.9 <= {TARGET_P999_MS:g} ms"
        f" through the storm, 0 lost, 0 duplicates): {VERDICTS[met]}"
        f" (storm p99 {fmt_ms(soonest['p99'])}-{fmt_ms(storm['p99'])} ms, p99.9"
        f" {fmt_ms(soonest['p99.9'])}-{fmt_ms(storm['p99.9'])} ms at the readers' sockets;"
        f" {result['lost']} lost, {result['duplicates']} duplicates)"
    )
    path = write_results(
        "seed_night",
        env.stamp,
        {
            "benchmark": "seed_night",
            "command": command_line(),
            "machine": machine,
            "open_files_limit": limit,
            "parameters": params,
            "result": result,
            "target_met": met,
            "logs": relative(env.log_root),
        },
    )
    print(f"results: {relative(path)}  (logs: {relative(env.log_root)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
