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
    ProcessSampler,
    Profiler,
    authenticated_endpoint,
    closest,
    command_line,
    common_arguments,
    cpu_seconds,
    describe_latency,
    describe_processes,
    describe_profile,
    fmt_ratio,
    gateway_base,
    print_header,
    raise_open_files_limit,
    ratio,
    relative,
    server_processes,
    summarize,
    verdict_text,
    write_results,
)

VARIANTS = ("switchboard", "plain")
TARGET_PER_S = 1000.0
WARM_CONNECTIONS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.connect_rate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=5000, help="per round")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateways", type=int, default=1, help="daphne processes")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    common_arguments(parser)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


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
        warm = client.call(0, "open", group="warm", urls=warm_urls, expect=expect)
        if warm["failed"]:
            raise RuntimeError(f"warm-up connections failed: {warm['errors']}")
        urls = [f"{bases[i % gateways]}{path}?token={t}" for i, t in enumerate(tokens)]
        sampler = ProcessSampler(server_processes(cluster)).start()
        profiler = (
            Profiler(server_processes(cluster), env.log_root / variant).start()
            if args.profile
            else None
        )
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
        profile = profiler.stop() if profiler else None
        processes = sampler.stop()
        client.call(0, "close", group="warm")
        stats = client.all("stats")
    closes: dict[str, int] = {}
    for stat in stats:
        for code, count in stat["close_codes"].items():
            closes[code] = closes.get(code, 0) + count
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
        "close_codes_after_open": closes,
        "server_processes": processes,
        "profile": profile,
    }


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"  => median {result['median_per_s_per_gateway']} new authenticated connections/s"
        f" per gateway process ({result['gateways']} gateway(s))"
    )
    print("  " + describe_latency("handshake to welcome", result["handshake_ms_median_round"]))
    if result["close_codes_after_open"]:
        print(f"  sockets closed by the server: {result['close_codes_after_open']}")
    for line in describe_processes(result["server_processes"]):
        print(line)
    if result.get("profile"):
        for line in describe_profile(result["profile"]):
            print(line)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header("bench.connect_rate: new authenticated connections per second", params)
    raise_open_files_limit(args.connections // max(1, args.client_procs) + WARM_CONNECTIONS + 1024)
    env = BenchEnv("connect_rate", args.redis_url, args.log_level)
    results: dict[str, dict[str, Any]] = {}
    try:
        with LoadClient(args.client_procs, env.log_root / "loadgen") as client:
            for variant in args.variants:
                print(f"-- {variant} --")
                results[variant] = run_variant(env, client, variant, args)
                print_variant(results[variant])
    finally:
        env.cleanup()
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
        print(
            "-- ratio: switchboard / plain Channels connections per second:"
            f" {fmt_ratio(summary['switchboard/plain per_s'])} --"
        )
    verdict = None
    if sb and sb["median_per_s_per_gateway"] is not None:
        verdict = sb["median_per_s_per_gateway"] >= TARGET_PER_S and sb["failures"] == 0
        print(
            f"target (>= {TARGET_PER_S:.0f} new authenticated connections/s per gateway):"
            f" {verdict_text(verdict)} ({sb['median_per_s_per_gateway']}/s,"
            f" {sb['failures']} failures)"
        )
    path = write_results(
        "connect_rate",
        env.stamp,
        {
            "benchmark": "connect_rate",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": summary,
            "target": {"per_s": TARGET_PER_S, "met": verdict},
            "logs": relative(env.log_root),
        },
    )
    print(f"results: {relative(path)}  (server logs: {relative(env.log_root)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
