"""Overload: offered load at three times capacity; what is accepted still finishes well.

One tenant sends open loop at the measured capacity (variant `capacity`) and then at
`--factor` (3) times it (variant `overload`), each on freshly started processes. Capacity
is set by the model time: the echo agent answers after `--latency-ms` (200), so
a worker holding `--worker-concurrency` (8) calls at once (SWITCHBOARD_WORKER_MAX_CALLS)
finishes at most 40 runs/s. The tenant's queue bound
(`max_queued_runs`) is `--queue-seconds` (2) of capacity, so a run that is accepted waits
at most that long; everything past it is answered `overloaded` (429) at once.

Reported per variant: goodput (runs ending `ok` per second of the measured window) and its
fraction of the capacity run's; send -> reply.done p50/p99/p99.9 of accepted runs; send ->
429 p50/p99/p99.9 of refused ones; statuses and errors; peak RSS of every server process
(the point: flat, not growing with the excess). Ratios are overload / capacity.

    python -m bench.overload
    python -m bench.overload --seconds 10 --warmup 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/overload.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    TENANT,
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    benchmark_parser,
    describe_latency,
    gateway_base,
    parse_benchmark_args,
    print_ratio,
    print_server_report,
    ratio,
    run_benchmark,
    subset_argument,
    sum_counts,
    summarize,
)
from bench.noisy_neighbour import OPEN_LIMITS, tenant_result

VARIANTS = ("capacity", "overload")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("overload", __doc__)
    parser.add_argument("--latency-ms", type=int, default=200, help="model time of each run")
    parser.add_argument(
        "--worker-concurrency", type=int, default=8, help="model calls the worker holds at once"
    )
    parser.add_argument("--factor", type=float, default=3, help="offered load / capacity")
    parser.add_argument("--queue-seconds", type=float, default=2, help="queue bound, in seconds")
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=30, help="how long it sends")
    parser.add_argument("--warmup", type=float, default=5, help="seconds at the start not measured")
    parser.add_argument("--drain", type=float, default=35, help="seconds to wait for replies")
    subset_argument(parser, VARIANTS)
    args = parse_benchmark_args(parser, argv, VARIANTS, client_procs=1)
    args.capacity_per_s = args.worker_concurrency * 1000 / args.latency_ms
    return args


def run_variant(env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace) -> dict:
    env.prepare()
    from tenants.models import Tenant

    queue_bound = max(1, round(args.queue_seconds * args.capacity_per_s))
    Tenant.objects.filter(slug=TENANT).update(**OPEN_LIMITS, max_queued_runs=queue_bound)
    rate = args.capacity_per_s * (args.factor if variant == "overload" else 1)
    # The capacity this benchmark reasons in: that many model calls at once.
    bounded = {"SWITCHBOARD_WORKER_MAX_CALLS": str(args.worker_concurrency)}
    with env.cluster(variant, workers=1, env=bounded) as cluster:
        base = gateway_base(cluster, 0)
        urls = [f"{base}/ws/v1/?token={token}" for token in env.tokens(args.connections)]
        opened = client.call(
            0,
            "open",
            group="load",
            urls=urls,
            names=[str(i) for i in range(len(urls))],
            expect="welcome",
        )
        if opened["failed"]:
            print(f"  {opened['failed']} connections failed: {opened['errors']}")
        client.call(0, "subscribe", group="load", prefix="ov-")
        window = MeasuredWindow(env, cluster, variant, args.profile)
        reply = client.call(
            0,
            "load",
            group="load",
            mode="switchboard",
            rate=rate,
            seconds=args.seconds,
            warmup=args.warmup,
            drain=args.drain,
            id_prefix=f"{variant}-",
            stream_prefix="ov-",
            text="hello from the overload benchmark",
            agent="echo",
            options={"latency_ms": args.latency_ms, "chunks": 1},
        )
        processes, profile = window.stop()
        stats = client.all("stats")
        client.call(0, "close", group="load")
    figures = tenant_result(reply)
    finished = sum(figures["statuses"].values())
    ok_share = figures["statuses"].get("ok", 0) / finished if finished else 0.0
    return {
        "variant": variant,
        "queue_bound": queue_bound,
        **figures,
        "goodput_per_s": round(figures["achieved_per_s"] * ok_share, 1),
        "refused_ms": summarize(reply["refused_ms"]),
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "server_processes": processes,
        "profile": profile,
    }


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"  offered {result['offered_per_s']}/s (queue bound {result['queue_bound']} runs);"
        f" goodput {result['goodput_per_s']}/s; statuses {result['statuses'] or '{}'};"
        f" errors {result['errors'] or 'none'}"
    )
    print("  " + describe_latency("accepted send->reply.done", result["done_ms"]))
    print("  " + describe_latency("refused send->429", result["refused_ms"]))
    print_server_report(result)


def _peaks(result: dict[str, Any]) -> dict[str, float]:
    return {
        name: info["peak_rss_with_children_mib"]
        for name, info in result["server_processes"].items()
        if isinstance(info, dict)
    }


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    base, over = results.get("capacity"), results.get("overload")
    summary: dict[str, Any] = {}
    if not (base and over):
        return summary, {}
    summary["goodput overload/capacity"] = ratio(over["goodput_per_s"], base["goodput_per_s"])
    summary["accepted p99 overload/capacity"] = ratio(
        over["done_ms"].get("p99"), base["done_ms"].get("p99")
    )
    print_ratio("goodput, overload / capacity", summary["goodput overload/capacity"])
    print_ratio("accepted p99, overload / capacity", summary["accepted p99 overload/capacity"])
    base_peaks, over_peaks = _peaks(base), _peaks(over)
    for name, peak in over_peaks.items():
        summary[f"peak RSS {name} overload/capacity"] = ratio(peak, base_peaks.get(name))
        print_ratio(
            f"peak RSS of {name} (with children), overload / capacity",
            summary[f"peak RSS {name} overload/capacity"],
        )
    return summary, {"capacity_per_s": args.capacity_per_s, "factor": args.factor}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "overload",
        f"offered load at {args.factor:g}x capacity",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.connections,
    )


if __name__ == "__main__":
    raise SystemExit(main())
