"""Slow readers: K connections stop reading while a producer publishes to their stream.

K sockets (the crowd) and a few watchers subscribe to one stream of one gateway process;
a publisher sends E events of 8 KB. In the `stalled` variant the crowd stops
reading first (their sockets are paused: kernel buffers fill, the gateway's writes back
up, exactly as with clients on a dead network); in the `reading` variant, the comparison
in the same run, the crowd keeps up. Reported for each: the gateway's peak RSS (the point:
it must not grow with what the stalled crowd does not read), how many of the crowd were
closed with 4008, publish throughput, and the watchers' delivery latency (send of a
marked event to its arrival; every `--mark-every`-th event is marked).

Bound per connection: SWITCHBOARD_OUTBOX_MAX_EVENTS / _BYTES, plus Twisted's write
buffer up to its high-water mark. Event strings are shared between the sockets'
buffers, so a stalled crowd costs references, not copies.

    python -m bench.slow_readers                     # 1,000 stalled of 1,000, 3,000 events
    python -m bench.slow_readers --crowd 200 --events 1500
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/slow_readers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
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
    print_target,
    ratio,
    run_benchmark,
    subset_argument,
    sum_counts,
    summarize,
)

VARIANTS = ("stalled", "reading")
STREAM = "slow-readers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("slow_readers", __doc__)
    parser.add_argument("--crowd", type=int, default=1000, help="sockets that stop reading")
    parser.add_argument("--watchers", type=int, default=20, help="sockets that keep reading")
    parser.add_argument("--events", type=int, default=3000, help="events published")
    # Loopback's kernel buffers take megabytes per socket before a paused reader pushes
    # back on the server: events must be large enough for the run to get past them.
    parser.add_argument("--event-bytes", type=int, default=8000, help="padding per event")
    parser.add_argument("--mark-every", type=int, default=50, help="events between marks")
    subset_argument(parser, VARIANTS)
    return parse_benchmark_args(parser, argv, VARIANTS, client_procs=1)


def run_variant(
    env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    k, w = args.crowd, args.watchers
    tokens = env.tokens(k + w + 1)
    with env.cluster(variant, gateways=1, workers=0) as cluster:
        base = gateway_base(cluster, 0)
        urls = [f"{base}/ws/v1/?token={token}" for token in tokens]
        crowd = client.open_spread("crowd", urls[:k], "welcome")
        watch = client.open_spread("watch", urls[k : k + w], "welcome")
        publisher = client.call(0, "open", group="pub", urls=[urls[-1]], expect="welcome")
        if crowd["failed"] or watch["failed"] or not publisher["opened"]:
            raise RuntimeError(f"connecting failed: {crowd['errors']} {watch['errors']}")
        client.subscribe("crowd", stream=STREAM)
        client.subscribe("watch", stream=STREAM)
        if variant == "stalled":
            client.all("reading", group="crowd", on=False)
        client.all("stats")  # close codes are counted from here
        window = MeasuredWindow(env, cluster, variant, args.profile)
        delivery: list[float] = []
        missed = 0
        pad = "x" * args.event_bytes
        started = time.monotonic()
        for number in range(args.events):
            marker = f"slow-{number}-{secrets.token_hex(4)}"
            frame = {
                "type": "publish",
                "id": marker,
                "stream": STREAM,
                "data": {"m": marker, "pad": pad},
            }
            text = json.dumps(frame)
            if number % args.mark_every:
                client.call(0, "fire", group="pub", text=text)
                continue
            client.all("arm", group="watch", marker=marker)
            sent_at = client.call(0, "fire", group="pub", text=text)["t"]
            for reply in client.all("collect", group="watch", timeout_ms=30_000):
                delivery += [t - sent_at for t in reply["times"]]
                missed += reply["missing"]
        publishing_s = time.monotonic() - started
        processes, profile = window.stop()
        stats = client.all("stats")
        # A paused socket never reads its close frame, so the gateway's log says what the
        # load generator cannot.
        gateway_log = cluster.processes["gateway-0"].log_path.read_text(errors="replace")
        slow_closes = gateway_log.count("slow consumer closed")
        for group in ("crowd", "watch", "pub"):
            client.all("close", group=group)
    codes = sum_counts(s["close_codes"] for s in stats)
    return {
        "variant": variant,
        "crowd": k,
        "watchers": w,
        "events": args.events,
        "publish_per_s": round(args.events / publishing_s, 1),
        "watcher_delivery_ms": summarize(delivery),
        "watcher_missed": missed,
        "close_codes_after_open": codes,
        "crowd_closed_4008": slow_closes,
        "server_processes": processes,
        "profile": profile,
    }


def _gateway_peak_mib(result: dict[str, Any]) -> float | None:
    for name, process in result["server_processes"].items():
        if name.startswith("gateway"):
            return process.get("peak_rss_mib")
    return None


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"  => published {result['events']} events at {result['publish_per_s']}/s;"
        f" {result['crowd_closed_4008']} of {result['crowd']} crowd sockets closed 4008;"
        f" close codes {result['close_codes_after_open'] or 'none'}"
    )
    print("  " + describe_latency("watcher delivery", result["watcher_delivery_ms"]))
    if result["watcher_missed"]:
        print(f"  watcher deliveries missing: {result['watcher_missed']}")
    print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    stalled, reading = results.get("stalled"), results.get("reading")
    summary: dict[str, Any] = {}
    verdict = None
    if stalled and reading:
        summary["peak gateway RSS stalled/reading"] = ratio(
            _gateway_peak_mib(stalled), _gateway_peak_mib(reading)
        )
        summary["watcher p99 stalled/reading"] = ratio(
            stalled["watcher_delivery_ms"].get("p99"), reading["watcher_delivery_ms"].get("p99")
        )
        print_ratio(
            "peak gateway RSS, stalled / reading crowd", summary["peak gateway RSS stalled/reading"]
        )
        print_ratio(
            "watchers' p99 delivery, stalled / reading crowd",
            summary["watcher p99 stalled/reading"],
        )
        verdict = stalled["crowd_closed_4008"] == stalled["crowd"] and not stalled["watcher_missed"]
        print_target(
            "every stalled reader closed 4008, watchers miss nothing",
            verdict,
            f"{stalled['crowd_closed_4008']} of {stalled['crowd']} closed 4008",
        )
    return summary, {"met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "slow_readers",
        "K connections stop reading while a producer publishes",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.crowd + args.watchers + 1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
