"""Run state in Redis and the fenced appends a run's owner makes (sync: Celery workers).

A run's hash holds its step, owner, attempt, deadline and how many characters its reply
has emitted. Only the current owner may append, and only at the current offset, so a
retried or redelivered step can never duplicate or reorder a delta, and only one
`reply.done` can ever be written.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from django.conf import settings

from realtime import keys, scripts
from realtime.events import (
    cause_of,
    event_parts,
    json_fragment,
    new_event_id,
    text_from_fragments,
    utc_now_iso,
)

logger = logging.getLogger(__name__)

FINISHED_RUN_TTL_S = 3600


class Fenced(Exception):
    """Another attempt owns the run now; this one must stop without writing."""


class RunFinished(Exception):
    """The run already has its terminal event."""


@dataclass(slots=True)
class Run:
    run_id: str
    tenant: str
    stream: str
    agent: str
    client: str
    message_id: str
    message_event: str
    text: str
    options: dict[str, Any]
    deadline: float  # epoch seconds
    retention: int  # the tenant's stream retention when the message was accepted
    attempt: int
    emitted: int
    step_base: int  # what the reply held when the current step started
    owner: str

    @classmethod
    def from_hash(cls, run_id: str, fields: dict[str, str]) -> Run:
        return cls(
            run_id=run_id,
            tenant=fields["tenant"],
            stream=fields["stream"],
            agent=fields["agent"],
            client=fields["client"],
            message_id=fields["message_id"],
            message_event=fields["message_event"],
            text=fields["text"],
            options=orjson.loads(fields.get("options") or "{}"),
            deadline=float(fields["deadline"]),
            retention=int(fields.get("retention") or settings.SWITCHBOARD["STREAM_RETENTION"]),
            attempt=int(fields.get("attempt", 0)),
            emitted=int(fields.get("emitted", 0)),
            step_base=int(fields.get("step_base", 0)),
            owner=fields.get("owner", ""),
        )

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def cause(self) -> dict[str, Any]:
        return cause_of(self.client, self.message_id, self.message_event)


class RunStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(scripts.CLAIM_STEP)
        self._append_delta = client.register_script(scripts.APPEND_DELTA)
        self._finalize = client.register_script(scripts.FINALIZE_RUN)

    def load(self, run_id: str) -> Run | None:
        raw = self.client.hgetall(keys.run(run_id))
        if not raw or b"tenant" not in raw:
            return None
        return Run.from_hash(run_id, {k.decode(): v.decode() for k, v in raw.items()})

    def claim(self, run_id: str, step: int) -> Run | None:
        """Become the run's owner for this step; None when the run is gone or finished."""
        owner = uuid.uuid4().hex
        flat = self._claim(keys=[keys.run(run_id)], args=[owner, step, FINISHED_RUN_TTL_S * 24])
        if not flat:
            return None
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return Run.from_hash(run_id, fields)

    def append_delta(self, run: Run, piece: str) -> int:
        """Append one reply piece at the run's current offset; returns its seq."""
        event_id = new_event_id()
        prefix, suffix = event_parts(
            stream=run.stream,
            event_id=event_id,
            kind="reply.delta",
            sender=f"agent:{run.agent}",
            cause=run.cause(),
            data={"run": run.run_id, "offset": run.emitted, "text": piece},
        )
        code, value = self._append_delta(
            keys=[
                keys.stream_seq(run.tenant, run.stream),
                keys.stream_log(run.tenant, run.stream),
                keys.run(run.run_id),
                keys.run_text(run.run_id),
            ],
            args=[
                keys.stream_channel(run.tenant, run.stream),
                prefix,
                suffix,
                run.retention,
                run.owner,
                run.emitted,
                len(piece),
                json_fragment(piece),
            ],
        )
        if code == 1:
            run.emitted += len(piece)
            return int(value)
        if code == -1:
            raise RunFinished(run.run_id)
        if code == -2:
            raise Fenced(run.run_id)
        # -3: our idea of the offset is stale; only a fenced attempt can get here.
        raise Fenced(f"{run.run_id}: offset {run.emitted}, store has {value!r}")

    def finalize(
        self,
        run_id: str,
        status: str,
        detail: Any = None,
        owner: str = "",
        run: Run | None = None,
    ) -> bool:
        """Write the run's one reply.done. Returns False when it already had one.

        `owner` fences a worker's attempt; the sweeper passes "" to end any run. A caller
        that holds the claimed `run` passes it and saves a round trip.
        """
        if run is None:
            run = self.load(run_id)
            if run is None:
                self.client.zrem(keys.RUN_DEADLINES, run_id)
                return False
        tenant, stream = run.tenant, run.stream
        event_id = new_event_id()
        prefix, suffix = event_parts(
            stream=stream,
            event_id=event_id,
            kind="reply.done",
            sender=f"agent:{run.agent}",
            cause=run.cause(),
            data={"run": run_id, "status": status, "detail": detail},
            ts=utc_now_iso(),
        )
        # Split the data object so the stored text can be spliced in before "detail".
        data_at = suffix.index(',"data":') + len(',"data":')
        detail_at = suffix.index(',"detail":', data_at)
        text_prefix = suffix[:detail_at] + ',"text":'
        code, value = self._finalize(
            keys=[
                keys.stream_seq(tenant, stream),
                keys.stream_log(tenant, stream),
                keys.run(run_id),
                keys.run_text(run_id),
                keys.RUN_DEADLINES,
            ],
            args=[
                keys.stream_channel(tenant, stream),
                prefix,
                text_prefix,
                suffix[detail_at:],
                run.retention,
                owner,
                status,
                run_id,
                FINISHED_RUN_TTL_S,
            ],
        )
        if code == -2:
            raise Fenced(run_id)
        if code == 1:
            logger.info(
                "run finished tenant=%s stream=%s run=%s status=%s seq=%s",
                tenant,
                stream,
                run_id,
                status,
                value,
            )
        return code == 1

    def text_of(self, run_id: str) -> str:
        raw = self.client.get(keys.run_text(run_id))
        return text_from_fragments(raw.decode()) if raw else ""

    def overdue(self, now: float, limit: int = 500) -> list[str]:
        ids = self.client.zrangebyscore(keys.RUN_DEADLINES, "-inf", now, start=0, num=limit)
        return [run_id.decode() for run_id in ids]
