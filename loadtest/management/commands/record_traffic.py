"""`manage.py record_traffic`: record a tenant's client frames into a trace (docs/operations.md)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from loadtest.record import RecordingBusy, TrafficRecorder, new_config
from streams.redis_clients import sync_client
from tenants.models import Tenant

DEFAULT_DURATION_S = 60.0


class Command(BaseCommand):
    help = (
        "Record the frames a tenant's clients send to the running gateways (a sample of"
        " connections, with timing, without secrets) into a JSON Lines trace for replay_load."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--tenant", required=True, help="slug of the tenant to record")
        parser.add_argument(
            "--sample",
            type=float,
            default=0.1,
            help="share of connections recorded, whole (0 < SAMPLE <= 1; default 0.1)",
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=None,
            help=f"seconds to record (default {DEFAULT_DURATION_S:g} when --frames is not given)",
        )
        parser.add_argument("--frames", type=int, default=None, help="stop after N frames")
        parser.add_argument("--out", required=True, type=Path, help="the trace file to write")
        parser.add_argument(
            "--redact-text",
            action="store_true",
            help="replace message text and published data by placeholders of the same length",
        )
        parser.add_argument(
            "--max-len",
            type=int,
            default=100_000,
            help="cap of the recording stream in Redis (entries not yet copied beyond it are lost)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = options["tenant"]
        sample = options["sample"]
        duration = options["duration"]
        frames = options["frames"]
        if not 0 < sample <= 1:
            raise CommandError("--sample must be in (0, 1]")
        if frames is not None and frames < 1:
            raise CommandError("--frames must be at least 1")
        if duration is not None and duration <= 0:
            raise CommandError("--duration must be positive")
        if duration is None and frames is None:
            duration = DEFAULT_DURATION_S
        if not Tenant.objects.filter(slug=tenant).exists():
            raise CommandError(f"no tenant {tenant!r}")
        stop = {"asked": False}

        def ask_stop(*_: object) -> None:
            stop["asked"] = True

        previous = {sig: signal.signal(sig, ask_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with open(options["out"], "w", encoding="utf-8") as out:
                recorder = TrafficRecorder(
                    sync_client(),
                    tenant,
                    new_config(sample, options["redact_text"], options["max_len"]),
                    out,
                )
                try:
                    recorder.start()
                except RecordingBusy as busy:
                    out.close()
                    options["out"].unlink(missing_ok=True)  # no trace was recorded
                    raise CommandError(str(busy)) from None
                until = " or ".join(
                    part
                    for part in (
                        f"{duration:g} s" if duration is not None else "",
                        f"{frames} frames" if frames is not None else "",
                    )
                    if part
                )
                sys.stderr.write(
                    f"recording tenant {tenant} (sample {sample:g}) for {until};"
                    " Ctrl-C stops early\n"
                )
                sys.stderr.flush()
                result = recorder.run(duration, frames, lambda: stop["asked"])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write(
            f"recorded {result.frames} frames of {len(result.connections)} connections in"
            f" {result.duration_s:.1f} s ({result.stopped_by}) to {options['out']}"
        )
