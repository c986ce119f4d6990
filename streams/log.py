"""The gateway's side of the streams: append client events and read the log (async Redis).

What it appends comes from the gateway's frames and the agents' registry, neither of which
this package imports: a frame or an agent is anything with the attributes below
(`PublishFrame`, `SendFrame`, `RunAgent`), and whether an event starts agents is asked of
streams/subscriptions.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aredis

from project.conf import conf
from streams import keys, scripts
from streams.enqueue import (
    PUBLISHED_TRIGGER_TASK,
    RUN_NEXT_TASK,
    RUN_STEP_TASK,
    RUNS_QUEUE,
    celery_message,
    enqueue_published_trigger,
    enqueue_step,
    enqueue_ticket,
)
from streams.events import cause_of, event_parts, new_event_id, new_run_id
from streams.fairness import quantum
from streams.runs import RUN_RECORD_GRACE_S, RunRecord
from streams.subscriptions import subscribed

READ_PAGE = 500


class PublishFrame(Protocol):
    """A client's `publish` (realtime.protocol.Publish)."""

    @property
    def id(self) -> str: ...
    @property
    def stream(self) -> str: ...
    @property
    def data(self) -> Any: ...


class SendFrame(Protocol):
    """A client's `send` (realtime.protocol.Send)."""

    @property
    def id(self) -> str: ...
    @property
    def stream(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def options(self) -> dict[str, Any]: ...
    @property
    def prev(self) -> str | None: ...


class RunAgent(Protocol):
    """The agent a `send` names (agents.Agent): what its run record needs of it."""

    @property
    def name(self) -> str: ...
    @property
    def deadline_s(self) -> float: ...


def first_task_message(run_id: str) -> str:
    """The Celery message that starts a new run, for the script creating the run to push:
    a fair-queue ticket (the worker that takes it runs whichever queued run is fairly
    next) or, with SWITCHBOARD_FAIR_QUEUE off, the run's own first step."""
    if conf().fair_queue:
        return celery_message(RUN_NEXT_TASK, [], RUNS_QUEUE)[1]
    return celery_message(RUN_STEP_TASK, [run_id, 0], RUNS_QUEUE)[1]


def enqueue_first_task(run_id: str) -> None:
    """The same through Celery itself, when its broker is not the streams' Redis."""
    if conf().fair_queue:
        enqueue_ticket()
    else:
        enqueue_step(run_id, 0)


# A counted run stops counting this long after its deadline even without its reply.done
# (only a run whose record was lost can get there: the deadline sweep finishes the rest).
COUNTED_GRACE_S = 60


@dataclass(frozen=True, slots=True)
class RunLimits:
    """The bounds a `send` is accepted under (ACCEPT_SEND checks and counts them)."""

    connection: str  # unique across gateways: names the connection's runs-in-flight set
    max_in_flight: int  # unfinished runs of the connection
    max_queued: int  # runs of the tenant not yet claimed by a worker


class LimitReached(Exception):
    """A `send` refused by a bound: nothing was written."""

    def __init__(self, code: str, wait_ms: int) -> None:
        super().__init__(code)
        self.code = code  # rate_limited (runs in flight) or overloaded (queued runs)
        self.wait_ms = wait_ms  # until the earliest counted run's deadline; -1: bound is 0


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
        self.retention = conf().stream_retention
        self.dedupe_ttl_s = conf().dedupe_ttl_s
        # Atomic enqueue needs the broker to be this Redis; otherwise see accept_send.
        self.enqueue_atomically = conf().broker_in_streams_redis

    async def publish(
        self, tenant: str, client: str, frame: PublishFrame, retention: int | None = None
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
        # Agents subscribed to published events on this stream: their trigger goes in with
        # the event (a registry lookup, no Redis, when none subscribes).
        trigger_args: list[Any] | None = None
        trigger_message = ""
        if subscribed("published", "", frame.stream):
            trigger_args = [tenant, frame.stream, event_id, client, frame.id, frame.data]
            if self.enqueue_atomically:
                _, trigger_message = celery_message(
                    PUBLISHED_TRIGGER_TASK, trigger_args, RUNS_QUEUE
                )
        flag, receipt = await self._append_event(
            keys=[
                keys.stream_seq(tenant, frame.stream),
                keys.stream_log(tenant, frame.stream),
                keys.client_message(tenant, client, frame.id),
                keys.celery_queue(RUNS_QUEUE),
            ],
            args=[
                keys.stream_channel(tenant, frame.stream),
                prefix,
                suffix,
                retention or self.retention,
                self.dedupe_ttl_s,
                event_id,
                trigger_message,
            ],
        )
        appended = Appended(*_receipt(flag, receipt))
        if trigger_args is not None and not trigger_message and not appended.duplicate:
            # Another broker: published after the append; a crash in between loses the
            # trigger (documented), never the event.
            await asyncio.to_thread(enqueue_published_trigger, trigger_args)
        return appended

    async def accept_send(
        self,
        tenant: str,
        client: str,
        frame: SendFrame,
        agent: RunAgent,
        retention: int | None = None,
        limits: RunLimits | None = None,
        weight: int | None = None,
        agent_config: Mapping[str, str] | None = None,
    ) -> Appended:
        """Append the message and create its run with its first task, all or nothing.
        Raises LimitReached, having written nothing, when `limits` refuse the run.
        `weight` is the tenant's share in the fair queue (TenantConfig.weight; default 1).
        `agent_config` is the tenant's overrides of the agent's code (model, api_key_env,
        base_url: TenantConfig.agent_overrides), kept with the run for its workers."""
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
        fair = conf().fair_queue
        message = first_task_message(run_id) if self.enqueue_atomically else ""
        queued_key = keys.runs_queued(tenant)
        if limits is None:
            in_flight_key = queued_key  # not counted: -1 below
            counting: list[Any] = [-1, -1, f"{deadline:.3f}"]
        else:
            in_flight_key = keys.runs_in_flight(tenant, limits.connection)
            counting = [
                limits.max_in_flight,
                limits.max_queued,
                f"{deadline + COUNTED_GRACE_S:.3f}",
            ]
        record = RunRecord(
            run=run_id,
            tenant=tenant,
            stream=frame.stream,
            agent=agent.name,
            client=client,
            message_id=frame.id,
            message_event=event_id,
            text=frame.text,
            options=frame.options,
            deadline=deadline,
            retention=retention or self.retention,
            created=time.time(),
            agent_config=dict(agent_config or {}),
            # Where FINALIZE_RUN and CLAIM_STEP uncount a counted run.
            inflight_key=in_flight_key if limits is not None else "",
            queued_key=queued_key if limits is not None else "",
        )
        flag, receipt = await self._accept_send(
            keys=[
                keys.stream_seq(tenant, frame.stream),
                keys.stream_log(tenant, frame.stream),
                keys.client_message(tenant, client, frame.id),
                keys.run(run_id),
                keys.RUN_DEADLINES,
                keys.celery_queue(RUNS_QUEUE),
                in_flight_key,
                queued_key,
                keys.fair_queue(tenant),
                keys.FAIR_RING,
                keys.FAIR_WEIGHTS,
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
                *counting,
                tenant if fair else "",
                quantum(weight if weight is not None else 1),
                *record.fields(),
            ],
        )
        if flag < 0:
            raise LimitReached("rate_limited" if flag == -1 else "overloaded", int(receipt))
        seq, event_id, duplicate = _receipt(flag, receipt)
        if not duplicate and not message:
            # Another broker: publish after the append. A crash in between leaves the run
            # queued; the sweeper ends it at its deadline, so it still gets its reply.done.
            await asyncio.to_thread(enqueue_first_task, run_id)
        return Appended(seq, event_id, duplicate, run_id=None if duplicate else run_id)

    async def head(self, tenant: str, stream: str) -> int:
        value = await self.client.get(keys.stream_seq(tenant, stream))
        return int(value) if value else 0

    async def heads(self, tenant: str, streams: list[str]) -> dict[str, int]:
        """Several streams' heads in one round trip."""
        if not streams:
            return {}
        values = await self.client.mget([keys.stream_seq(tenant, s) for s in streams])
        return {s: int(v) if v else 0 for s, v in zip(streams, values, strict=True)}

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
