"""Generations, not processes: K streaming model calls in flight on ONE worker process.

Each call is `--model-seconds` of model time streamed as `--pieces` pieces (60 s and 6 by
default: long, sparse generations, so what is measured is the cost of holding a call, not of
its deltas). Sends go at K/model-seconds runs per second (open loop) for twice the model
time, so K calls are in flight from the end of the first model time on, and held there for
another; only sends of that second half are measured. Two model backends:

- simulated: the built-in backend's timers (no network);
- openai: the aiohttp OpenAI backend against a local OpenAI-compatible SSE server in its own
  process (bench/sse_provider.py), so each call is a real HTTP stream.

Reported per K: achieved runs/s, added latency (send->reply.done minus the model time)
p50/p99/p99.9, time to first delta after the model's first piece, worker CPU per run, the
worker's peak RSS and its RSS per 1,000 calls in flight (peak minus idle).

Baseline, in the same run and at the same K: "bare", what a team would otherwise write for
holding streams - one asyncio process with aiohttp, each call a task reading the same SSE
server's stream, no Redis, no Celery, no WebSockets (bench/bare_hold.py). Its added latency
and cost per call are the floor; the ratios say what Switchboard's promises cost on top.

`--dense` measures instead the deltas per second one worker process sustains at 500 calls in
flight streaming 20 pieces per second each, coalescing on, with a py-spy profile of the
worker when `--profile` is given (where its time goes).

    python -m bench.generations                                # K = 500, 2000, 5000, 10000
    python -m bench.generations --calls 500 --model-seconds 20 --backends simulated
    python -m bench.generations --dense --profile
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/generations.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MIB,
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    benchmark_parser,
    count_incidents,
    fmt_ms,
    fmt_ratio,
    gateway_base,
    parse_benchmark_args,
    print_server_report,
    print_target,
    ratio,
    run_benchmark,
    subset_argument,
    sum_counts,
    summarize,
)
from project.launcher import free_port, wait_until

BACKENDS = ("simulated", "openai")
VARIANTS = ("switchboard", "bare")
TARGET_CALLS = 5_000
TARGET_ADDED_P99_MS = 250.0
TARGET_FIRST_P99_MS = 100.0
TARGET_RSS_MIB = 1024.0
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("generations", __doc__)
    parser.add_argument(
        "--calls", default="500,2000,5000,10000", help="K values: calls in flight, comma-separated"
    )
    parser.add_argument("--model-seconds", type=float, default=60, help="model time per call")
    parser.add_argument("--pieces", type=int, default=6, help="pieces per call")
    subset_argument(parser, BACKENDS, "backends")
    parser.add_argument(
        "--baselines", default="bare", help="'bare' (the asyncio+aiohttp floor) or 'none'"
    )
    parser.add_argument(
        "--connections-per-1000", type=int, default=20, help="WebSockets per 1,000 calls"
    )
    parser.add_argument("--worker-concurrency", type=int, default=4, help="dispatcher threads")
    parser.add_argument(
        "--dense", action="store_true", help="the dense figure: 500 calls x 20 pieces/s"
    )
    args = parse_benchmark_args(parser, argv, BACKENDS, "backends")
    args.calls_list = [int(value) for value in str(args.calls).split(",") if value]
    if args.dense:
        args.calls_list, args.pieces = [500], int(20 * args.model_seconds)
    args.variants = [
        f"{variant}:{backend}:{calls}"
        for calls in args.calls_list
        for backend in args.backends
        for variant in VARIANTS
        if variant == "switchboard"
        or (args.baselines == "bare" and backend == "openai" and not args.dense)
    ]
    return args


class Provider:
    """bench/sse_provider.py in its own process."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / "sse-provider.log", "ab")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sse_provider", str(self.port)],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )
        wait_until(self._answers, 15, "the SSE provider")

    def _answers(self) -> bool:
        import socket

        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def model_name(args: argparse.Namespace) -> str:
    return f"gen?pieces={args.pieces}&seconds={args.model_seconds:g}"


def run_variant(env: BenchEnv, client: LoadClient, name: str, args: argparse.Namespace) -> dict:
    variant, backend, calls_text = name.split(":")
    calls = int(calls_text)
    provider = Provider(env.log_root / name) if backend == "openai" else None
    try:
        if variant == "bare":
            assert provider is not None
            return run_bare(provider, calls, args) | {"variant": name}
        return run_switchboard(env, client, provider, backend, calls, args) | {"variant": name}
    finally:
        if provider is not None:
            provider.stop()


def raise_tenant_limits(env: BenchEnv, calls: int) -> None:
    """The bench tenant may hold every call in flight (the defaults bound a connection to 8
    runs and a tenant's queue to 2,000), and send at the benchmark's rate."""
    env.prepare()
    from tenants.models import Tenant

    Tenant.objects.filter(slug="bench").update(
        max_runs_in_flight_per_connection=calls,
        max_queued_runs=calls * 2,
        client_messages_per_s=100_000,
        client_burst=100_000,
        tenant_messages_per_s=100_000,
        tenant_burst=100_000,
    )


def run_switchboard(
    env: BenchEnv,
    client: LoadClient,
    provider: Provider | None,
    backend: str,
    calls: int,
    args: argparse.Namespace,
) -> dict:
    raise_tenant_limits(env, calls)
    model_ms = args.model_seconds * 1000
    piece_ms = model_ms / args.pieces
    worker_env = {
        "SWITCHBOARD_WORKER_MAX_CALLS": str(calls + 100),
        "SWITCHBOARD_MAX_QUEUED_RUNS_PER_TENANT": str(calls * 2),
    }
    if provider is not None:
        worker_env |= {
            "SWITCHBOARD_OPENAI_BASE_URL": provider.base_url,
            "SWITCHBOARD_OPENAI_MODEL": model_name(args),
            "SWITCHBOARD_OPENAI_API_KEY_ENV": "",
        }
    connections = max(10, calls * args.connections_per_1000 // 1000)
    with env.cluster(
        f"switchboard-{backend}-{calls}",
        gateways=1,
        workers=1,
        worker_concurrency=args.worker_concurrency,
        env=worker_env,
    ) as cluster:
        base = gateway_base(cluster, 0)
        tokens = env.tokens(connections)
        opened = client.open_spread("load", [f"{base}/ws/v1/?token={t}" for t in tokens], "welcome")
        client.subscribe("load", prefix="gen-")
        worker = cluster.processes["worker-0"].pid
        import psutil

        idle_rss = psutil.Process(worker).memory_info().rss
        window = MeasuredWindow(env, cluster, "switchboard", args.profile)
        options = (
            {"latency_ms": piece_ms, "chunks": args.pieces, "chunk_delay_ms": piece_ms}
            if backend == "simulated"
            else {}
        )
        rate = calls / args.model_seconds
        replies = client.all(
            "load",
            [{"id_prefix": f"p{index}-"} for index in range(client.procs)],
            group="load",
            mode="switchboard",
            rate=rate / client.procs,
            seconds=2 * args.model_seconds,
            warmup=args.model_seconds,
            drain=args.model_seconds + 60,
            stream_prefix="gen-",
            text="a long generation",
            agent=f"bench-{backend}",
            options=options,
        )
        processes, profile = window.stop()
        stats = client.all("stats")
        client.all("close", group="load")
    summary = summarise_switchboard(
        opened, replies, processes, stats, profile, calls, args, idle_rss, worker
    )
    # Read after the cluster stopped, so the logs are complete.
    return summary | {"incidents": count_incidents(cluster.log_dir)}


def summarise_switchboard(
    opened: dict,
    replies: list[dict],
    processes: dict,
    stats: list,
    profile: Any,
    calls: int,
    args: argparse.Namespace,
    idle_rss: int,
    worker_pid: int,
) -> dict:
    model_ms = args.model_seconds * 1000
    first_piece_ms = model_ms / args.pieces
    done_ms: list[float] = []
    first_ms: list[float] = []
    for reply in replies:
        done_ms += reply["done_ms"]
        first_ms += reply.get("first_ms", [])
    statuses = sum_counts(r["statuses"] for r in replies)
    errors = sum_counts(r["errors"] for r in replies)
    lost = sum(r["lost"] for r in replies)
    unanswered = sum(r["unanswered"] for r in replies)
    window_s = replies[0]["window_s"]
    completed = sum(r["window_done"] for r in replies)
    worker = processes.get("worker-0", {})
    answered = sum(statuses.values())
    peak_rss = worker.get("peak_rss_mib", 0.0)
    return {
        "calls": calls,
        "connections": opened["opened"],
        "sent": sum(r["sent"] for r in replies),
        "offered_per_s": round(sum(r["measured_sent"] for r in replies) / window_s, 1),
        "achieved_per_s": round(completed / window_s, 1),
        "added_ms": summarize([ms - model_ms for ms in done_ms]),
        "first_delta_added_ms": summarize([ms - first_piece_ms for ms in first_ms]),
        "statuses": statuses,
        "errors": errors
        | ({"lost": lost} if lost else {})
        | ({"unanswered": unanswered} if unanswered else {}),
        "worker_cpu_ms_per_run": round(1000 * worker.get("cpu_s", 0) / answered, 2)
        if answered
        else None,
        "worker_peak_rss_mib": peak_rss,
        "worker_rss_per_1000_calls_mib": round((peak_rss - idle_rss / MIB) * 1000 / calls, 1),
        "server_processes": processes,
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "profile": profile,
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in replies), 2),
    }


def run_bare(provider: Provider, calls: int, args: argparse.Namespace) -> dict:
    """The floor: bench/bare_hold.py holds the same streams from one asyncio process."""
    command = [
        sys.executable,
        "-m",
        "bench.bare_hold",
        provider.base_url,
        model_name(args),
        str(calls),
        str(args.model_seconds),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    model_ms = args.model_seconds * 1000
    return {
        "calls": calls,
        "achieved_per_s": result["achieved_per_s"],
        "added_ms": summarize([ms - model_ms for ms in result["done_ms"]]),
        "first_delta_added_ms": summarize(
            [ms - model_ms / args.pieces for ms in result["first_ms"]]
        ),
        "statuses": {"ok": len(result["done_ms"])},
        "errors": result["errors"],
        "worker_cpu_ms_per_run": result["cpu_ms_per_call"],
        "worker_peak_rss_mib": result["peak_rss_mib"],
        "worker_rss_per_1000_calls_mib": result["rss_per_1000_mib"],
        "server_processes": {},
        "close_codes_after_open": {},
        "profile": None,
    }


def print_variant(result: dict) -> None:
    added, first = result["added_ms"], result["first_delta_added_ms"]
    print(f"-- {result['variant']} --")
    print(
        f"  {result['calls']} calls in flight: achieved {result['achieved_per_s']} runs/s;"
        f" statuses {result['statuses'] or '{}'}; errors {result['errors'] or 'none'}"
    )
    print(
        f"  added latency (reply.done - model time) p50 {fmt_ms(added['p50'])}"
        f" / p99 {fmt_ms(added['p99'])} / p99.9 {fmt_ms(added['p99.9'])} ms"
    )
    print(
        f"  first delta after the model's first piece p50 {fmt_ms(first['p50'])}"
        f" / p99 {fmt_ms(first['p99'])} / p99.9 {fmt_ms(first['p99.9'])} ms"
    )
    print(
        f"  worker: CPU {result['worker_cpu_ms_per_run']} ms per run,"
        f" peak RSS {result['worker_peak_rss_mib']} MiB,"
        f" {result['worker_rss_per_1000_calls_mib']} MiB per 1,000 calls in flight"
    )
    if "incidents" in result:
        incidents = result["incidents"]
        print(
            "  incidents: "
            + (", ".join(f"{label} x{count}" for label, count in incidents.items()) or "none")
        )
    if result["server_processes"]:
        print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    summary: dict[str, Any] = {}
    for name, result in results.items():
        variant, backend, calls = name.split(":")
        bare = results.get(f"bare:{backend}:{calls}")
        if variant != "switchboard" or bare is None:
            continue
        summary[f"{backend}:{calls}"] = {
            "added_p99": ratio(result["added_ms"]["p99"], bare["added_ms"]["p99"]),
            "cpu_per_run": ratio(result["worker_cpu_ms_per_run"], bare["worker_cpu_ms_per_run"]),
            "rss_per_1000": ratio(
                result["worker_rss_per_1000_calls_mib"], bare["worker_rss_per_1000_calls_mib"]
            ),
        }
    if summary:
        print("-- ratios (switchboard / bare asyncio+aiohttp, same K) --")
        for key, values in summary.items():
            print(
                f"  {key}: added p99 {fmt_ratio(values['added_p99'])},"
                f" CPU per run {fmt_ratio(values['cpu_per_run'])},"
                f" RSS per 1,000 calls {fmt_ratio(values['rss_per_1000'])}"
            )
    verdict = None
    for name, result in results.items():
        variant, _, calls = name.split(":")
        if variant != "switchboard" or int(calls) != TARGET_CALLS or args.dense:
            continue
        added = result["added_ms"]["p99"]
        first = result["first_delta_added_ms"]["p99"]
        met = (
            added is not None
            and first is not None
            and added <= TARGET_ADDED_P99_MS
            and first <= TARGET_FIRST_P99_MS
            and result["worker_peak_rss_mib"] <= TARGET_RSS_MIB
            and set(result["statuses"]) == {"ok"}
        )
        verdict = met if verdict is None else verdict and met
        print_target(
            f"{TARGET_CALLS} calls on one worker: added p99 <= {TARGET_ADDED_P99_MS:.0f} ms,"
            f" first delta p99 <= {TARGET_FIRST_P99_MS:.0f} ms, RSS <= 1 GiB ({name})",
            met,
            f"added p99 {fmt_ms(added)} ms, first delta p99 {fmt_ms(first)} ms,"
            f" RSS {result['worker_peak_rss_mib']} MiB",
        )
    return summary, {"calls": TARGET_CALLS, "met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sockets = max(args.calls_list) * args.connections_per_1000 // 1000 + 100
    started = time.monotonic()
    code = run_benchmark(
        "generations",
        "streaming model calls held by one worker process",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=sockets + 2 * max(args.calls_list),
        variants=args.variants,
        announce=False,
    )
    print(f"took {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
