"""What `replay_load` and `loadgen` share: options, tokens, the progress bar around the
engine, and writing the report (JSON, PNG)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import secrets
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from loadtest.engine import Engine, EngineOptions
from loadtest.report import Measurements, build_report, describe
from loadtest.schedule import ConnectionPlan, clients_of, total_frames

PROGRESS_INTERVAL_S = 0.25


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        required=True,
        help="the gateway's WebSocket URL, e.g. ws://127.0.0.1:8000/ws/v1/; several,"
        " comma-separated: connections are spread over them in turn",
    )
    parser.add_argument("--tenant", required=True, help="tenant whose secret signs the tokens")
    parser.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the latency PNG here")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="runs without reply.done a connection may have before it holds sends back"
        " (default: the server's per-connection limit; 0: no bound)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds a connection waits for its outstanding acks and replies at its end",
    )
    parser.add_argument(
        "--client-prefix",
        default=None,
        help="client ids are PREFIX-N (the tokens are minted for them)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def new_run_id() -> str:
    """Prefixes the run's message ids, so runs never look like retries of each other."""
    return secrets.token_hex(3)


def tenant_secret(slug: str) -> str | None:
    from tenants.models import Tenant

    tenant = Tenant.objects.filter(slug=slug).first()
    return None if tenant is None else tenant.signing_secret


def mint_tokens(secret: str, tenant: str, clients: list[str], ttl_s: int) -> dict[str, str]:
    from tenants.tokens import issue_token

    return {client: issue_token(secret, tenant, client, ttl_s) for client in clients}


def split_urls(url: str) -> list[str]:
    """`--url` as a list: one URL, or several comma-separated."""
    return [part.strip() for part in url.split(",") if part.strip()]


def url_problem(url: str) -> str | None:
    """Why `url` (one, or several comma-separated) cannot be a gateway's WebSocket URL
    (None: it can)."""
    urls = split_urls(url)
    if len(urls) > 1:
        return next((problem for u in urls if (problem := url_problem(u))), None)
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        return f"--url must be a ws:// or wss:// URL with a host, not {url!r}"
    return None


def public_url(url: str) -> str:
    """The URL without its query (where a token could be); each of several."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(public_url(u) for u in urls)
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def raise_open_files_limit(needed: int) -> None:
    """Each connection is a file descriptor; the default soft limit (1024) is too low
    for a storm."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < min(target, needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _run(
    engine: Engine, plans: list[ConnectionPlan], progress: bool, err: TextIO
) -> Measurements:
    run = asyncio.ensure_future(engine.run(plans))
    # SIGTERM ends the run early with what it measured so far (a driver's deadline).
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, run.cancel)
    if not progress:
        await asyncio.wait([run])
        return _measured(engine, run)
    bar = tqdm(
        total=total_frames(plans),
        unit="frame",
        desc="frames sent",
        file=err,
        mininterval=PROGRESS_INTERVAL_S,
    )
    with bar:
        while not run.done():
            await asyncio.wait([run], timeout=PROGRESS_INTERVAL_S)
            bar.update(engine.frames_sent - bar.n)
        bar.update(engine.frames_sent - bar.n)
    return _measured(engine, run)


def _measured(engine: Engine, run: asyncio.Future[Measurements]) -> Measurements:
    if not run.cancelled():
        return run.result()
    engine.m.interrupted = True
    engine.m.duration_s = engine.now()
    return engine.m


def run_plans(
    url: str,
    tokens: dict[str, str],
    plans: list[ConnectionPlan],
    options: EngineOptions,
    progress: bool = True,
    err: TextIO = sys.stderr,
) -> Measurements:
    raise_open_files_limit(len(plans) + 256)
    urls = split_urls(url)
    return asyncio.run(_run(Engine(urls, tokens, options), plans, progress, err))


def plan_tokens(
    tenant: str, plans: list[ConnectionPlan], duration_s: float
) -> dict[str, str] | None:
    """Tokens for every client of the plans (None: no such tenant); they outlive the run."""
    secret = tenant_secret(tenant)
    if secret is None:
        return None
    return mint_tokens(secret, tenant, clients_of(plans), int(duration_s) + 3600)


def meta(command: str, url: str, tenant: str, run_id: str, **parameters: Any) -> dict[str, Any]:
    return {
        "command": command,
        "url": public_url(url),
        "tenant": tenant,
        "run_id": run_id,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": parameters,
    }


def finish(
    measurements: Measurements,
    run_meta: dict[str, Any],
    out: Path | None,
    plot: Path | None,
    stdout: TextIO,
) -> dict[str, Any]:
    """Build the report, write it (JSON, and the PNG when asked) and print its summary."""
    report = build_report(measurements, run_meta)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        from loadtest.plot import write_plot  # matplotlib only when a plot is asked for

        write_plot(report, plot)
    stdout.write(describe(report) + "\n")
    if out is not None:
        stdout.write(f"report: {out}\n")
    if plot is not None:
        stdout.write(f"plot: {plot}\n")
    return report
