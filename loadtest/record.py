"""The recorder's side of traffic recording (`manage.py record_traffic`): turn a tenant's
recording on, copy what gateways append to the recording stream into a trace file, and
turn it off. Gateways' side: realtime/recording.py.

The switch key is set only when absent (one recording per tenant at a time) with a lease
of LEASE_S, renewed while the recorder runs: a recorder that dies stops the recording
within LEASE_S. The recording stream is read from the entry before the switch was set,
and entries of another recording (a gateway that has not yet seen an earlier one end)
are skipped by their recording id.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import orjson
import redis

from loadtest.trace import dumps_line, header_line, trace_line
from realtime.recording import FLUSH_S, RecordingConfig
from streams import keys, scripts

logger = logging.getLogger(__name__)

LEASE_S = 10.0
READ_BLOCK_MS = 250
READ_COUNT = 1000
# After the switch is off, gateways still write what they had buffered (FLUSH_S) and
# what arrived before they looked again; entries stamped before the stop are kept.
DRAIN_S = 4 * FLUSH_S + 0.3


class RecordingBusy(Exception):
    """The tenant is being recorded already."""


@dataclass
class RecordResult:
    frames: int = 0
    lines: int = 0
    connections: set[str] = field(default_factory=set)
    duration_s: float = 0.0
    stopped_by: str = ""
    dropped_other: int = 0  # entries of another recording, skipped


def new_config(rate: float, redact_text: bool, max_len: int) -> RecordingConfig:
    return RecordingConfig(
        id=secrets.token_hex(6),
        salt=secrets.token_hex(16),
        rate=rate,
        redact_text=redact_text,
        max_len=max_len,
    )


class TrafficRecorder:
    def __init__(
        self, client: redis.Redis, tenant: str, config: RecordingConfig, out: TextIO
    ) -> None:
        self.client = client
        self.tenant = tenant
        self.config = config
        self.out = out
        self.switch = keys.recording(tenant)
        self.log = keys.recording_log(tenant)
        self._value = config.dumps()
        self._last_id = "0-0"
        self._started_wall = 0.0
        self.result = RecordResult()

    def start(self) -> None:
        """Turn recording on and write the trace's header; RecordingBusy when another
        recorder has the tenant."""
        newest = self.client.xrevrange(self.log, count=1)
        self._last_id = newest[0][0].decode() if newest else "0-0"
        if not self.client.set(self.switch, self._value, nx=True, px=int(LEASE_S * 1000)):
            ttl = self.client.pttl(self.switch)
            raise RecordingBusy(
                f"tenant {self.tenant!r} is being recorded already"
                f" (its switch expires in {max(ttl, 0) / 1000:.1f} s unless renewed)"
            )
        self._started_wall = time.time()
        started = datetime.fromtimestamp(self._started_wall, UTC).isoformat(timespec="milliseconds")
        self._write(
            header_line(
                self.tenant,
                self.config.rate,
                self.config.redact_text,
                started,
                recording=self.config.id,
            )
        )
        self.out.flush()
        logger.info(
            "recording tenant=%s rate=%s id=%s", self.tenant, self.config.rate, self.config.id
        )

    def run(
        self,
        duration_s: float | None,
        max_frames: int | None,
        should_stop: Callable[[], bool],
    ) -> RecordResult:
        """Copy entries into the trace until the duration, the frame count, should_stop()
        or the switch vanishing (someone deleted it); then turn recording off."""
        started = time.monotonic()
        deadline = None if duration_s is None else started + duration_s
        next_renewal = started + LEASE_S / 3
        stopped_by = ""
        try:
            while not stopped_by:
                now = time.monotonic()
                if should_stop():
                    stopped_by = "signal"
                    break
                if deadline is not None and now >= deadline:
                    stopped_by = "duration"
                    break
                if now >= next_renewal:
                    if not scripts.RenewRecording(
                        switch=self.switch, recording=self._value, lease_ms=int(LEASE_S * 1000)
                    ).run(self.client):
                        stopped_by = "switch gone"
                        break
                    next_renewal = now + LEASE_S / 3
                block_ms = READ_BLOCK_MS
                if deadline is not None:
                    block_ms = max(1, min(block_ms, int((deadline - now) * 1000)))
                if self._copy(block_ms, max_frames, None):
                    stopped_by = "frames"
        finally:
            stop_wall = time.time()
            scripts.ReleaseRecording(switch=self.switch, recording=self._value).run(self.client)
        if stopped_by != "frames":
            # What gateways had buffered when the switch went off.
            drain_until = time.monotonic() + DRAIN_S
            while time.monotonic() < drain_until:
                if self._copy(50, max_frames, stop_wall):
                    break
        if not self.client.exists(self.switch):
            self.client.delete(self.log)  # nobody records the tenant now: free the memory
        self.out.flush()
        self.result.duration_s = time.monotonic() - started
        self.result.stopped_by = stopped_by
        return self.result

    def _copy(self, block_ms: int, max_frames: int | None, until_wall: float | None) -> bool:
        """Copy what the stream has after the last entry read; True once max_frames frames
        are in the trace."""
        answer = self.client.xread({self.log: self._last_id}, count=READ_COUNT, block=block_ms)
        result = self.result
        for _, entries in answer or ():
            for entry_id, fields in entries:
                self._last_id = entry_id.decode()
                try:
                    entry = orjson.loads(fields[b"e"])
                except (KeyError, orjson.JSONDecodeError):
                    continue
                if entry.get("rec") != self.config.id:
                    result.dropped_other += 1
                    continue
                if until_wall is not None and float(entry.get("ts", 0)) > until_wall:
                    continue
                line = trace_line(entry, self._started_wall)
                if line is None:
                    continue
                self._write(line)
                result.connections.add(line["conn"])
                if "frame" in line:
                    result.frames += 1
                    if max_frames is not None and result.frames >= max_frames:
                        self.out.flush()
                        return True
        self.out.flush()
        return False

    def _write(self, line: dict[str, object]) -> None:
        self.out.write(dumps_line(line))
        self.result.lines += 1
