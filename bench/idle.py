"""Idle connections: gateway RSS per idle authenticated connection.

A freshly started gateway process first takes a few warm-up connections (so one-time
allocations of the first connection are not charged to the rest), then its RSS is read;
N connections are opened (each authenticated: the gateway's `welcome` received), left idle
for a settling period, and the RSS is read again over a hold period (median of samples).
RSS per connection = (after - before) / N. The gateway's CPU while merely holding them is
reported too. Baseline, on a freshly started daphne: a stock Channels consumer that checks
the same token (bench/consumers.py PlainConsumer), with its channel-layer channel.

Target (issue 2): <= 20 KiB per connection at 15,000 connections (plain Channels on daphne
measured 33.5 KiB here).

    python -m bench.idle                               # 15,000 connections
    python -m bench.idle --connections 1000 --hold 3
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
    BenchEnv,
    LoadClient,
    ProcessSampler,
    authenticated_endpoint,
    command_line,
    common_arguments,
    describe_latency,
    describe_processes,
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
TARGET_KIB = 20.0
TARGET_CONNECTIONS = 15_000
WARM_CONNECTIONS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--connections", type=int, default=TARGET_CONNECTIONS, help="idle connections"
    )
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds of measuring")
    parser.add_argument(
        "--subscribe",
        action="store_true",
        help="each gateway connection also subscribes to a stream of its own",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    common_arguments(parser, profile=False)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def steady_rss(sampler: ProcessSampler, name: str, seconds: float) -> tuple[int, list[int]]:
    """Median of RSS samples over `seconds` (one reading can catch a transient)."""
    samples = []
    deadline = time.monotonic() + seconds
    while True:
        samples.append(sampler.rss(name))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return int(statistics.median(samples)), samples


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    tokens = env.tokens(args.connections)
    warm_tokens = env.tokens(WARM_CONNECTIONS, prefix="warm")
    with env.cluster(variant, gateways=1, workers=0) as cluster:
        base = gateway_base(cluster, 0)
        path, expect = authenticated_endpoint(variant)
        sampler = ProcessSampler(server_processes(cluster))
        warm = client.call(
            0,
            "open",
            group="warm",
            urls=[f"{base}{path}?token={t}" for t in warm_tokens],
            expect=expect,
        )
        if warm["failed"]:
            raise RuntimeError(f"warm-up connections failed: {warm['errors']}")
        time.sleep(1.0)
        before, _ = steady_rss(sampler, "gateway-0", 1.0)
        started = time.monotonic()
        opened = client.open_spread(
            "idle", [f"{base}{path}?token={t}" for t in tokens], expect, args.concurrency
        )
        if opened["failed"]:
            print(f"  {opened['failed']} connections failed: {opened['errors']}")
        if args.subscribe and variant == "switchboard":
            for reply in client.all("subscribe", group="idle", prefix="idle-"):
                if reply["errors"]:
                    print(f"  subscribe errors: {reply['errors']}")
        connect_s = time.monotonic() - started
        time.sleep(args.settle)
        sampler.start()
        after, samples = steady_rss(sampler, "gateway-0", args.hold)
        processes = sampler.stop()
        stats = client.all("stats")
        still_open = sum(s["open"].get("idle", 0) for s in stats)
        client.all("close", group="idle")
        client.call(0, "close", group="warm")
    closes: dict[str, int] = {}
    for stat in stats:
        for code, count in stat["close_codes"].items():
            closes[code] = closes.get(code, 0) + count
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
        "idle_cpu_pct": processes["gateway-0"]["cpu_pct"],
        "close_codes_after_open": closes,
        "server_processes": processes,
    }


def print_variant(result: dict[str, Any]) -> None:
    rate = result["connections"] / result["connect_s"] if result["connect_s"] else 0
    print(
        f"  {result['connections']} idle connections (opened in {result['connect_s']} s,"
        f" {rate:.0f}/s; {result['still_open_at_end']} still open at the end)"
    )
    print("  " + describe_latency("handshake", result["handshake_ms"]))
    print(
        f"  gateway RSS {result['rss_before_mib']} MiB -> {result['rss_after_mib']} MiB:"
        f" {result['kib_per_connection']} KiB per connection;"
        f" CPU while idle {result['idle_cpu_pct']}% of a core"
    )
    if result["close_codes_after_open"]:
        print(f"  sockets closed by the server: {result['close_codes_after_open']}")
    for line in describe_processes(result["server_processes"]):
        print(line)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header("bench.idle: gateway RSS per idle authenticated connection", params)
    raise_open_files_limit(args.connections // max(1, args.client_procs) + WARM_CONNECTIONS + 1024)
    env = BenchEnv("idle", args.redis_url, args.log_level)
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
            "switchboard/plain kib_per_connection": ratio(
                sb["kib_per_connection"], base["kib_per_connection"]
            ),
            "switchboard/plain idle_cpu": ratio(sb["idle_cpu_pct"], base["idle_cpu_pct"]),
        }
        print(
            "-- ratio: switchboard / plain Channels RSS per connection:"
            f" {fmt_ratio(summary['switchboard/plain kib_per_connection'])} --"
        )
    verdict = None
    if sb and sb["kib_per_connection"] is not None:
        full_size = sb["connections"] >= TARGET_CONNECTIONS
        verdict = sb["kib_per_connection"] <= TARGET_KIB if full_size else None
        print(
            f"target (<= {TARGET_KIB:.0f} KiB per connection at {TARGET_CONNECTIONS}):"
            f" {verdict_text(verdict)} ({sb['kib_per_connection']} KiB at"
            f" {sb['connections']} connections)"
        )
    path = write_results(
        "idle",
        env.stamp,
        {
            "benchmark": "idle",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": summary,
            "target": {"kib": TARGET_KIB, "connections": TARGET_CONNECTIONS, "met": verdict},
            "logs": relative(env.log_root),
        },
    )
    print(f"results: {relative(path)}  (server logs: {relative(env.log_root)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
