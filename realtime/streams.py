"""The gateway's side of the streams: append client events and read the log (async Redis)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from django.conf import settings

from orchestration.agents import Agent
from orchestration.enqueue import broker_is_redis_at, celery_message, enqueue_step
from realtime import keys, scripts
from realtime.events import cause_of, dumps, event_parts, new_event_id, new_run_id
from realtime.protocol import Publish, Send

RUN_STEP_TASK = "switchboard.run.step"
RUNS_QUEUE = "switchboard.runs"
# The run record outlives its deadline long enough for a late step to find it finished.
RUN_RECORD_GRACE_S = 3600
READ_PAGE = 500


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    event_id: str
    duplicate: bool
    run_id: str | None = None


def _receipt(flag: int, receipt: bytes | str) -> tuple[int, str, bool]:
    text = receipt.decode() if isinstance(receipt, bytes) else receipt
    seq, event_id = text.split(" ")[:2]
    return int(seq), event_id, flag == 0


class StreamStore:
    def __init__(self, client: aredis.Redis) -> None:
        self.client = client
        self._append_event = client.register_script(scripts.APPEND_EVENT)
        self._accept_send = client.register_script(scripts.ACCEPT_SEND)
        self.retention = settings.SWITCHBOARD["STREAM_RETENTION"]
        self.dedupe_ttl_s = settings.SWITCHBOARD["DEDUPE_TTL_S"]
        # Atomic enqueue needs the broker to be this Redis; otherwise see accept_send.
        self.enqueue_atomically = broker_is_redis_at(settings.CELERY_BROKER_URL, settings.REDIS_URL)

    async def publish(
        self, tenant: str, client: str, frame: Publish, retention: int | None = None
    ) -> Appended:
        event_id = new_event_id()
        prefix, suffix = event_parts(
            stream=frame.stream,
            event_id=event_id,
            kind="published",
            sender=f"client:{client}",
            cause=cause_of(client, frame.id, None),
            data=frame.data,
        )
        flag, receipt = await self._append_event(
            keys=[
                keys.stream_seq(tenant, frame.stream),
                keys.stream_log(tenant, frame.stream),
                keys.client_message(tenant, client, frame.id),
            ],
            args=[
                keys.stream_channel(tenant, frame.stream),
                prefix,
                suffix,
                retention or self.retention,
                self.dedupe_ttl_s,
                event_id,
            ],
        )
        return Appended(*_receipt(flag, receipt))

    async def accept_send(
        self,
        tenant: str,
        client: str,
        frame: Send,
        agent: Agent,
        retention: int | None = None,
    ) -> Appended:
        """Append the message and create its run with its first task, all or nothing."""
        event_id = new_event_id()
        run_id = new_run_id()
        prefix, suffix = event_parts(
            stream=frame.stream,
            event_id=event_id,
            kind="message",
            sender=f"client:{client}",
            cause=cause_of(client, frame.id, frame.prev),
            data={"text": frame.text, "agent": frame.agent},
        )
        deadline = time.time() + agent.deadline_s
        if self.enqueue_atomically:
            _, message = celery_message(RUN_STEP_TASK, [run_id, 0], RUNS_QUEUE)
        else:
            message = ""
        run_fields: dict[str, Any] = {
            "run": run_id,
            "tenant": tenant,
            "stream": frame.stream,
            "agent": agent.name,
            "client": client,
            "message_id": frame.id,
            "message_event": event_id,
            "text": frame.text,
            "options": dumps(frame.options),
            "deadline": f"{deadline:.3f}",
            "retention": retention or self.retention,
            "created": f"{time.time():.3f}",
        }
        flat: list[Any] = []
        for name, value in run_fields.items():
            flat += [name, value]
        flag, receipt = await self._accept_send(
            keys=[
                keys.stream_seq(tenant, frame.stream),
                keys.stream_log(tenant, frame.stream),
                keys.client_message(tenant, client, frame.id),
                keys.run(run_id),
                keys.RUN_DEADLINES,
                keys.celery_queue(RUNS_QUEUE),
            ],
            args=[
                keys.stream_channel(tenant, frame.stream),
                prefix,
                suffix,
                retention or self.retention,
                self.dedupe_ttl_s,
                event_id,
                run_id,
                f"{deadline:.3f}",
                int(agent.deadline_s + RUN_RECORD_GRACE_S),
                message,
                *flat,
            ],
        )
        seq, event_id, duplicate = _receipt(flag, receipt)
        if not duplicate and not message:
            # Another broker: publish after the append. A crash in between leaves the run
            # queued; the sweeper ends it at its deadline, so it still gets its reply.done.
            await asyncio.to_thread(enqueue_step, run_id, 0)
        return Appended(seq, event_id, duplicate, run_id=None if duplicate else run_id)

    async def head(self, tenant: str, stream: str) -> int:
        value = await self.client.get(keys.stream_seq(tenant, stream))
        return int(value) if value else 0

    async def first_retained(self, tenant: str, stream: str) -> int | None:
        entries = await self.client.xrange(keys.stream_log(tenant, stream), count=1)
        return _entry_seq(entries[0][0]) if entries else None

    async def read(self, tenant: str, stream: str, first: int, last: int) -> list[tuple[int, str]]:
        """Events with first <= seq <= last that the log still holds, in order."""
        events: list[tuple[int, str]] = []
        log = keys.stream_log(tenant, stream)
        while first <= last:
            count = min(READ_PAGE, last - first + 1)
            entries = await self.client.xrange(log, min=f"{first}-0", max=f"{last}-0", count=count)
            if not entries:
                break
            for entry_id, fields in entries:
                events.append((_entry_seq(entry_id), fields[b"e"].decode()))
            first = events[-1][0] + 1
        return events


def _entry_seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])
