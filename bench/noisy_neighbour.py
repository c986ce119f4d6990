"""Noisy neighbour: one tenant floods at ten times its share while another sends a little.

Two tenants of weight 1 share one worker. Capacity is set by the model time, not the CPU:
the echo agent answers after `--latency-ms` (default 200 ms), so a worker holding
`--worker-concurrency` calls at once (default 8, its SWITCHBOARD_WORKER_MAX_CALLS) finishes
at most concurrency * 1000 / latency runs per second (40/s),
and each tenant's fair share is half of that (20/s). The noisy tenant offers
`--noisy-factor` (10) times its share (200/s, five times the capacity); the quiet tenant
offers `--quiet-rate` (5/s). Reported per tenant: send -> reply.done p50/p99/p99.9 of the
runs sent in the measured window, statuses and errors (the noisy tenant's queue bound
answers `overloaded` once `max_queued_runs` of its runs wait), and every server process's
peak RSS and CPU. Variants, each on freshly started processes:

- alone: the quiet tenant by itself (fair queue on): the latency it should keep;
- fair:  both tenants, fair queue on (SWITCHBOARD_FAIR_QUEUE=1, the default);
- fifo:  both tenants, fair queue off: one FIFO Celery queue, the plain stack's behaviour.

The ratio reported is the quiet tenant's p99 with the noisy one against its p99 alone.

    python -m bench.noisy_neighbour
    python -m bench.noisy_neighbour --seconds 10 --warmup 2 --variants alone,fair
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/noisy_neighbour.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    TENANT,
    BenchEnv,
    LoadClient,
    MeasuredWindow,
    Results,
    benchmark_parser,
    describe_latency,
    fmt_ratio,
    gateway_base,
    parse_benchmark_args,
    print_server_report,
    ratio,
    run_benchmark,
    subset_argument,
    sum_counts,
    summarize,
)

VARIANTS = ("alone", "fair", "fifo")
QUIET = TENANT  # the bench tenant
NOISY = "noisy"
# Bounds that are about connections and clients, not about this benchmark, raised for both
# tenants so every send reaches the queue; max_queued_runs keeps its default.
OPEN_LIMITS = {
    "client_messages_per_s": 100_000,
    "client_burst": 100_000,
    "tenant_messages_per_s": 100_000,
    "tenant_burst": 100_000,
    "max_runs_in_flight_per_connection": 100_000,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("noisy_neighbour", __doc__)
    parser.add_argument("--latency-ms", type=int, default=200, help="model time of each run")
    parser.add_argument(
        "--worker-concurrency", type=int, default=8, help="model calls the worker holds at once"
    )
    parser.add_argument(
        "--noisy-factor", type=float, default=10, help="the noisy tenant's rate / its share"
    )
    parser.add_argument("--quiet-rate", type=float, default=5, help="the quiet tenant's sends/s")
    parser.add_argument("--noisy-connections", type=int, default=40)
    parser.add_argument("--quiet-connections", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30, help="how long both send")
    parser.add_argument("--warmup", type=float, default=5, help="seconds at the start not measured")
    parser.add_argument(
        "--drain", type=float, default=35, help="seconds to wait for replies after sending"
    )
    subset_argument(parser, VARIANTS)
    args = parse_benchmark_args(parser, argv, VARIANTS, client_procs=2)
    if args.client_procs != 2:
        parser.error("this benchmark uses two load generators: one per tenant")
    args.capacity_per_s = args.worker_concurrency * 1000 / args.latency_ms
    args.noisy_rate = args.noisy_factor * args.capacity_per_s / 2
    return args


def prepare_tenants(env: BenchEnv) -> str:
    """Both tenants with open connection bounds; returns the noisy tenant's secret."""
    env.prepare()
    from tenants.models import Tenant

    Tenant.objects.get_or_create(slug=NOISY)
    Tenant.objects.filter(slug__in=[QUIET, NOISY]).update(weight=1, **OPEN_LIMITS)
    return Tenant.objects.get(slug=NOISY).signing_secret


def tokens(secret: str, tenant: str, count: int) -> list[str]:
    from tenants.tokens import issue_token

    return [issue_token(secret, tenant, f"{tenant}{i}", 6 * 3600) for i in range(count)]


def run_variant(env: BenchEnv, client: LoadClient, variant: str, args: argparse.Namespace) -> dict:
    noisy_secret = prepare_tenants(env)
    fair = "0" if variant == "fifo" else "1"
    with env.cluster(
        variant,
        workers=1,
        # The capacity this benchmark reasons in: that many model calls at once.
        env={
            "SWITCHBOARD_FAIR_QUEUE": fair,
            "SWITCHBOARD_WORKER_MAX_CALLS": str(args.worker_concurrency),
        },
    ) as cluster:
        base = gateway_base(cluster, 0)
        loads = {QUIET: (1, args.quiet_rate, tokens(env.secret, QUIET, args.quiet_connections))}
        if variant != "alone":
            noisy_tokens = tokens(noisy_secret, NOISY, args.noisy_connections)
            loads[NOISY] = (0, args.noisy_rate, noisy_tokens)
        for tenant, (proc, _, tenant_tokens) in loads.items():
            urls = [f"{base}/ws/v1/?token={token}" for token in tenant_tokens]
            opened = client.call(
                proc,
                "open",
                group=tenant,
                urls=urls,
                names=[str(i) for i in range(len(urls))],
                expect="welcome",
            )
            if opened["failed"]:
                print(f"  {tenant}: {opened['failed']} connections failed: {opened['errors']}")
            reply = client.call(proc, "subscribe", group=tenant, prefix=f"nn-{tenant}-")
            if reply["errors"]:
                print(f"  {tenant}: subscribe errors {reply['errors']}")
        window = MeasuredWindow(env, cluster, variant, args.profile)
        # Both load generators send at once; each runs its tenant's load.
        for tenant, (proc, rate, _) in loads.items():
            client._send(
                proc,
                "load",
                {
                    "group": tenant,
                    "mode": "switchboard",
                    "rate": rate,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "drain": args.drain,
                    "id_prefix": f"{tenant}-",
                    "stream_prefix": f"nn-{tenant}-",
                    "text": "hello from the noisy neighbour benchmark",
                    "agent": "echo",
                    "options": {"latency_ms": args.latency_ms, "chunks": 1},
                },
            )
        replies = {tenant: client._receive(proc, "load") for tenant, (proc, _, _) in loads.items()}
        processes, profile = window.stop()
        stats = [client.call(proc, "stats") for proc, _, _ in loads.values()]
        for tenant, (proc, _, _) in loads.items():
            client.call(proc, "close", group=tenant)
    return {
        "variant": variant,
        "fair_queue": fair == "1",
        "tenants": {tenant: tenant_result(reply) for tenant, reply in replies.items()},
        "close_codes_after_open": sum_counts(s["close_codes"] for s in stats),
        "server_processes": processes,
        "profile": profile,
    }


def tenant_result(reply: dict[str, Any]) -> dict[str, Any]:
    errors = dict(reply["errors"])
    if reply["lost"]:
        errors["connection_lost"] = reply["lost"]
    if reply["unanswered"]:
        errors["no_reply_within_drain"] = reply["unanswered"]
    return {
        "sent": reply["sent"],
        "offered_per_s": round(reply["measured_sent"] / reply["window_s"], 1),
        "achieved_per_s": round(reply["window_done"] / reply["window_s"], 1),
        "done_ms": summarize(reply["done_ms"]),
        "ack_ms": summarize(reply["ack_ms"]),
        "statuses": reply["statuses"],
        "errors": errors,
        "client_max_send_lag_ms": round(reply["max_send_lag_ms"], 1),
    }


def print_variant(result: dict) -> None:
    print(f"-- {result['variant']} (fair queue {'on' if result['fair_queue'] else 'off'}) --")
    for tenant, figures in result["tenants"].items():
        print(
            f"  {tenant}: offered {figures['offered_per_s']}/s, achieved"
            f" {figures['achieved_per_s']}/s; sent {figures['sent']},"
            f" statuses {figures['statuses'] or '{}'}, errors {figures['errors'] or 'none'}"
        )
        print("    " + describe_latency("send->reply.done", figures["done_ms"]))
    print_server_report(result)


def conclude(results: Results, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    print(
        f"capacity {args.capacity_per_s:g} runs/s (concurrency {args.worker_concurrency},"
        f" {args.latency_ms} ms per run); share per tenant {args.capacity_per_s / 2:g}/s;"
        f" noisy offered {args.noisy_rate:g}/s, quiet {args.quiet_rate:g}/s"
    )
    alone = results.get("alone", {}).get("tenants", {}).get(QUIET)
    summary: dict[str, Any] = {}
    for variant in ("fair", "fifo"):
        quiet = results.get(variant, {}).get("tenants", {}).get(QUIET)
        if not quiet or not alone:
            continue
        for p in ("p50", "p99"):
            summary[f"quiet_{p}_{variant}/alone"] = ratio(quiet["done_ms"][p], alone["done_ms"][p])
    for name, value in summary.items():
        print(f"-- ratio: {name}: {fmt_ratio(value)} --")
    return summary, {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "noisy_neighbour",
        "a tenant at 10x its share beside a quiet one",
        args,
        run_variant,
        print_variant,
        conclude,
        sockets=args.noisy_connections + args.quiet_connections,
        announce=False,
    )


if __name__ == "__main__":
    raise SystemExit(main())
