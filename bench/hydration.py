"""Catch-up of a long reply: a client joining a 4,000-piece reply at its end, with a compact
catch-up (`subscribe` with `compact: true`: one reply.snapshot, or the reply.done alone)
versus a full one (every reply.delta), in bytes and time.

One gateway, no worker: the benchmark plays the run's worker through the run store (the
same scripts a worker uses) and appends `--pieces` pieces of `--piece-chars` characters to
one run. Then `--joins` times a client subscribes with `since: 0` and reads until its
catch-up reaches the head: bytes received (every frame, `subscribed` included) and time
from the subscribe to the frame that covers the head, p50/p99/p99.9. Measured twice: with
the reply still streaming (its last piece in, no reply.done), then finished. The full
catch-up is the baseline, in the same run on the same stream; the gateway's peak RSS and
CPU are reported for the whole run.

    python -m bench.hydration
    python -m bench.hydration --pieces 4000 --joins 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # `python bench/hydration.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DEFAULT_REDIS_URL,
    TENANT,
    BenchEnv,
    MeasuredWindow,
    benchmark_parser,
    command_line,
    describe_latency,
    describe_processes,
    fmt_ratio,
    gateway_base,
    print_header,
    print_target,
    ratio,
    relative,
    summarize,
    write_results,
)

STREAM = "long-reply"
MODES = ("full", "compact")
STATES = ("streaming", "finished")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("hydration", __doc__)
    parser.add_argument("--pieces", type=int, default=4000, help="pieces of the reply")
    parser.add_argument("--piece-chars", type=int, default=4, help="characters a piece")
    parser.add_argument("--joins", type=int, default=30, help="catch-ups measured per variant")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="FLUSHED before and after")
    parser.add_argument("--log-level", default="WARNING", help="server processes' LOG_LEVEL")
    return parser.parse_args(argv)


def write_reply(args: argparse.Namespace, redis_url: str) -> tuple[Any, Any, int]:
    """Send the message through the gateway's store (the run is created as by a `send`),
    claim its run as its worker would and append the pieces. Returns (store, run, head)."""
    import redis

    from streams import keys
    from streams.runs import RunStore

    client = redis.Redis.from_url(redis_url)
    message = _Send(id="m1", stream=STREAM, agent="echo", text="a long answer", options={})
    asyncio.run(_accept(message))
    receipt = client.get(keys.client_message(TENANT, "writer", "m1"))
    assert receipt is not None
    run_id = receipt.decode().split(" ")[2]
    store = RunStore(client)
    run = store.claim(run_id, 0)
    assert run is not None
    piece = "x" * args.piece_chars
    head = 0
    for _ in range(args.pieces):
        head = store.append_delta(run, piece)
    return store, run, head


class _Send:
    """A `send` frame as the stream store takes it (streams/log.py SendFrame)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields, prev=None)


async def _accept(message: _Send) -> None:
    from agents import get_agent
    from streams.log import StreamStore
    from streams.redis_clients import async_client

    await StreamStore(async_client()).accept_send(TENANT, "writer", message, get_agent("echo"))


async def join(url: str, compact: bool, head: int) -> tuple[int, float, int]:
    """One catch-up from seq 0 to `head`: (bytes received, seconds, frames)."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # welcome
        frame: dict[str, Any] = {"type": "subscribe", "stream": STREAM, "since": 0}
        if compact:
            frame["compact"] = True
        received = frames = 0
        started = time.perf_counter()
        await ws.send(orjson.dumps(frame).decode())
        while True:
            raw = await ws.recv()
            received += len(raw if isinstance(raw, bytes) else raw.encode())
            frames += 1
            parsed = orjson.loads(raw)
            if parsed.get("type") == "event" and parsed.get("seq") == head:
                return received, time.perf_counter() - started, frames


async def measure(url: str, compact: bool, head: int, joins: int) -> dict[str, Any]:
    sizes, times, counts = [], [], []
    for _ in range(joins):
        size, seconds, frames = await join(url, compact, head)
        sizes.append(size)
        times.append(1000 * seconds)
        counts.append(frames)
    return {
        "bytes": sizes[-1],
        "frames": counts[-1],
        "catch_up_ms": summarize(times),
        "joins_per_s": joins / (sum(times) / 1000) if times else None,
    }


def run(env: BenchEnv, args: argparse.Namespace) -> dict[str, Any]:
    [token] = env.tokens(1, prefix="reader")
    results: dict[str, Any] = {}
    with env.cluster("switchboard", gateways=1, workers=0) as cluster:
        window = MeasuredWindow(env, cluster, "switchboard", False)
        url = f"{gateway_base(cluster, 0)}/ws/v1/?token={token}"
        store, reply_run, head = write_reply(args, cluster.redis_url)
        for state in STATES:
            if state == "finished":
                store.finalize(reply_run.run_id, "ok", owner=reply_run.owner, run=reply_run)
                head += 1
            for mode in MODES:
                results[f"{state}/{mode}"] = asyncio.run(
                    measure(url, mode == "compact", head, args.joins)
                )
        processes, _ = window.stop()
    results["server_processes"] = processes
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header(
        f"bench.hydration: joining a {args.pieces}-piece reply at its end", params
    )
    # The benchmark writes the reply with the same scripts a worker uses, on the same Redis.
    os.environ["REDIS_URL"] = args.redis_url
    env = BenchEnv("hydration", args.redis_url, args.log_level)
    try:
        results = run(env, args)
    finally:
        env.cleanup()
    ratios: dict[str, Any] = {}
    for state in STATES:
        full, compact = results[f"{state}/full"], results[f"{state}/compact"]
        for mode, data in (("full", full), ("compact", compact)):
            print(f"-- {state}, {mode} catch-up --")
            print(f"  {data['bytes']:,} bytes in {data['frames']:,} frames")
            print("  " + describe_latency("subscribe -> head", data["catch_up_ms"]))
            print(f"  {data['joins_per_s']:.1f} catch-ups/s (one client, one after another)")
        ratios[state] = {
            "bytes": ratio(compact["bytes"], full["bytes"]),
            "p50": ratio(compact["catch_up_ms"]["p50"], full["catch_up_ms"]["p50"]),
            "p99": ratio(compact["catch_up_ms"]["p99"], full["catch_up_ms"]["p99"]),
        }
        print(
            f"-- ratio {state} (compact / full) -- bytes {fmt_ratio(ratios[state]['bytes'])},"
            f" p50 {fmt_ratio(ratios[state]['p50'])}, p99 {fmt_ratio(ratios[state]['p99'])}"
        )
    for line in describe_processes(results["server_processes"]):
        print(line)
    met = all(r["bytes"] is not None and r["bytes"] < 0.1 for r in ratios.values())
    print_target(
        "a compact catch-up of a long reply sends under a tenth of the full one's bytes",
        met,
        ", ".join(f"{state} {fmt_ratio(r['bytes'])}" for state, r in ratios.items()),
    )
    path = write_results(
        "hydration",
        env.stamp,
        {
            "benchmark": "hydration",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": ratios,
            "target": {"compact_bytes_ratio_below": 0.1, "met": met},
        },
    )
    print(f"results: {relative(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
