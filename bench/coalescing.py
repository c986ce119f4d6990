"""Delta coalescing: how fast one worker process streams replies of many small pieces.

A worker process runs steps of the echo agent back to back through
`orchestration.steps.execute_step` on one event loop (as its model-call runtime does, with
the shared lease renewal and the stop listener beside them, without Celery's dispatch), each
reply `--chunks` (200) pieces of `--piece-chars` (4) characters with no
delay between them: a fast model at the worker's full speed. Variant `coalesced` uses the
default policy (SWITCHBOARD_DELTA_FLUSH_CHARS=64, _MS=50, or `--flush-chars`/`--flush-ms`);
`per_piece` sets DELTA_FLUSH_CHARS=0, one `reply.delta` per piece as before coalescing.
Runs are created beforehand (`accept_send`, not measured) in batches of `--batch`; the
Redis database is flushed before each variant.

Reported per variant: pieces (tokens) per second the process sustains and replies per
second; the step time per reply p50/p99/p99.9; stream entries (reply.delta events) and
Redis commands per reply, and Redis CPU per reply (from INFO, measured around the steps
only); the process's peak RSS. Ratios are coalesced / per_piece.

    python -m bench.coalescing
    python -m bench.coalescing --replies 100 --warmup 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/coalescing.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MIB,
    TENANT,
    benchmark_parser,
    command_line,
    describe_latency,
    fmt_ratio,
    parse_benchmark_args,
    print_header,
    print_ratio,
    ratio,
    subset_argument,
    summarize,
    write_results,
)
from project.launcher import Cluster

VARIANTS = ("per_piece", "coalesced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("coalescing", __doc__)
    parser.add_argument("--replies", type=int, default=300, help="measured replies per variant")
    parser.add_argument("--warmup", type=int, default=20, help="replies first, not measured")
    parser.add_argument("--chunks", type=int, default=200, help="pieces per reply (max 1000)")
    parser.add_argument("--piece-chars", type=int, default=4, help="characters per piece")
    parser.add_argument("--batch", type=int, default=100, help="runs created at a time")
    parser.add_argument("--flush-chars", type=int, default=64, help="DELTA_FLUSH_CHARS")
    parser.add_argument("--flush-ms", type=float, default=50, help="DELTA_FLUSH_MS")
    subset_argument(parser, VARIANTS)
    return parse_benchmark_args(parser, argv, VARIANTS, profile=False)


def setup_django(redis_url: str, log_level: str) -> None:
    """Settings read REDIS_URL at import: point them at the bench database first."""
    os.environ["REDIS_URL"] = redis_url
    os.environ["CELERY_BROKER_URL"] = redis_url
    os.environ["LOG_LEVEL"] = log_level
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()


async def create_runs(client: Any, first: int, count: int, text: str, chunks: int) -> list[str]:
    from agents import get_agent
    from realtime.protocol import Send
    from streams.log import StreamStore

    store = StreamStore(client)
    agent = get_agent("echo")
    run_ids = []
    for index in range(first, first + count):
        frame = Send(f"m-{index}", f"s-{index}", "echo", text, {"chunks": chunks}, None)
        appended = await store.accept_send(TENANT, "bench", frame, agent, weight=1)
        assert appended.run_id is not None
        run_ids.append(appended.run_id)
    return run_ids


def redis_counters(client: Any) -> tuple[int, float]:
    stats = client.info("stats")
    cpu = client.info("cpu")
    return int(stats["total_commands_processed"]), float(cpu["used_cpu_user"] + cpu["used_cpu_sys"])


def run_variant(variant: str, args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    return asyncio.run(measure_variant(variant, args, redis_url))


async def measure_variant(variant: str, args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    import orjson
    import redis
    import redis.asyncio as aredis
    from django.conf import settings
    from django.test import override_settings

    from client.connection import since_last_restart
    from orchestration.inflight import InFlight
    from orchestration.steps import StepOutcome, execute_step
    from streams import keys
    from streams.runs import AsyncRunStore

    flush_chars = 0 if variant == "per_piece" else args.flush_chars
    # Through override_settings, whose signal makes project.conf read the settings again.
    variant_settings = override_settings(
        SWITCHBOARD={
            **settings.SWITCHBOARD,
            "DELTA_FLUSH_CHARS": flush_chars,
            "DELTA_FLUSH_MS": args.flush_ms,
        }
    )
    variant_settings.enable()
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    # The worker's side: its loop's client, the shared renewal and the stop listener.
    worker_client = aredis.Redis.from_url(redis_url)
    listener_client = aredis.Redis.from_url(redis_url)
    store = AsyncRunStore(worker_client)
    inflight = InFlight(store)
    services = [
        asyncio.create_task(inflight.keep_leases()),
        asyncio.create_task(inflight.listen(listener_client)),
    ]
    word = "abcdefghijklmnopqrstuvwxyz"[: max(1, args.piece_chars)]
    text = (word * args.chunks)[: args.piece_chars * args.chunks]

    total = args.warmup + args.replies
    durations: list[float] = []
    deltas: list[int] = []
    commands = 0
    redis_cpu = 0.0
    measured_s = 0.0
    done = 0
    try:
        while done < total:
            count = min(args.batch, total - done)
            run_ids = await create_runs(worker_client, done, count, text, args.chunks)
            before_commands, before_cpu = redis_counters(client)
            batch_durations = []
            for run_id in run_ids:
                started = time.perf_counter()
                outcome = await execute_step(store, inflight, run_id, 0, 0)
                batch_durations.append(time.perf_counter() - started)
                assert outcome == StepOutcome(), outcome
            after_commands, after_cpu = redis_counters(client)
            # Which replies of this batch are measured (the first `warmup` overall are not).
            skip = max(0, args.warmup - done)
            if skip < count:
                share = (count - skip) / count
                durations += batch_durations[skip:]
                measured_s += sum(batch_durations[skip:])
                # INFO itself is two commands per snapshot; the rest is the steps'.
                commands += round((after_commands - before_commands - 2) * share)
                redis_cpu += (after_cpu - before_cpu) * share
            # Every reply complete and whole; its deltas counted (outside the measured time).
            pipe = client.pipeline(transaction=False)
            for index in range(done, done + count):
                pipe.xrange(keys.stream_log(TENANT, f"s-{index}"))
            for position, entries in enumerate(pipe.execute()):
                events = [orjson.loads(fields[b"e"]) for _, fields in entries]
                # The deltas since the run's last reply.restart make its text.
                pieces = [e["data"]["text"] for e in since_last_restart(events)]
                last = events[-1]
                assert last["kind"] == "reply.done" and last["data"]["status"] == "ok", last
                assert "".join(pieces) == text == last["data"]["text"]
                if done + position >= args.warmup:
                    deltas.append(len(pieces))
            done += count
    finally:
        for service in services:
            service.cancel()
        await asyncio.gather(*services, return_exceptions=True)
        await worker_client.aclose()
        await listener_client.aclose()
        variant_settings.disable()
    client.flushdb()
    client.close()
    replies = len(durations)
    return {
        "flush_chars": flush_chars,
        "flush_ms": args.flush_ms,
        "replies": replies,
        "pieces_per_reply": args.chunks,
        "measured_s": measured_s,
        "pieces_per_s": replies * args.chunks / measured_s if measured_s else None,
        "replies_per_s": replies / measured_s if measured_s else None,
        "step_ms": summarize([d * 1000 for d in durations]),
        "deltas_per_reply": sum(deltas) / len(deltas) if deltas else None,
        "deltas_max": max(deltas, default=None),
        "redis_commands_per_reply": commands / replies if replies else None,
        "redis_cpu_ms_per_reply": redis_cpu * 1000 / replies if replies else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
    }


def print_variant(result: dict[str, Any]) -> None:
    print(
        f"throughput: {result['pieces_per_s']:.0f} pieces/s, {result['replies_per_s']:.1f}"
        f" replies/s in one worker process ({result['replies']} replies of"
        f" {result['pieces_per_reply']} pieces, {result['measured_s']:.1f} s)"
    )
    print(describe_latency("step time per reply", result["step_ms"]))
    print(
        f"per reply: {result['deltas_per_reply']:.1f} reply.delta entries"
        f" (max {result['deltas_max']}), {result['redis_commands_per_reply']:.1f} Redis"
        f" commands (those run by the Lua scripts included),"
        f" {result['redis_cpu_ms_per_reply']:.2f} ms of Redis CPU"
    )
    print(f"peak RSS of the worker process so far: {result['peak_rss_mib']:.1f} MiB")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header("bench.coalescing: one worker process, replies of many pieces", params)
    cluster = Cluster(redis_url=args.redis_url)
    try:
        url = cluster.ensure_redis()
        if url != args.redis_url:
            print(f"  (no Redis answered at {args.redis_url}; using embedded Redis {url})")
        setup_django(url, args.log_level)
        results = {}
        for variant in args.variants:
            print(f"-- {variant} --")
            results[variant] = run_variant(variant, args, url)
            print_variant(results[variant])
    finally:
        cluster.stop()
    ratios: dict[str, Any] = {}
    if set(VARIANTS) <= results.keys():
        on, off = results["coalesced"], results["per_piece"]
        ratios = {
            "pieces_per_s": ratio(on["pieces_per_s"], off["pieces_per_s"]),
            "step_p50": ratio(on["step_ms"]["p50"], off["step_ms"]["p50"]),
            "step_p99": ratio(on["step_ms"]["p99"], off["step_ms"]["p99"]),
            "deltas_per_reply": ratio(on["deltas_per_reply"], off["deltas_per_reply"]),
            "redis_commands_per_reply": ratio(
                on["redis_commands_per_reply"], off["redis_commands_per_reply"]
            ),
            "redis_cpu_per_reply": ratio(
                on["redis_cpu_ms_per_reply"], off["redis_cpu_ms_per_reply"]
            ),
        }
        print_ratio("pieces/s, coalesced / per piece", ratios["pieces_per_s"])
        print(
            "ratios (coalesced / per piece): "
            + ", ".join(f"{name} {fmt_ratio(value)}" for name, value in ratios.items())
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = write_results(
        "coalescing",
        stamp,
        {
            "benchmark": "coalescing",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": ratios,
        },
    )
    print(f"results: {path.relative_to(Path(__file__).resolve().parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
