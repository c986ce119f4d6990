"""Fan-out: one published event to K subscribers of one stream on one gateway process.

K WebSockets subscribe to one stream of one gateway process; another socket publishes one
event; the time from handing the `publish` frame to the socket until the last subscriber
has received the event is one round. Reported: that time's median over the rounds (after
warm-up rounds that are not counted), the per-subscriber delivery percentiles, deliveries
per second, and the gateway's peak RSS and CPU. The baseline, on a freshly started daphne:
K stock Channels consumers, each a member of one Channels group (one member per socket),
and a `publish` frame that the receiving consumer `group_send`s to the group.

The baseline layer's capacity is raised to K + 1000 for the run: at the default capacity
channels-redis would drop the messages past it silently, and the baseline would measure
how fast messages are dropped.

Target (issue 2): <= 250 ms to the last of 10,000 subscribers (median of 5) on 2 cores.

    python -m bench.fanout                       # 10,000 subscribers, 5 rounds
    python -m bench.fanout --subscribers 500 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/fanout.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    benchmark_parser,
    closest,
    describe_latency,
    fmt_ms,
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

VARIANTS = ("switchboard", "group")
STREAM = "fanout"
GROUP = "bench-fanout"
TARGET_MS = 250.0
TARGET_SUBSCRIBERS = 10_000
GROUP_HANDSHAKES_IN_FLIGHT = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("fanout", __doc__)
    parser.add_argument("--subscribers", type=int, default=TARGET_SUBSCRIBERS, help="K")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds not counted")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument(
        "--concurrency", type=int, default=200, help="handshakes in flight while connecting"
    )
    subset_argument(parser, VARIANTS)
    # The event reaches the sockets in a burst: two readers take it in twice as fast, so the
    # client's own reading adds less to the time to the last subscriber.
    return parse_benchmark_args(parser, argv, VARIANTS, client_procs=2)


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    k = args.subscribers
    tokens = env.tokens(k + 1)  # the same tokens for every variant: the last one publishes
    layer_env = {"CHANNEL_LAYER_CAPACITY": str(k + 1000)}
    with env.cluster(variant, gateways=1, workers=0, env=layer_env) as cluster:
        base = gateway_base(cluster, 0)
        if variant == "switchboard":
            urls = [f"{base}/ws/v1/?token={token}" for token in tokens[:k]]
            publisher = f"{base}/ws/v1/?token={tokens[k]}"
            expect = "welcome"
            concurrency = args.concurrency
        else:
            urls = [f"{base}/bench/group/?token={token}&group={GROUP}" for token in tokens[:k]]
            publisher = f"{base}/bench/group/?token={tokens[k]}&join=0"
            expect = "open"
            # Each handshake holds a layer connection for group_add, and redis-py 8 caps the
            # layer's pool at 100 (HTTP 500 past it): the plain stack connects more slowly.
            concurrency = min(args.concurrency, GROUP_HANDSHAKES_IN_FLIGHT)
        started = time.monotonic()
        opened = client.open_spread("subs", urls, expect, concurrency=concurrency)
        if opened["failed"]:
            print(f"  {opened['failed']} subscribers failed to connect: {opened['errors']}")
        if variant == "switchboard":
            client.subscribe("subs", stream=STREAM)
        pub = client.call(0, "open", group="pub", urls=[publisher], expect=expect)
        if not pub["opened"]:
            raise RuntimeError(f"publisher could not connect: {pub['errors']}")
        print(
            f"  {opened['opened']} subscribers connected"
            f"{' and subscribed' if variant == 'switchboard' else ''}"
            f" in {time.monotonic() - started:.1f} s"
        )
        window = MeasuredWindow(env, cluster, variant, args.profile)
        rounds = []
        timeout_ms = max(30_000, 5 * k)
        for number in range(args.warmup_rounds + args.rounds):
            marker = f"fanout-{variant}-{number}-{secrets.token_hex(4)}"
            if variant == "switchboard":
                frame = {"type": "publish", "id": marker, "stream": STREAM, "data": {"m": marker}}
            else:
                frame = {"type": "publish", "group": GROUP, "data": {"m": marker}}
            client.all("arm", group="subs", marker=marker)
            sent_at = client.call(0, "fire", group="pub", text=json.dumps(frame))["t"]
            collected = client.all("collect", group="subs", timeout_ms=timeout_ms)
            delays = [t - sent_at for reply in collected for t in reply["times"]]
            missing = sum(reply["missing"] for reply in collected)
            measured = number >= args.warmup_rounds
            rounds.append(
                {
                    "measured": measured,
                    "last_ms": max(delays) if delays else None,
                    "received": len(delays),
                    "missing": missing,
                    "delivery_ms": summarize(delays),
                }
            )
            label = "round" if measured else "warm-up"
            print(
                f"  {label} {number + 1}: last of {len(delays)} received after"
                f" {fmt_ms(rounds[-1]['last_ms'])} ms"
                + (f", {missing} never received it" if missing else "")
            )
            sys.stdout.flush()
            time.sleep(args.pause)
        processes, profile = window.stop()
        client.all("close", group="subs")
        client.call(0, "close", group="pub")
        stats = client.all("stats")
    measured = [r for r in rounds if r["measured"]]
    lasts = [r["last_ms"] for r in measured if r["last_ms"] is not None]
    median_last = statistics.median(lasts) if lasts else None
    median_round = closest(measured, "last_ms", median_last)
    return {
        "variant": variant,
        "subscribers": opened["opened"],
        "connect_failures": opened["errors"],
        "median_last_ms": median_last,
        "rounds": rounds,
        "deliveries_per_s": round(k / (median_last / 1000), 1) if median_last else None,
        "delivery_ms_median_round": median_round["delivery_ms"],
        "missing_total": sum(r["missing"] for r in measured),
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "server_processes": processes,
        "profile": profile,
    }


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"  => median time to the last of {result['subscribers']} subscribers:"
        f" {fmt_ms(result['median_last_ms'])} ms"
        f" ({result['deliveries_per_s']} deliveries/s)"
    )
    print("  " + describe_latency("per-subscriber delivery", result["delivery_ms_median_round"]))
    if result["missing_total"]:
        print(f"  subscribers that missed an event: {result['missing_total']}")
    print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    sb, base = results.get("switchboard"), results.get("group")
    summary = {}
    if sb and base:
        summary = {
            "switchboard/group median_last": ratio(sb["median_last_ms"], base["median_last_ms"])
        }
        print_ratio(
            "switchboard / group_send time to the last subscriber",
            summary["switchboard/group median_last"],
        )
    verdict = None
    if sb and sb["median_last_ms"] is not None:
        full_size = sb["subscribers"] >= TARGET_SUBSCRIBERS and args.rounds >= 5
        ok = sb["median_last_ms"] <= TARGET_MS and sb["missing_total"] == 0
        verdict = ok if full_size else None
        print_target(
            f"<= {TARGET_MS:.0f} ms to the last of {TARGET_SUBSCRIBERS}, median of 5",
            verdict,
            f"{fmt_ms(sb['median_last_ms'])} ms to the last of {sb['subscribers']}",
        )
    return summary, {"ms": TARGET_MS, "subscribers": TARGET_SUBSCRIBERS, "met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "fanout",
        "one event to K subscribers of one stream",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.subscribers,
    )


if __name__ == "__main__":
    raise SystemExit(main())
