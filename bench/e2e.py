"""End to end: `send` -> ack -> reply.done through gateway, Celery and worker.

N connections send at a fixed total rate (open loop: a slow reply does not slow the
sending) for a fixed time, each to its own stream, to the `echo` agent with options
{"latency_ms": 0, "chunks": 1}. Reported: achieved throughput (replies completed per second
inside the measured window), ack and send->reply.done latency percentiles, errors by code,
and peak RSS and CPU of every server process. The same load then goes, on freshly started
processes, to the two baselines served by the same daphne:

- naive: a stock consumer calls `task.delay()` per frame; the task answers with
  `async_to_sync(channel_layer.send)` to the consumer's channel (bench/consumers.py);
- echo:  a bare Channels consumer echoing each frame, the floor of a round trip.

Target (issue 2): >= 500 runs/s with send->reply.done p99 <= 100 ms on 2 cores.

    python -m bench.e2e                      # the target's load: 500/s, 500 sockets, 30 s
    python -m bench.e2e --rate 100 --connections 50 --seconds 8 --paths switchboard,echo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/e2e.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    benchmark_parser,
    describe_latency,
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

PATHS = ("switchboard", "naive", "echo")
ENDPOINTS = {"naive": "/bench/naive/", "echo": "/bench/echo/"}
TARGET_RATE = 500
TARGET_P99_MS = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("e2e", __doc__)
    parser.add_argument("--rate", type=float, default=500, help="sends per second, in total")
    parser.add_argument("--connections", type=int, default=500, help="WebSockets sending")
    parser.add_argument("--seconds", type=float, default=30, help="how long to send")
    parser.add_argument("--warmup", type=float, default=3, help="seconds at the start not measured")
    parser.add_argument(
        "--drain", type=float, default=10, help="seconds to wait for replies after sending"
    )
    parser.add_argument("--gateways", type=int, default=1, help="daphne processes")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument(
        "--worker-concurrency", type=int, default=8, help="pool size of each Celery worker"
    )
    subset_argument(parser, PATHS, "paths")
    parser.add_argument("--latency-ms", type=int, default=0, help="echo agent option")
    parser.add_argument("--chunks", type=int, default=1, help="echo agent option")
    parser.add_argument("--text", default="hello from the end-to-end benchmark", help="message")
    args = parse_benchmark_args(parser, argv, PATHS, "paths")
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")
    return args


def run_path(env: BenchEnv, client: LoadClient, path: str, args: argparse.Namespace) -> dict:
    workers = args.workers if path in ("switchboard", "naive") else 0
    with env.cluster(
        path, gateways=args.gateways, workers=workers, worker_concurrency=args.worker_concurrency
    ) as cluster:
        bases = [gateway_base(cluster, g) for g in range(args.gateways)]
        if path == "switchboard":
            tokens = env.tokens(args.connections)
            urls = [
                f"{bases[i % args.gateways]}/ws/v1/?token={token}" for i, token in enumerate(tokens)
            ]
            expect = "welcome"
        else:
            urls = [f"{bases[i % args.gateways]}{ENDPOINTS[path]}" for i in range(args.connections)]
            expect = "open"
        opened = client.open_spread("load", urls, expect)
        if opened["failed"]:
            print(f"  {opened['failed']} connections failed to open: {opened['errors']}")
        if path == "switchboard":
            # Subscribed before the clock starts, so the first sends measure the steady path.
            client.subscribe("load", prefix="e2e-")
        window = MeasuredWindow(env, cluster, path, args.profile)
        replies = client.all(
            "load",
            [{"id_prefix": f"p{index}-"} for index in range(client.procs)],
            group="load",
            mode="switchboard" if path == "switchboard" else "reply",
            rate=args.rate / client.procs,
            seconds=args.seconds,
            warmup=args.warmup,
            drain=args.drain,
            stream_prefix="e2e-",
            text=args.text,
            agent="echo",
            options={"latency_ms": args.latency_ms, "chunks": args.chunks},
        )
        processes, profile = window.stop()
        stats = client.all("stats")
        client.all("close", group="load")
    result = merge(path, opened, replies, processes, stats)
    result["profile"] = profile
    return result


def merge(path: str, opened: dict, replies: list[dict], processes: dict, stats: list) -> dict:
    ack_ms: list[float] = []
    done_ms: list[float] = []
    for reply in replies:
        ack_ms += reply["ack_ms"]
        done_ms += reply["done_ms"]
    errors = sum_counts(r["errors"] for r in replies)
    statuses = sum_counts(r["statuses"] for r in replies)
    close_codes = sum_counts(s["close_codes"] for s in stats)
    lost = sum(r["lost"] for r in replies)
    unanswered = sum(r["unanswered"] for r in replies)
    if lost:
        errors["connection_lost"] = lost
    if unanswered:
        errors["no_reply_within_drain"] = unanswered
    window_s = replies[0]["window_s"]
    completed = sum(r["window_done"] for r in replies)
    server_cpu = sum(v["cpu_s"] for v in processes.values() if isinstance(v, dict))
    answered = sum(statuses.values())
    return {
        "path": path,
        "connections_opened": opened["opened"],
        "connections_failed": opened["failed"],
        "sent": sum(r["sent"] for r in replies),
        "measured_sent": sum(r["measured_sent"] for r in replies),
        "offered_per_s": round(sum(r["measured_sent"] for r in replies) / window_s, 1),
        "achieved_per_s": round(completed / window_s, 1),
        "ack_ms": summarize(ack_ms) if path == "switchboard" else None,
        "done_ms": summarize(done_ms),
        "statuses": statuses,
        "errors": errors,
        "close_codes_after_open": close_codes,
        "server_processes": processes,
        "server_cpu_ms_per_reply": round(1000 * server_cpu / answered, 2) if answered else None,
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in replies), 2),
        "client_max_send_lag_ms": round(max(r["max_send_lag_ms"] for r in replies), 1),
        "client_late_sends": sum(r["late_sends"] for r in replies),
    }


def print_path(result: dict) -> None:
    print(f"-- {result['path']} --")
    print(
        f"  achieved {result['achieved_per_s']} replies/s (offered {result['offered_per_s']}/s);"
        f" sent {result['sent']}, statuses {result['statuses'] or '{}'}"
    )
    if result["ack_ms"]:
        print("  " + describe_latency("ack", result["ack_ms"]))
    print("  " + describe_latency("send->reply.done", result["done_ms"]))
    print(f"  errors by code: {result['errors'] or 'none'}")
    print_server_report(
        result,
        f"  server CPU per reply {result['server_cpu_ms_per_reply']} ms;"
        f" load generator CPU {result['client_cpu_s']} s,"
        f" max send lag {result['client_max_send_lag_ms']} ms"
        f" ({result['client_late_sends']} sends > 5 ms late)",
    )


def ratios(results: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sb = results.get("switchboard")
    for base in ("naive", "echo"):
        other = results.get(base)
        if not sb or not other:
            continue
        out[f"switchboard/{base}"] = {
            "achieved_per_s": ratio(sb["achieved_per_s"], other["achieved_per_s"]),
            "done_p50": ratio(sb["done_ms"]["p50"], other["done_ms"]["p50"]),
            "done_p99": ratio(sb["done_ms"]["p99"], other["done_ms"]["p99"]),
            "server_cpu_per_reply": ratio(
                sb["server_cpu_ms_per_reply"], other["server_cpu_ms_per_reply"]
            ),
        }
    return out


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = ratios(results)
    if summary:
        print("-- ratios (switchboard / baseline) --")
        for name, values in summary.items():
            print(
                f"  {name}: throughput {fmt_ratio(values['achieved_per_s'])},"
                f" reply.done p50 {fmt_ratio(values['done_p50'])},"
                f" p99 {fmt_ratio(values['done_p99'])},"
                f" server CPU per reply {fmt_ratio(values['server_cpu_per_reply'])}"
            )
    sb = results.get("switchboard")
    verdict = None
    if sb:
        p99 = sb["done_ms"]["p99"]
        ok = sb["achieved_per_s"] >= TARGET_RATE and p99 is not None and p99 <= TARGET_P99_MS
        verdict = ok if args.rate >= TARGET_RATE else None
        print_target(
            f">= {TARGET_RATE} runs/s achieved with send->reply.done p99 <= {TARGET_P99_MS:.0f} ms",
            verdict,
            f"{sb['achieved_per_s']}/s achieved of {args.rate:g}/s offered, p99 {fmt_ms(p99)} ms",
        )
    return summary, {"rate": TARGET_RATE, "p99_ms": TARGET_P99_MS, "met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # No "-- PATH --" before a path runs: print_path heads its report, after any progress lines.
    return run_benchmark(
        "e2e",
        "gateway -> Celery -> worker -> gateway",
        args,
        run_path,
        print_path,
        conclude,
        sockets=args.connections,
        variants=args.paths,
        announce=False,
    )


if __name__ == "__main__":
    raise SystemExit(main())
