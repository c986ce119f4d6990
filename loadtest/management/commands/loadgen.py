"""`manage.py loadgen`: synthetic load (connection storms, steady chat, fan-out) through the
replay engine, with the same report (docs/operations.md)."""

from __future__ import annotations

import json
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
from loadtest.scenarios import SCENARIOS, ScenarioOptions, build


class Command(BaseCommand):
    help = (
        "Generate synthetic load against a gateway: storm (connects, drops and resumed"
        " reconnects), chat (steady sends to an agent on a few streams) or fanout (one"
        " publisher, many subscribers); report latency, throughput, errors and 429s."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--scenario", required=True, choices=SCENARIOS)
        add_common_arguments(parser)
        parser.add_argument(
            "--clients", type=int, default=20, help="connections (fanout: subscribers)"
        )
        parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
        parser.add_argument(
            "--rate",
            type=float,
            default=None,
            help="chat: messages/s per client (default 0.5); fanout: publishes/s (default 5)",
        )
        parser.add_argument("--streams", type=int, default=4, help="chat, storm: streams used")
        parser.add_argument(
            "--ramp", type=float, default=1.0, help="seconds over which clients connect"
        )
        parser.add_argument(
            "--drops", type=int, default=2, help="storm: waves of drops and resumes"
        )
        parser.add_argument("--agent", default="echo", help="chat: the agent sent to")
        parser.add_argument(
            "--options",
            default=None,
            help='chat: the send\'s options as JSON, e.g. \'{"chunks": 3, "latency_ms": 50}\'',
        )
        parser.add_argument("--text-chars", type=int, default=40, help="chat: message length")
        parser.add_argument("--payload-chars", type=int, default=100, help="fanout: data size")
        parser.add_argument("--seed", type=int, default=0, help="seed of the scenario's randomness")

    def handle(self, *args: Any, **options: Any) -> None:
        problem = url_problem(options["url"])
        if problem:
            raise CommandError(problem)
        scenario = options["scenario"]
        if options["clients"] < 1 or options["duration"] <= 0:
            raise CommandError("--clients and --duration must be positive")
        send_options = None
        if options["options"]:
            try:
                send_options = json.loads(options["options"])
            except json.JSONDecodeError as error:
                raise CommandError(f"--options is not JSON: {error}") from None
            if not isinstance(send_options, dict):
                raise CommandError("--options must be a JSON object")
        rate = options["rate"]
        if rate is None:
            rate = 5.0 if scenario == "fanout" else 0.5
        run_id = new_run_id()
        parameters = ScenarioOptions(
            clients=options["clients"],
            duration_s=options["duration"],
            rate=rate,
            streams=options["streams"],
            ramp_s=options["ramp"],
            drops=options["drops"],
            agent=options["agent"],
            text_chars=options["text_chars"],
            options=send_options,
            payload_chars=options["payload_chars"],
            seed=options["seed"],
            run_id=run_id,
            client_prefix=options["client_prefix"] or "loadgen",
        )
        plans = build(scenario, parameters)
        tenant = options["tenant"]
        tokens = plan_tokens(tenant, plans, options["duration"])
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
                f"loadgen {scenario}",
                options["url"],
                tenant,
                run_id,
                scenario=scenario,
                clients=parameters.clients,
                duration_s=parameters.duration_s,
                rate=parameters.rate,
                streams=parameters.streams,
                ramp_s=parameters.ramp_s,
                drops=parameters.drops,
                agent=parameters.agent,
                options=parameters.options,
                seed=parameters.seed,
            ),
            options["out"],
            options["plot"],
            self.stdout,
        )
