"""`manage.py loadgen`: synthetic load (connection storms, steady chat, fan-out, the seed's
night) through the replay engine, with the same report (docs/operations.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandError

from loadtest.engine import EngineOptions
from loadtest.report import raw_samples
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
from loadtest.schedule import ConnectionPlan


class Command(BaseCommand):
    help = (
        "Generate synthetic load against a gateway: storm (connects, drops and resumed"
        " reconnects), chat (steady sends to an agent on a few streams), fanout (one"
        " publisher, many subscribers) or night (many readers, a few senders, a"
        " reconnect storm midway, every seq checked); report latency, throughput, errors"
        " and 429s."
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
        parser.add_argument(
            "--send-share",
            type=float,
            default=0.01,
            help="night: share of the clients that send, each minute",
        )
        parser.add_argument(
            "--storm-share",
            type=float,
            default=0.1,
            help="night: share of the clients dropped and resumed midway",
        )
        parser.add_argument(
            "--wave-spread",
            type=float,
            default=0.5,
            help="storm, night: seconds over which one wave's drops are spread",
        )
        parser.add_argument(
            "--settle",
            type=float,
            default=15.0,
            help="night: seconds connections stay after the last send",
        )
        parser.add_argument(
            "--shard",
            default=None,
            help="K/N: play only the K-th of N shards of the clients (0-based; clients K,"
            " K+N, ...), so N processes can play one run together",
        )
        parser.add_argument(
            "--part",
            choices=PARTS,
            default="all",
            help="play only the clients that reconnect in the run (`reconnecting`) or only"
            " the others (`steady`), before --shard: the load generator playing the storm"
            " is then not the one timing the deliveries to readers that stay connected",
        )
        parser.add_argument(
            "--start-at",
            type=float,
            default=None,
            help="wall-clock time (epoch seconds) of the run's offset 0, so the shards"
            " played by several processes keep one schedule",
        )
        parser.add_argument(
            "--raw",
            type=Path,
            default=None,
            help="also write the raw samples and counters here (JSON), to merge shards",
        )

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
        shard = parse_shard(options["shard"])
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
            send_share=options["send_share"],
            storm_share=options["storm_share"],
            wave_spread_s=options["wave_spread"],
            settle_s=options["settle"],
        )
        plans = select_part(build(scenario, parameters), options["part"])
        if shard is not None:
            plans = plans[shard[0] :: shard[1]]
        tenant = options["tenant"]
        tokens = plan_tokens(tenant, plans, options["duration"])
        if tokens is None:
            raise CommandError(f"no tenant {tenant!r} in this database")
        measurements = run_plans(
            options["url"],
            tokens,
            plans,
            EngineOptions(
                max_in_flight=options["max_in_flight"],
                drain_timeout_s=options["drain_timeout"],
                start_at=options["start_at"],
                check_seqs=scenario == "night",
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
                shard=options["shard"],
                part=options["part"],
            ),
            options["out"],
            options["plot"],
            self.stdout,
        )
        if options["raw"] is not None:
            options["raw"].write_bytes(orjson.dumps(raw_samples(measurements)))


PARTS = ("all", "steady", "reconnecting")


def select_part(plans: list[ConnectionPlan], part: str) -> list[ConnectionPlan]:
    """The plans of `--part`: those with a reconnect among their actions, the others, or
    all of them."""
    if part == "all":
        return plans
    wanted = part == "reconnecting"
    return [plan for plan in plans if any(a.reconnect for a in plan.actions) == wanted]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard K/N` as (K, N); None when not given."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise CommandError(f"--shard must be K/N, not {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise CommandError(f"--shard {text}: K must be in 0..N-1")
    return k, n
