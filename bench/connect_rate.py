"""Connect rate: new authenticated connections per second per gateway process.

A freshly started gateway takes a few warm-up connections, then N new connections are
opened with a bounded number of handshakes in flight (a reconnect storm after a deploy);
the rate is connections completed / time from the first attempt to the last `welcome`
(authenticated, not merely upgraded), divided by the number of gateway processes. Rounds
repeat on the same processes after closing every socket; the median round is reported,
with handshake latency percentiles and the gateway's CPU and peak RSS. Baseline, on a
freshly started daphne: a stock Channels consumer checking the same token
(bench/consumers.py PlainConsumer).

Target (issue 2): >= 1,000 new authenticated connections per second per gateway process
(plain Channels on daphne measured 344-462/s here).

    python -m bench.connect_rate                        # 5,000 connections, 3 rounds
    python -m bench.connect_rate --connections 1000 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/connect_rate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    authenticated_endpoint,
    benchmark_parser,
    closest,
    cpu_seconds,
    describe_latency,
    gateway_base,
    parse_benchmark_args,
    print_ratio,
    print_server_report,
    print_target,
    ratio,
    run_benchmark,
    subset_argument,
    sum_counts,
    summarize,
)

VARIANTS = ("switchboard", "plain")
TARGET_PER_S = 1000.0
WARM_CONNECTIONS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("connect_rate", __doc__)
    parser.add_argument("--connections", type=int, default=5000, help="per round")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateways", type=int, default=1, help="daphne processes")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    subset_argument(parser, VARIANTS)
    return parse_benchmark_args(parser, argv, VARIANTS)


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    tokens = env.tokens(args.connections)
    warm_tokens = env.tokens(WARM_CONNECTIONS, prefix="warm")
    gateways = args.gateways
    with env.cluster(variant, gateways=gateways, workers=0) as cluster:
        bases = [gateway_base(cluster, g) for g in range(gateways)]
        path, expect = authenticated_endpoint(variant)
        warm_urls = [f"{bases[i % gateways]}{path}?token={t}" for i, t in enumerate(warm_tokens)]
        client.open_warm(warm_urls, expect)
        urls = [f"{bases[i % gateways]}{path}?token={t}" for i, t in enumerate(tokens)]
        window = MeasuredWindow(env, cluster, variant, args.profile)
        rounds = []
        gateway_pids = [cluster.processes[f"gateway-{g}"].pid for g in range(gateways)]
        for number in range(args.rounds):
            cpu_before = cpu_seconds(gateway_pids)
            opened = client.open_spread("storm", urls, expect, args.concurrency)
            gateway_cpu = cpu_seconds(gateway_pids) - cpu_before
            span_s = (opened["span_ms"] or 0) / 1000
            rate = opened["opened"] / span_s if span_s else None
            rounds.append(
                {
                    "opened": opened["opened"],
                    "failed": opened["failed"],
                    "errors": opened["errors"],
                    "span_s": round(span_s, 3),
                    "per_s": round(rate, 1) if rate else None,
                    "per_s_per_gateway": round(rate / gateways, 1) if rate else None,
                    "handshake_ms": summarize(opened["latencies_ms"]),
                    "client_cpu_s": opened["client_cpu_s"],
                    # Busy share of the gateways while connecting: near 100% means CPU-bound.
                    "gateway_cpu_pct": round(100 * gateway_cpu / span_s / gateways, 1)
                    if span_s
                    else None,
                    "gateway_cpu_ms_per_connection": round(1000 * gateway_cpu / opened["opened"], 3)
                    if opened["opened"]
                    else None,
                }
            )
            print(
                f"  round {number + 1}: {opened['opened']} connected in {span_s:.2f} s ="
                f" {rounds[-1]['per_s_per_gateway']}/s per gateway"
                + (f"; {opened['failed']} failed: {opened['errors']}" if opened["failed"] else "")
                + f"; gateway CPU {rounds[-1]['gateway_cpu_pct']}% of a core,"
                f" {rounds[-1]['gateway_cpu_ms_per_connection']} ms per connection;"
                f" load generator CPU {opened['client_cpu_s']} s"
            )
            sys.stdout.flush()
            client.all("close", group="storm")
            time.sleep(args.pause)
        processes, profile = window.stop()
        client.call(0, "close", group="warm")
        stats = client.all("stats")
    rates = [r["per_s_per_gateway"] for r in rounds if r["per_s_per_gateway"]]
    median_rate = round(statistics.median(rates), 1) if rates else None
    median_round = closest(rounds, "per_s_per_gateway", median_rate)
    return {
        "variant": variant,
        "gateways": gateways,
        "median_per_s_per_gateway": median_rate,
        "rounds": rounds,
        "handshake_ms_median_round": median_round["handshake_ms"],
        "failures": sum(r["failed"] for r in rounds),
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "server_processes": processes,
        "profile": profile,
    }


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"  => median {result['median_per_s_per_gateway']} new authenticated connections/s"
        f" per gateway process ({result['gateways']} gateway(s))"
    )
    print("  " + describe_latency("handshake to welcome", result["handshake_ms_median_round"]))
    print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    sb, base = results.get("switchboard"), results.get("plain")
    summary = {}
    if sb and base:
        summary = {
            "switchboard/plain per_s": ratio(
                sb["median_per_s_per_gateway"], base["median_per_s_per_gateway"]
            ),
            "switchboard/plain handshake_p99": ratio(
                sb["handshake_ms_median_round"]["p99"], base["handshake_ms_median_round"]["p99"]
            ),
        }
        print_ratio(
            "switchboard / plain Channels connections per second",
            summary["switchboard/plain per_s"],
        )
    verdict = None
    if sb and sb["median_per_s_per_gateway"] is not None:
        verdict = sb["median_per_s_per_gateway"] >= TARGET_PER_S and sb["failures"] == 0
        print_target(
            f">= {TARGET_PER_S:.0f} new authenticated connections/s per gateway",
            verdict,
            f"{sb['median_per_s_per_gateway']}/s, {sb['failures']} failures",
        )
    return summary, {"per_s": TARGET_PER_S, "met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "connect_rate",
        "new authenticated connections per second",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.connections // max(1, args.client_procs) + WARM_CONNECTIONS,
    )


if __name__ == "__main__":
    raise SystemExit(main())
