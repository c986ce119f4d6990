"""Cancellation reaching the model call: a client's `cancel` -> the provider sees its
stream closed, while a worker process holds many other calls.

One worker holds `--calls` streaming calls to a local OpenAI-compatible SSE server
(bench/sse_provider.py, a piece a second), through the `openai` backend. The client then
cancels `--cancels` of them, one at a time; the provider records when each stream's client
went away. Reported: cancel -> connection closed at the provider, p50/p99/p99.9 and max,
and the worker's peak RSS and CPU.

Baseline, in the same run: the floor of closing a stream - a bare asyncio process with
aiohttp holding the same number of streams to the same server and cancelling the same
number of its own tasks (no gateway, Redis or worker between the client and the call).

    python -m bench.cancel
    python -m bench.cancel --calls 200 --cancels 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/cancel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchEnv,
    MeasuredWindow,
    benchmark_parser,
    command_line,
    describe_latency,
    describe_processes,
    fmt_ms,
    fmt_ratio,
    gateway_base,
    print_header,
    print_target,
    raise_open_files_limit,
    ratio,
    relative,
    summarize,
    write_results,
)
from bench.generations import Provider, raise_tenant_limits

TARGET_P99_MS = 100.0
MODEL = "gen?pieces=600&seconds=600"  # a piece a second, for longer than the benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("cancel", __doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls held by the worker")
    parser.add_argument("--cancels", type=int, default=200, help="calls cancelled, one by one")
    parser.add_argument("--gap-ms", type=float, default=20, help="time between two cancels")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7", help="flushed!")
    parser.add_argument("--log-level", default="WARNING", help="server processes' LOG_LEVEL")
    parser.add_argument("--profile", action="store_true", help="(unused)")
    return parser.parse_args(argv)


def closed_at(provider: Provider) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{provider.port}/stats", timeout=10) as reply:
        return json.loads(reply.read())["closed_at"]


async def wait_for_closes(provider: Provider, tags: list[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = await asyncio.to_thread(closed_at, provider)
        if all(tag in seen for tag in tags) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.1)


def through_switchboard(env: BenchEnv, provider: Provider, args: argparse.Namespace) -> dict:
    raise_tenant_limits(env, args.calls)
    worker_env = {
        "SWITCHBOARD_OPENAI_BASE_URL": provider.base_url,
        "SWITCHBOARD_OPENAI_MODEL": MODEL,
        "SWITCHBOARD_OPENAI_API_KEY_ENV": "",
        "SWITCHBOARD_WORKER_MAX_CALLS": str(args.calls + 100),
    }
    [token] = env.tokens(1)
    with env.cluster("switchboard", gateways=1, workers=1, env=worker_env) as cluster:
        window = MeasuredWindow(env, cluster, "switchboard", False)
        url = f"{gateway_base(cluster, 0)}/ws/v1/?token={token}"
        cancelled_at, seen = asyncio.run(hold_and_cancel(url, provider, args))
        processes, _ = window.stop()
    return result("switchboard", cancelled_at, seen, processes)


async def hold_and_cancel(
    url: str, provider: Provider, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    from client.connection import SwitchboardClient

    base, _, query = url.partition("?token=")
    client = await SwitchboardClient.connect(base, query)
    acks = [
        await client.send("held", "bench-openai", f"tag:c{n} hold this") for n in range(args.calls)
    ]
    # Every call is streaming once it has sent its first delta.
    started: set[str] = set()
    while len(started) < len(acks):
        event = await client.next_event("held", timeout=60)
        if event["kind"] == "reply.delta":
            started.add(event["cause"]["message"])
    cancelled_at: dict[str, float] = {}
    for n, ack in enumerate(acks[: args.cancels]):
        cancelled_at[f"c{n}"] = time.time()
        await client.cancel(ack["id"])
        await asyncio.sleep(args.gap_ms / 1000)  # the pace of cancels, not a wait
    seen = await wait_for_closes(provider, list(cancelled_at))
    await client.close()
    return cancelled_at, seen


async def bare(provider: Provider, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    first: dict[str, asyncio.Event] = {}

    async def hold(tag: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"tag:{tag} hold"}]}
        async with session.post(f"{provider.base_url}/chat/completions", json=body) as reply:
            async for _ in reply.content:
                first[tag].set()

    tasks = {}
    for n in range(args.calls):
        tag = f"b{n}"
        first[tag] = asyncio.Event()
        tasks[tag] = asyncio.create_task(hold(tag))
    for event in first.values():
        await event.wait()
    cancelled_at: dict[str, float] = {}
    for n in range(args.cancels):
        tag = f"b{n}"
        cancelled_at[tag] = time.time()
        tasks[tag].cancel()
        await asyncio.sleep(args.gap_ms / 1000)
    seen = await wait_for_closes(provider, list(cancelled_at))
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    await session.close()
    return result("bare", cancelled_at, seen, {})


def result(
    name: str, cancelled_at: dict[str, float], seen: dict[str, float], processes: dict
) -> dict[str, Any]:
    latencies = [1000 * (seen[tag] - at) for tag, at in cancelled_at.items() if tag in seen]
    return {
        "variant": name,
        "cancelled": len(cancelled_at),
        "closed": len(latencies),
        "cancel_to_closed_ms": summarize(latencies),
        "server_processes": processes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = dict(vars(args))
    machine = print_header("bench.cancel: a client's cancel reaching the model call", params)
    raise_open_files_limit(2 * args.calls + 1024)
    env = BenchEnv("cancel", args.redis_url, args.log_level)
    results: dict[str, dict[str, Any]] = {}
    try:
        provider = Provider(env.log_root / "provider-switchboard")
        try:
            results["switchboard"] = through_switchboard(env, provider, args)
        finally:
            provider.stop()
        provider = Provider(env.log_root / "provider-bare")
        try:
            results["bare"] = asyncio.run(bare(provider, args))
        finally:
            provider.stop()
    finally:
        env.cleanup()
    for name, data in results.items():
        print(f"-- {name} --")
        print(f"  {data['closed']} of {data['cancelled']} cancelled streams seen closed")
        print(
            "  " + describe_latency("cancel->closed at the provider", data["cancel_to_closed_ms"])
        )
        for line in describe_processes(data["server_processes"]):
            print(line)
    sb, floor = results["switchboard"], results["bare"]
    p99 = sb["cancel_to_closed_ms"]["p99"]
    ratios = {"p99": ratio(p99, floor["cancel_to_closed_ms"]["p99"])}
    print(f"-- ratio (switchboard / bare) -- p99 {fmt_ratio(ratios['p99'])}")
    met = p99 is not None and p99 <= TARGET_P99_MS and sb["closed"] == sb["cancelled"]
    print_target(
        f"cancel reaches the model call within {TARGET_P99_MS:.0f} ms (p99), with"
        f" {args.calls} calls held",
        met,
        f"p99 {fmt_ms(p99)} ms",
    )
    path = write_results(
        "cancel",
        env.stamp,
        {
            "benchmark": "cancel",
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": ratios,
            "target": {"p99_ms": TARGET_P99_MS, "met": met},
        },
    )
    print(f"results: {relative(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
