"""Idle connections: gateway RSS per idle authenticated connection.

A freshly started gateway process first takes a few warm-up connections (so one-time
allocations of the first connection are not charged to the rest), then its RSS is read;
N connections are opened (each authenticated: the gateway's `welcome` received), left idle
for a settling period, and the RSS is read again over a hold period (median of samples).
RSS per connection = (after - before) / N. The gateway's CPU while merely holding them is
reported too. Baseline, on a freshly started daphne: a stock Channels consumer that checks
the same token (bench/consumers.py PlainConsumer), with its channel-layer channel.

Target (issue 2): <= 20 KiB per connection at 15,000 connections (plain Channels on daphne
measured 33.5 KiB here). Target (issue 13): CPU while idle at 15,000 no more than the
baseline's in the same run, and 50,000 connections held by 4 gateways.

With `--gateways N` the connections are spread over N gateway processes (round robin)
and the figures are their sums: RSS growth over all of them per connection, and their CPU
together (in % of one core). Each gateway's own figures are printed too.

    python -m bench.idle                               # 15,000 connections
    python -m bench.idle --connections 1000 --hold 3
    python -m bench.idle --connections 50000 --gateways 4 --client-procs 4 --variants switchboard
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/idle.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MIB,
    TENANT,
    BenchEnv,
    LoadClient,
    ProcessSampler,
    Results,
    authenticated_endpoint,
    benchmark_parser,
    describe_latency,
    gateway_base,
    parse_benchmark_args,
    print_ratio,
    print_server_report,
    print_target,
    ratio,
    run_benchmark,
    server_processes,
    subset_argument,
    sum_counts,
    summarize,
)

VARIANTS = ("switchboard", "plain")
TARGET_KIB = 20.0
TARGET_CONNECTIONS = 15_000
WARM_CONNECTIONS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("idle", __doc__)
    parser.add_argument(
        "--connections", type=int, default=TARGET_CONNECTIONS, help="idle connections"
    )
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument(
        "--gateways", type=int, default=1, help="gateway processes the connections are spread over"
    )
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds of measuring")
    parser.add_argument(
        "--subscribe",
        action="store_true",
        help="each gateway connection also subscribes to a stream of its own",
    )
    subset_argument(parser, VARIANTS)
    return parse_benchmark_args(parser, argv, VARIANTS, profile=False)


def steady_rss(sampler: ProcessSampler, names: list[str], seconds: float) -> tuple[int, list[int]]:
    """Median of samples over `seconds` of the processes' RSS together (one reading can
    catch a transient)."""
    samples = []
    deadline = time.monotonic() + seconds
    while True:
        samples.append(sum(sampler.rss(name) for name in names))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return int(statistics.median(samples)), samples


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    tokens = env.tokens(args.connections)
    warm_tokens = env.tokens(WARM_CONNECTIONS * args.gateways, prefix="warm")
    allow_connections(args.connections + len(warm_tokens))
    with env.cluster(variant, gateways=args.gateways, workers=0) as cluster:
        bases = [gateway_base(cluster, i) for i in range(args.gateways)]
        names = [f"gateway-{i}" for i in range(args.gateways)]
        path, expect = authenticated_endpoint(variant)
        sampler = ProcessSampler(server_processes(cluster))
        client.open_warm(
            [f"{bases[i % len(bases)]}{path}?token={t}" for i, t in enumerate(warm_tokens)],
            expect,
        )
        time.sleep(1.0)
        before, _ = steady_rss(sampler, names, 1.0)
        started = time.monotonic()
        opened = client.open_spread(
            "idle",
            [f"{bases[i % len(bases)]}{path}?token={t}" for i, t in enumerate(tokens)],
            expect,
            args.concurrency,
        )
        if opened["failed"]:
            print(f"  {opened['failed']} connections failed: {opened['errors']}")
        if args.subscribe and variant == "switchboard":
            client.subscribe("idle", prefix="idle-")
        connect_s = time.monotonic() - started
        time.sleep(args.settle)
        sampler.start()
        after, samples = steady_rss(sampler, names, args.hold)
        processes = sampler.stop()
        stats = client.all("stats")
        still_open = sum(s["open"].get("idle", 0) for s in stats)
        client.all("close", group="idle")
        client.call(0, "close", group="warm")
    count = opened["opened"]
    per_kib = (after - before) / count / 1024 if count else None
    return {
        "variant": variant,
        "connections": count,
        "connect_failures": opened["errors"],
        "still_open_at_end": still_open,
        "connect_s": round(connect_s, 2),
        "handshake_ms": summarize(opened["latencies_ms"]),
        "rss_before_mib": round(before / MIB, 1),
        "rss_after_mib": round(after / MIB, 1),
        "rss_samples_mib": [round(s / MIB, 1) for s in samples],
        "kib_per_connection": round(per_kib, 2) if per_kib is not None else None,
        "gateways": args.gateways,
        "idle_cpu_pct": round(sum(processes[name]["cpu_pct"] for name in names), 1),
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "server_processes": processes,
    }


def allow_connections(count: int) -> None:
    """The bench tenant may hold `count` connections (its default cap is lower)."""
    from tenants.models import Tenant

    Tenant.objects.filter(slug=TENANT, max_connections__lt=count).update(max_connections=count)


def print_variant(result: dict[str, Any]) -> None:
    rate = result["connections"] / result["connect_s"] if result["connect_s"] else 0
    print(
        f"  {result['connections']} idle connections (opened in {result['connect_s']} s,"
        f" {rate:.0f}/s; {result['still_open_at_end']} still open at the end)"
    )
    print("  " + describe_latency("handshake", result["handshake_ms"]))
    print(
        f"  gateway RSS ({result['gateways']} process(es)) {result['rss_before_mib']} MiB"
        f" -> {result['rss_after_mib']} MiB:"
        f" {result['kib_per_connection']} KiB per connection;"
        f" CPU while idle {result['idle_cpu_pct']}% of a core"
    )
    print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    sb, base = results.get("switchboard"), results.get("plain")
    summary = {}
    if sb and base:
        summary = {
            "switchboard/plain kib_per_connection": ratio(
                sb["kib_per_connection"], base["kib_per_connection"]
            ),
            "switchboard/plain idle_cpu": ratio(sb["idle_cpu_pct"], base["idle_cpu_pct"]),
        }
        print_ratio(
            "switchboard / plain Channels RSS per connection",
            summary["switchboard/plain kib_per_connection"],
        )
        print_ratio(
            "switchboard / plain Channels CPU while idle", summary["switchboard/plain idle_cpu"]
        )
    verdict = None
    if sb and sb["kib_per_connection"] is not None:
        full_size = sb["connections"] >= TARGET_CONNECTIONS
        verdict = sb["kib_per_connection"] <= TARGET_KIB if full_size else None
        print_target(
            f"<= {TARGET_KIB:.0f} KiB per connection at {TARGET_CONNECTIONS}",
            verdict,
            f"{sb['kib_per_connection']} KiB at {sb['connections']} connections",
        )
    return summary, {"kib": TARGET_KIB, "connections": TARGET_CONNECTIONS, "met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "idle",
        "gateway RSS per idle authenticated connection",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.connections // max(1, args.client_procs) + WARM_CONNECTIONS * args.gateways,
    )


if __name__ == "__main__":
    raise SystemExit(main())
