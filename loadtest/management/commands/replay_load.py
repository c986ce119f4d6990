"""`manage.py replay_load TRACE`: replay a recorded trace against a gateway and report
latency, throughput and errors (docs/operations.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from loadtest.engine import EngineOptions
from loadtest.runner import (
    add_common_arguments,
    finish,
    meta,
    new_run_id,
    plan_tokens,
    run_plans,
    url_problem,
)
from loadtest.schedule import at_speed, plans_from_trace
from loadtest.trace import read_trace


class Command(BaseCommand):
    help = (
        "Replay a trace written by record_traffic against any gateway, at a speed factor and"
        " a scale (each recorded connection played by N clients), with tokens minted for the"
        " tenant; report ack and reply latency, throughput, errors and 429s."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("trace", type=Path, help="a JSON Lines trace (record_traffic --out)")
        add_common_arguments(parser)
        parser.add_argument(
            "--speed", type=float, default=1.0, help="play the trace this many times faster"
        )
        parser.add_argument(
            "--scale", type=int, default=1, help="clients per recorded connection's client"
        )
        parser.add_argument(
            "--separate-streams",
            action="store_true",
            help="copies beyond the first use their own streams (STREAM.rN) instead of sharing"
            " the recorded ones",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        problem = url_problem(options["url"])
        if problem:
            raise CommandError(problem)
        if options["speed"] <= 0:
            raise CommandError("--speed must be positive")
        if options["scale"] < 1:
            raise CommandError("--scale must be at least 1")
        try:
            with open(options["trace"], encoding="utf-8") as lines:
                trace = read_trace(lines)
        except OSError as error:
            raise CommandError(f"cannot read the trace: {error}") from None
        except ValueError as error:
            raise CommandError(f"{options['trace']}: {error}") from None
        if not trace.connections:
            raise CommandError(f"{options['trace']} holds no connections")
        run_id = new_run_id()
        plans = at_speed(
            plans_from_trace(
                trace,
                options["scale"],
                run_id,
                options["client_prefix"] or "replay",
                options["separate_streams"],
            ),
            options["speed"],
        )
        tenant = options["tenant"]
        tokens = plan_tokens(tenant, plans, trace.duration_s / options["speed"])
        if tokens is None:
            raise CommandError(f"no tenant {tenant!r} in this database")
        measurements = run_plans(
            options["url"],
            tokens,
            plans,
            EngineOptions(
                max_in_flight=options["max_in_flight"], drain_timeout_s=options["drain_timeout"]
            ),
            progress=not options["no_progress"],
        )
        finish(
            measurements,
            meta(
                "replay_load",
                options["url"],
                tenant,
                run_id,
                trace=str(options["trace"]),
                recorded_tenant=trace.header.get("tenant"),
                speed=options["speed"],
                scale=options["scale"],
                separate_streams=options["separate_streams"],
                recorded_connections=len(trace.connections),
                recorded_frames=trace.frame_count(),
                recorded_duration_s=round(trace.duration_s, 3),
            ),
            options["out"],
            options["plot"],
            self.stdout,
        )
