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
    ProcessSampler,
    Profiler,
    closest,
    command_line,
    common_arguments,
    describe_latency,
    describe_processes,
    describe_profile,
    fmt_ms,
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

VARIANTS = ("switchboard", "group")
STREAM = "fanout"
GROUP = "bench-fanout"
TARGET_MS = 250.0
TARGET_SUBSCRIBERS = 10_000
GROUP_HANDSHAKES_IN_FLIGHT = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--subscribers", type=int, default=TARGET_SUBSCRIBERS, help="K")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds not counted")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument(
        "--concurrency", type=int, default=200, help="handshakes in flight while connecting"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    common_arguments(parser)
    # The event reaches the sockets in a burst: two readers take it in twice as fast, so the
    # client's own reading adds less to the time to the last subscriber.
    parser.set_defaults(client_procs=2)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, tokens: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    k = args.subscribers
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
            for reply in client.all("subscribe", group="subs", stream=STREAM):
                if reply["errors"]:
                    print(f"  subscribe errors: {reply['errors']}")
        pub = client.call(0, "open", group="pub", urls=[publisher], expect=expect)
        if not pub["opened"]:
            raise RuntimeError(f"publisher could not connect: {pub['errors']}")
        print(
            f"  {opened['opened']} subscribers connected"
            f"{' and subscribed' if variant == 'switchboard' else ''}"
            f" in {time.monotonic() - started:.1f} s"
        )
        sampler = ProcessSampler(server_processes(cluster)).start()
        profiler = (
            Profiler(server_processes(cluster), env.log_root / variant).start()
            if args.profile
            else None
        )
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
        profile = profiler.stop() if profiler else None
        processes = sampler.stop()
        client.all("close", group="subs")
        client.call(0, "close", group="pub")
        stats = client.all("stats")
    measured = [r for r in rounds if r["measured"]]
    lasts = [r["last_ms"] for r in measured if r["last_ms"] is not None]
    median_last = statistics.median(lasts) if lasts else None
    median_round = closest(measured, "last_ms", median_last)
    closes: dict[str, int] = {}
    for stat in stats:
        for code, count in stat["close_codes"].items():
            closes[code] = closes.get(code, 0) + count
    return {
        "variant": variant,
        "subscribers": opened["opened"],
        "connect_failures": opened["errors"],
        "median_last_ms": median_last,
        "rounds": rounds,
        "deliveries_per_s": round(k / (median_last / 1000), 1) if median_last else None,
        "delivery_ms_median_round": median_round["delivery_ms"],
        "missing_total": sum(r["missing"] for r in measured),
        "close_codes_after_open": closes,
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
    machine = print_header("bench.fanout: one event to K subscribers of one stream", params)
    raise_open_files_limit(args.subscribers + 1024)
    env = BenchEnv("fanout", args.redis_url, args.log_level)
    results: dict[str, dict[str, Any]] = {}
    try:
        with LoadClient(args.client_procs, env.log_root / "loadgen") as client:
            tokens = env.tokens(args.subscribers + 1)
            for variant in args.variants:
                print(f"-- {variant} --")
                results[variant] = run_variant(env, client, variant, tokens, args)
                print_variant(results[variant])
    finally:
        env.cleanup()
    sb, base = results.get("switchboard"), results.get("group")
    summary = {}
    if sb and base:
        summary = {
            "switchboard/group median_last": ratio(sb["median_last_ms"], base["median_last_ms"])
        }
        print(
            f"-- ratio: switchboard / group_send time to the last subscriber:"
            f" {fmt_ratio(summary['switchboard/group median_last'])} --"
        )
    verdict = None
    if sb and sb["median_last_ms"] is not None:
        full_size = sb["subscribers"] >= TARGET_SUBSCRIBERS and args.rounds >= 5
        ok = sb["median_last_ms"] <= TARGET_MS and sb["missing_total"] == 0
        verdict = ok if full_size else None
        print(
            f"target (<= {TARGET_MS:.0f} ms to the last of {TARGET_SUBSCRIBERS}, median of 5):"
            f" {verdict_text(verdict)} ({fmt_ms(sb['median_last_ms'])} ms to the last of"
            f" {sb['subscribers']})"
        )
    path = write_results(
        "fanout",
        env.stamp,
        {
            "benchmark": "fanout",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": summary,
            "target": {"ms": TARGET_MS, "subscribers": TARGET_SUBSCRIBERS, "met": verdict},
            "logs": relative(env.log_root),
        },
    )
    print(f"results: {relative(path)}  (server logs: {relative(env.log_root)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
