"""Data plane: publish and send throughput of Redis alone, on one Redis and on a Redis
Cluster of 1 and 3 masters (issue 17), with the gateway's own script calls.

bench/capacity.py measures end to end, and on a small machine the gateways and the worker
set that rate long before Redis does. Here nothing stands in front of Redis but
`redis-benchmark` (Redis's C load generator, about ten times cheaper per command than a
Python client), calling with EVALSHA the very scripts the gateway calls, with the very
KEYS and ARGV it builds: StreamStore.publish and StreamStore.accept_send (streams/log.py)
and the rate limiter's TakeTokens (realtime/admission.py) build each call here, and the
call is turned into a redis-benchmark command line instead of being run.

What one operation is, on the data plane:

  publish  TAKE_TOKENS (the client's and the tenant's message buckets) + APPEND_EVENT
           (dedupe check, INCR seq, XADD trimmed to the retention, PUBLISH or SPUBLISH,
           the dedupe key);
  send     TAKE_TOKENS + ACCEPT_SEND (the message event as above, the run record and its
           deadline, the runs-in-flight and queued counts, the fair-queue push).

Left out, and why: the tenant registry's SADD (once per tenant per gateway process, then
remembered); FAIR_JOIN, the ring's call when a send makes its tenant's queue non-empty
(here no worker drains the queues, so after the first send of a tenant it never is, as
under a backlog; when workers keep every queue empty it is one more call per send, in the
ring's one slot); the run's wake-up, published to Celery's broker, which is not the
streams' Redis (a Redis Cluster never is); everything a worker does for the run; pub/sub
subscribers (the PUBLISH reaches none here: its fan-out cost is capacity.py's
redis_fanout phase).

The two scripts of an operation run at once, each from its own redis-benchmark process
with the same number of calls: the cheaper one finishes first and the other then has Redis
to itself, so operations per second = calls / the time until both are done, which is the
rate the two cost together. Each call is on the accepted path: message ids are unique (two
random draws, about 62 bits), the rates, bursts and queue bound are far above what a phase
offers, no token budget; the stream log is trimmed to the default retention as in
production; run records and dedupe keys stay, as they would while their TTLs run. After
each phase the accepted count is checked against the calls made: the stream heads (INCR
seq runs only on the accepted path) and the buckets' PEXPIREs (two per token taken).

Modes (`--modes`), alternated over `--rounds` on freshly started, empty servers:

- `single`:    one Redis started by the benchmark (PUBLISH in the scripts);
- `cluster-1`: a Redis Cluster of 1 master (project/redis_cluster.py), SPUBLISH;
- `cluster-3`: a Redis Cluster of 3 masters, SPUBLISH; redis-benchmark `--cluster` puts its
               clients on every master and fills the `{tag}` hash tag of the keys with a tag
               of each master's slots (one tenant per master).

The tenant is named `tag`, so its keys carry redis-benchmark's `{tag}` placeholder (on one
Redis and on a 1-master cluster, which redis-benchmark `--cluster` refuses, it stays the
tenant `tag`). `--replicas` (default 0) gives each cluster master that many replicas: on a
small machine a replica's CPU is taken from the masters, and the question is how far
masters scale.

Reported per phase: operations per second, latency of each script call (redis-benchmark's
p50, p99 and the first histogram bucket at or above 99.9%; closed loop at saturation, so
mostly queueing behind `--clients` x `--pipeline` calls in flight), the longest event of
Redis's latency monitor (100 ms or more: a tail Redis itself saw), Redis CPU per master
(INFO cpu before and after: the busiest near 100% of a core means Redis was the limit), the
machine's CPU (every core busy: the cores, not Redis, were), the generators' CPU, peak RSS
of every Redis node and generator; then the medians over the rounds and the ratios
cluster-3 / cluster-1 and each mode / single.

    python -m bench.data_plane                                   # 3 modes, 3 rounds
    python -m bench.data_plane --modes single --rounds 1 --send-requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

if __package__ in (None, ""):  # `python bench/data_plane.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import (
    ProcessSampler,
    benchmark_parser,
    command_line,
    fmt_ratio,
    print_header,
    ratio,
    relative,
    subset_argument,
    write_results,
)

logger = logging.getLogger(__name__)

MODES = ("single", "cluster-1", "cluster-3")
MASTERS = {"single": 1, "cluster-1": 1, "cluster-3": 3}
OPERATIONS = ("publish", "send")

# redis-benchmark's placeholders. `{tag}` is its cluster hash tag, filled per master with
# `--cluster`; naming the tenant `tag` puts it in every tenant-scoped key (streams/keys.py).
TENANT = "tag"
CLIENT = "bench-client"
STREAM = "bench"
RANDOM = "__rand_int__"
# random() % -r gives 31 bits: a single draw repeats a few hundred times in a million calls;
# two side by side (24 digits) make about 62 bits, so no message id repeats in a phase.
UNIQUE = RANDOM + RANDOM
RANDOM_RANGE = 2**31 - 1
# A run id is `r<32 hex>.<TENANT>` (streams/events.py): 24 random digits, padded to 32.
RUN_HEX = UNIQUE + "0" * 8
# Limits far above what any phase offers, so every call takes the accepted path.
OPEN_RATE = 1_000_000_000
OPEN_QUEUE = 1_000_000_000

SEQ_PATTERN = "*:s:{*}:" + STREAM + ":seq"
# Redis's latency monitor records events (a command, an expiry cycle, ...) this long or
# longer: whether a latency tail was Redis's own or the generator's and the machine's.
STALL_MS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("data_plane", __doc__)
    subset_argument(parser, MODES, "modes")
    parser.add_argument("--rounds", type=int, default=3, help="times each mode runs, alternating")
    parser.add_argument(
        "--operations", default="publish,send", help="comma-separated: publish, send"
    )
    parser.add_argument(
        "--publish-requests", type=int, default=800_000, help="publishes per publish phase"
    )
    parser.add_argument("--send-requests", type=int, default=400_000, help="sends per send phase")
    parser.add_argument(
        "--clients", type=int, default=50, help="connections of each redis-benchmark process"
    )
    parser.add_argument("--pipeline", type=int, default=8, help="calls in flight per connection")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of each redis-benchmark process"
    )
    parser.add_argument("--replicas", type=int, default=0, help="replicas of each cluster master")
    parser.add_argument(
        "--cluster-port", type=int, default=7600, help="first port of the benchmark's cluster"
    )
    parser.add_argument(
        "--redis-benchmark", default="redis-benchmark", help="the redis-benchmark binary"
    )
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    operations = [o.strip() for o in args.operations.split(",") if o.strip()]
    if set(chosen) - set(MODES) or set(operations) - set(OPERATIONS):
        parser.error(f"modes: {MODES}; operations: {OPERATIONS}")
    args.modes, args.operations = chosen, operations
    return args


# --- the gateway's script calls ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One script call as the gateway would send it: its file, KEYS and ARGV as text."""

    name: str  # the script's file name, e.g. append_event.lua
    keys: tuple[str, ...]
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.name.removesuffix(".lua")


def as_text(value: Any) -> str:
    """An argument as redis-py encodes it (repr for a float, str for the rest)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def script_call(call: Any) -> ScriptCall:
    """A streams.scripts.Script instance as the KEYS and ARGV its run() would send."""
    return ScriptCall(
        call.LUA.name,
        tuple(as_text(k) for k in call.keys()),
        tuple(as_text(a) for a in call.args()),
    )


def tenant_config() -> Any:
    """The tenant `tag` with limits no phase reaches (its other settings the defaults)."""
    from project.conf import conf
    from tenants.config import TenantConfig

    return TenantConfig(
        slug=TENANT,
        signing_secret="",
        enabled=True,
        max_frame_bytes=65536,
        stream_retention=conf().stream_retention,
        max_connections=OPEN_QUEUE,
        max_connections_per_client=OPEN_QUEUE,
        max_runs_in_flight_per_connection=conf().max_runs_in_flight_per_connection,
        max_queued_runs=OPEN_QUEUE,
        client_messages_per_s=OPEN_RATE,
        client_burst=OPEN_RATE,
        tenant_messages_per_s=OPEN_RATE,
        tenant_burst=OPEN_RATE,
    )


class _NoRedis:
    """StreamStore's client while its calls are captured: the registry's SADD goes nowhere."""

    async def sadd(self, *args: Any) -> int:
        return 0


@contextlib.contextmanager
def placeholder_ids() -> Iterator[None]:
    """The ids the gateway draws at random (event ids, run ids) as redis-benchmark
    placeholders, which it fills anew for every call."""
    import streams.log

    with (
        mock.patch.object(streams.log, "new_event_id", lambda: UNIQUE),
        mock.patch.object(streams.log, "new_run_id", lambda tenant: f"r{RUN_HEX}.{tenant}"),
    ):
        yield


def operation_calls(operation: str) -> list[ScriptCall]:
    """The data plane's script calls of one `publish` or `send`, built by the gateway's own
    code (needs Django set up, with a broker apart from the streams' Redis)."""
    from agents import get_agent
    from realtime.admission import message_buckets, run_options
    from realtime.protocol import Publish, Send
    from streams import buckets, scripts
    from streams.log import RunLimits, StreamStore

    tenant = tenant_config()
    captured: list[Any] = []

    class CapturingStore(StreamStore):
        async def _write(self, call: Any, dedupe_key: str) -> Any:
            captured.append(call)
            return call.result([1, "1 event run"])  # as if accepted: seq 1

    store = CapturingStore(_NoRedis())  # type: ignore[arg-type]
    # What the rate limiter runs first for every publish and send (RateLimiter.wait_ms).
    take = buckets._take(message_buckets(tenant, CLIENT), 1)
    with placeholder_ids():
        if operation == "publish":
            frame = Publish(UNIQUE, STREAM, {"text": "data plane"})
            asyncio.run(store.publish(TENANT, CLIENT, frame, tenant.stream_retention))
        else:
            agent = get_agent("echo")
            send = Send(UNIQUE, STREAM, agent.name, "data plane", run_options({}, tenant), None)
            # Each call its own connection (a fresh runs-in-flight set), as many clients do.
            limits = RunLimits(
                f"gw.{RANDOM}", tenant.max_runs_in_flight_per_connection, tenant.max_queued_runs
            )
            appended = asyncio.run(
                store.accept_send(
                    TENANT,
                    CLIENT,
                    send,
                    agent,
                    tenant.stream_retention,
                    limits,
                    weight=tenant.weight,
                    agent_config=tenant.agent_overrides(agent.name),
                    budgets=tenant.token_budgets(),
                    after_ack=True,
                )
            )
            # What follows the ack (the run's wake-up to Celery's broker, which is not the
            # streams' Redis, and the ring's join when the queue was empty): left out.
            if appended.after_ack is not None:
                appended.after_ack.close()
    (write,) = captured
    expected = scripts.AppendEvent if operation == "publish" else scripts.AcceptSend
    assert isinstance(write, expected), write
    return [script_call(take), script_call(write)]


# --- redis-benchmark ---------------------------------------------------------------------


def benchmark_argv(
    binary: str,
    port: int,
    sha: str,
    call: ScriptCall,
    requests: int,
    clients: int,
    pipeline: int,
    threads: int,
    cluster: bool,
) -> list[str]:
    """redis-benchmark calling `call` by EVALSHA `requests` times. `cluster`: its clients on
    every master (`--cluster`, which needs 2 masters or more), `{tag}` filled per master."""
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-n", str(requests)]
    argv += ["-c", str(clients), "-P", str(pipeline), "-r", str(RANDOM_RANGE)]
    argv += ["--threads", str(threads)]
    if cluster:
        argv.append("--cluster")
    return [*argv, "EVALSHA", sha, str(len(call.keys)), *call.keys, *call.args]


_PERCENTILE_LINE = re.compile(r"^\s*([\d.]+)% <= ([\d.]+) milliseconds \(cumulative count (\d+)\)")


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """redis-benchmark's final report: requests, seconds, throughput and latency (ms): p50
    and p99 from its summary, p99.9 the first bucket of its percentile distribution at or
    above 99.9%, and max."""
    lines = text.replace("\r", "\n").splitlines()
    out: dict[str, Any] = {}
    summary_next = False
    in_percentiles = False
    for line in lines:
        found = re.search(r"(\d+) requests completed in ([\d.]+) seconds", line)
        if found:
            out["requests"] = int(found[1])
            out["seconds"] = float(found[2])
        if line.startswith("Latency by percentile distribution"):
            in_percentiles = True
            continue
        if in_percentiles:
            match = _PERCENTILE_LINE.match(line)
            if match is None:
                in_percentiles = False
            elif float(match[1]) >= 99.9 and "p99.9" not in out:
                out["p99.9"] = float(match[2])
        found = re.search(r"throughput summary: ([\d.]+) requests per second", line)
        if found:
            out["per_s"] = float(found[1])
        if "avg" in line and "p50" in line and "p99" in line:
            summary_next = True
            continue
        if summary_next:
            avg, low, p50, p95, p99, high = (float(v) for v in line.split())
            out.update(avg=avg, min=low, p50=p50, p95=p95, p99=p99, max=high)
            summary_next = False
    missing = {"requests", "per_s", "p50", "p99", "p99.9"} - set(out)
    if missing:
        raise ValueError(f"redis-benchmark output without {sorted(missing)}: {text[-500:]!r}")
    return out


# --- servers -----------------------------------------------------------------------------


@contextlib.contextmanager
def data_plane(mode: str, args: argparse.Namespace) -> Iterator[dict[str, redis.Redis]]:
    """The mode's masters by name (a replica is no target of the load), freshly started."""
    from bench.capacity import throwaway_redis
    from bench.common import loopback_redis_cluster

    if mode == "single":
        with throwaway_redis() as url:
            node = redis.Redis.from_url(url)
            yield {f"redis-{node.connection_pool.connection_kwargs['port']}": node}
        return
    with loopback_redis_cluster(args.cluster_port, MASTERS[mode], args.replicas) as cluster:
        yield {f"redis-{port}": node.client(timeout=10) for port, node in cluster.nodes.items()}


def masters(nodes: dict[str, redis.Redis]) -> dict[str, redis.Redis]:
    return {n: c for n, c in nodes.items() if c.info("replication")["role"] == "master"}


def port_of(node: redis.Redis) -> int:
    return int(node.connection_pool.connection_kwargs["port"])


def cpu_seconds(node: redis.Redis) -> float:
    info = node.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def calls_of(node: redis.Redis, command: str) -> int:
    stats = node.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def longest_stall_ms(node: redis.Redis) -> int:
    """The longest event Redis's latency monitor recorded since its LATENCY RESET (0: none
    reached STALL_MS)."""
    events = node.execute_command("LATENCY", "LATEST")
    return max((int(event[3]) for event in events), default=0)


def busy_fraction(before: Any, after: Any) -> float:
    """The share of the machine's CPU time (every core) that was not idle between two
    psutil.cpu_times() readings."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (after.iowait - before.iowait)
    return (total - idle) / total if total > 0 else 0.0


def stream_heads(node: redis.Redis) -> int:
    """The sum of the benchmark stream's heads on `node` (one per tenant tag)."""
    total = 0
    for key in node.scan_iter(match=SEQ_PATTERN, count=10_000):
        total += int(node.get(key) or 0)
    return total


# --- one phase ---------------------------------------------------------------------------


def run_phase(
    operation: str, mode: str, nodes: dict[str, redis.Redis], args: argparse.Namespace
) -> dict[str, Any]:
    """One operation at saturation on an emptied data plane; its figures."""
    from streams.scripts import lua_source

    cluster = mode != "single"
    chosen = masters(nodes)
    for node in chosen.values():
        node.flushall()
    calls = operation_calls(operation)
    requests = args.publish_requests if operation == "publish" else args.send_requests
    shas = {}
    for call in calls:
        source = lua_source(call.name, sharded=cluster)
        shas[call.name] = {node.script_load(source) for node in chosen.values()}.pop()
    first = next(iter(chosen.values()))
    argvs = [
        benchmark_argv(
            args.redis_benchmark,
            port_of(first),
            shas[call.name],
            call,
            requests,
            args.clients,
            args.pipeline,
            args.threads,
            cluster=len(chosen) > 1,
        )
        for call in calls
    ]
    for node in nodes.values():
        node.config_set("latency-monitor-threshold", STALL_MS)
        node.execute_command("LATENCY", "RESET")
    cpu_before = {name: cpu_seconds(node) for name, node in nodes.items()}
    machine_before = psutil.cpu_times()
    pexpire_before = sum(calls_of(node, "pexpire") for node in chosen.values())
    started = time.monotonic()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for argv in argvs
    ]
    watched = {name: int(node.info("server")["process_id"]) for name, node in nodes.items()}
    watched |= {
        f"redis-benchmark:{call.label}": p.pid for call, p in zip(calls, procs, strict=True)
    }
    sampler = ProcessSampler(watched).start()
    outputs = [proc.communicate()[0] for proc in procs]
    seconds = time.monotonic() - started
    processes = sampler.stop()
    machine_busy = busy_fraction(machine_before, psutil.cpu_times())
    cpu_after = {name: cpu_seconds(node) for name, node in nodes.items()}
    for call, proc, output in zip(calls, procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark {call.label} exited {proc.returncode}: {output}")
    per_script = {
        call.label: parse_benchmark_output(output)
        for call, output in zip(calls, outputs, strict=True)
    }
    # What redis-benchmark reports as answered, against what Redis shows was accepted.
    accepted = sum(stream_heads(node) for node in chosen.values())
    paid = (sum(calls_of(node, "pexpire") for node in chosen.values()) - pexpire_before) // 2
    take, write = (per_script[call.label]["requests"] for call in calls)
    return {
        "operation": operation,
        "calls": [call.label for call in calls],
        "requests": requests,
        "accepted": accepted,
        "tokens_taken": paid,
        "all_accepted": accepted == write == requests and paid == take == requests,
        "seconds": round(seconds, 3),
        "per_s": round(accepted / seconds, 1),
        "scripts": per_script,
        "redis_cpu_pct": {
            name: round(100 * (cpu_after[name] - cpu_before[name]) / seconds, 1) for name in nodes
        },
        "masters": sorted(chosen),
        # Every core of the machine: near 100% when the cores, not Redis's one thread each,
        # are what the masters share.
        "machine_cpu_busy_pct": round(100 * machine_busy, 1),
        "longest_redis_stall_ms": {name: longest_stall_ms(node) for name, node in nodes.items()},
        "used_memory_mib": {
            name: round(int(node.info("memory")["used_memory"]) / 2**20, 1)
            for name, node in nodes.items()
        },
        "processes": processes,
        "argv": {call.label: argv for call, argv in zip(calls, argvs, strict=True)},
    }


def print_phase(variant: str, phase: dict[str, Any]) -> None:
    check = "all accepted" if phase["all_accepted"] else "NOT ALL ACCEPTED"
    print(
        f"  {phase['operation']}: {phase['per_s']:.0f}/s ({phase['accepted']} accepted"
        f" [stream heads], {phase['tokens_taken']} tokens taken, of {phase['requests']}"
        f" calls each: {check}) in {phase['seconds']:.2f} s"
    )
    for label, figures in phase["scripts"].items():
        print(
            f"    {label:13s} {figures['per_s']:9.0f} calls/s over its own run;"
            f" latency p50 {figures['p50']:.3f} ms, p99 {figures['p99']:.3f} ms,"
            f" p99.9 {figures['p99.9']:.3f} ms, max {figures['max']:.3f} ms"
        )
    cpu = ", ".join(
        f"{name}{'' if name in phase['masters'] else ' (replica)'} {pct}%"
        for name, pct in phase["redis_cpu_pct"].items()
    )
    print(
        f"    Redis CPU (% of a core): {cpu}; the machine's {psutil.cpu_count()} cores"
        f" {phase['machine_cpu_busy_pct']}% busy"
    )
    stall = max(phase["longest_redis_stall_ms"].values())
    print(
        "    longest event in Redis's latency monitor: "
        + (f"{stall} ms" if stall else f"none of {STALL_MS} ms or more")
    )
    for name, info in phase["processes"].items():
        if isinstance(info, dict):
            print(
                f"    {name}: peak RSS {info['peak_rss_mib']} MiB, CPU {info['cpu_pct']}% of a core"
            )
    sys.stdout.flush()


# --- the invocation ----------------------------------------------------------------------


def conclude(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per mode and operation, the median over the rounds; and the ratios between modes."""
    rounds: dict[str, dict[str, list[float]]] = {}
    busiest: dict[str, dict[str, list[float]]] = {}
    for variant, phases in results.items():
        mode = variant.split(".r")[0]
        for operation, phase in phases.items():
            rounds.setdefault(mode, {}).setdefault(operation, []).append(phase["per_s"])
            top = max(phase["redis_cpu_pct"][name] for name in phase["masters"])
            busiest.setdefault(mode, {}).setdefault(operation, []).append(top)
    table = {
        mode: {op: statistics.median(values) for op, values in ops.items()}
        for mode, ops in rounds.items()
    }
    print("-- operations per second (median of the rounds; each round in brackets) --")
    for mode, ops in table.items():
        print(
            f"  {mode:10s} "
            + ", ".join(
                f"{op} {value:.0f}/s {[round(v) for v in rounds[mode][op]]}"
                f" (busiest master {statistics.median(busiest[mode][op]):.0f}% of a core)"
                for op, value in ops.items()
            )
        )
    ratios: dict[str, dict[str, float | None]] = {}
    for a, b in (("cluster-3", "cluster-1"), ("cluster-1", "single"), ("cluster-3", "single")):
        if a in table and b in table:
            ratios[f"{a}/{b}"] = {op: ratio(table[a].get(op), table[b].get(op)) for op in table[a]}
            print(
                f"-- ratio {a} / {b}: "
                + ", ".join(f"{op} {fmt_ratio(v)}" for op, v in ratios[f"{a}/{b}"].items())
                + " --"
            )
    return {
        "median_per_s": table,
        "rounds": rounds,
        "busiest_master_cpu_pct": busiest,
        "ratios": ratios,
    }


def setup_django() -> None:
    """Settings for building the calls: a broker apart from the streams' Redis (as a Redis
    Cluster requires, and capacity.py's default), so no script pushes a Celery message."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ["CELERY_BROKER_URL"] = "memory://"
    import django

    django.setup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_django()
    params = dict(vars(args))
    machine = print_header(
        "bench.data_plane: publish and send throughput of Redis alone, by mode", params
    )
    print(f"date: {datetime.now().astimezone().isoformat(timespec='seconds')}")
    variants = [
        mode if r == 0 else f"{mode}.r{r + 1}" for r in range(args.rounds) for mode in args.modes
    ]
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        mode = variant.split(".r")[0]
        print(f"-- {variant} (load average {[round(x, 2) for x in os.getloadavg()]}) --")
        with data_plane(mode, args) as nodes:
            results[variant] = {}
            for operation in args.operations:
                phase = run_phase(operation, mode, nodes, args)
                results[variant][operation] = phase
                print_phase(variant, phase)
    summary = conclude(results)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = write_results(
        "data_plane",
        stamp,
        {
            "benchmark": "data_plane",
            "command": command_line(),
            "machine": machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "parameters": params,
            "results": results,
            **summary,
        },
    )
    print(f"results: {relative(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
