"""The gateway's side of the streams: append client events and read the log (async Redis).

What it appends comes from the gateway's frames and the agents' registry, neither of which
this package imports: a frame or an agent is anything with the attributes below
(`PublishFrame`, `SendFrame`, `RunAgent`), and whether an event starts agents is asked of
streams/subscriptions.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import redis.asyncio as aredis

from project.conf import conf
from streams import keys, replication, scripts
from streams.batches import Batches
from streams.enqueue import (
    PUBLISHED_TRIGGER_TASK,
    RUN_NEXT_TASK,
    RUN_STEP_TASK,
    RUNS_QUEUE,
    celery_message,
    enqueue_step,
    enqueue_step_soon,
    enqueue_ticket,
    enqueue_ticket_soon,
    outbox_entry,
    publish_outbox_entry,
)
from streams.events import cause_of, event_parts, new_event_id, new_run_id
from streams.fairness import join_call, quantum
from streams.redis_clients import as_text
from streams.registry import NEW_TENANT_EPOCH, register_async
from streams.runs import RUN_RECORD_GRACE_S, RunRecord
from streams.subscriptions import subscribed
from streams.tokens import counter_keys
from streams.usage import Budgets, Exhausted, exhausted

logger = logging.getLogger(__name__)

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


def enqueue_first_task_soon(run_id: str) -> None:
    """`enqueue_first_task` from an event loop: handed to the publishing thread, never
    waited for (streams/enqueue.py BackgroundPublisher)."""
    if conf().fair_queue:
        enqueue_ticket_soon()
    else:
        enqueue_step_soon(run_id, 0)


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


class BudgetExhausted(LimitReached):
    """A `send` refused because its tenant's token budget for the day or month is spent
    (streams/usage.py): nothing was written."""

    def __init__(self, exhausted: Exhausted) -> None:
        super().__init__("budget_exhausted", -1)
        self.exhausted = exhausted


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    event_id: str
    duplicate: bool
    run_id: str | None = None
    # accept_send(..., after_ack=True): what is left to do once the ack is sent (the fair
    # ring's join and the first task's publish), for the caller to await then; None: nothing.
    after_ack: Coroutine[Any, Any, None] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class _NewRun:
    """A `send` about to become a run: its message event and what its record holds."""

    tenant: str
    client: str
    frame: SendFrame
    agent: RunAgent
    retention: int
    event_id: str
    run_id: str
    prefix: str  # the message event's, around its seq
    suffix: str
    deadline: float  # epoch seconds

    @classmethod
    def of(
        cls, tenant: str, client: str, frame: SendFrame, agent: RunAgent, retention: int
    ) -> _NewRun:
        event_id = new_event_id()
        run_id = new_run_id(tenant)
        prefix, suffix = event_parts(
            stream=frame.stream,
            event_id=event_id,
            kind="message",
            sender=f"client:{client}",
            cause=cause_of(client, frame.id, frame.prev),
            data={"text": frame.text, "agent": frame.agent},
        )
        deadline = time.time() + agent.deadline_s
        return cls(
            tenant, client, frame, agent, retention, event_id, run_id, prefix, suffix, deadline
        )

    def record(self, agent_config: Mapping[str, str] | None, flow: _FlowControl) -> RunRecord:
        """The run's record (streams/runs.py RunRecord, the one schema of a run's hash)."""
        frame = self.frame
        return RunRecord(
            run=self.run_id,
            tenant=self.tenant,
            stream=frame.stream,
            agent=self.agent.name,
            client=self.client,
            message_id=frame.id,
            message_event=self.event_id,
            text=frame.text,
            options=frame.options,
            deadline=self.deadline,
            retention=self.retention,
            created=time.time(),
            agent_config=dict(agent_config or {}),
            # Where FINALIZE_RUN and CLAIM_STEP uncount a counted run.
            inflight_key=flow.inflight_key if flow.counted else "",
            queued_key=flow.queued_key if flow.counted else "",
        )


@dataclass(frozen=True, slots=True)
class _FlowControl:
    """How ACCEPT_SEND counts a new run against `RunLimits` (-1: not counted)."""

    counted: bool
    inflight_key: str
    queued_key: str
    max_in_flight: int
    max_queued: int
    counted_until: str  # epoch seconds: the run stops counting then, whatever happened

    @classmethod
    def of(cls, tenant: str, deadline: float, limits: RunLimits | None) -> _FlowControl:
        queued_key = keys.runs_queued(tenant)
        if limits is None:
            # Not counted: the in-flight key is any key, the script does not touch it.
            return cls(False, queued_key, queued_key, -1, -1, f"{deadline:.3f}")
        return cls(
            True,
            keys.runs_in_flight(tenant, limits.connection),
            queued_key,
            limits.max_in_flight,
            limits.max_queued,
            f"{deadline + COUNTED_GRACE_S:.3f}",
        )


def _receipt(flag: int, receipt: bytes | str) -> tuple[int, str, bool]:
    text = receipt.decode() if isinstance(receipt, bytes) else receipt
    seq, event_id = text.split(" ")[:2]
    return int(seq), event_id, flag == 0


class _CodedAnswer(Protocol):
    """A write script's answer: `code` 1 written, 0 a repeated id, negative refused."""

    @property
    def code(self) -> int: ...


_Answer = TypeVar("_Answer", bound=_CodedAnswer)


@dataclass(frozen=True, slots=True)
class _Opening:
    tenant: str
    stream: str
    since: int | None
    page: int


class StreamStore:
    def __init__(self, client: aredis.Redis) -> None:
        self.client = client
        self.retention = conf().stream_retention
        self.dedupe_ttl_s = conf().dedupe_ttl_s
        # Atomic enqueue needs the broker to be this Redis; otherwise see accept_send.
        self.enqueue_atomically = conf().broker_in_streams_redis
        # Acks wait for this many replicas (streams/replication.py); 0: the master's word.
        self.replica_acks = conf().replica_acks
        self.replica_ack_timeout_ms = conf().replica_ack_timeout_ms
        # Subscriptions' first reads: a reconnect storm's resumes make them by the thousand.
        self._openings: Batches[_Opening, tuple[int, list[tuple[int, str]]]] = Batches(
            self._read_openings
        )

    async def _write(self, call: scripts.Script[_Answer], dedupe_key: str) -> _Answer:
        """Run a client write's script; with SWITCHBOARD_REPLICA_ACKS, answer only once
        that many replicas hold it, the first write of a repeated id included (raises
        replication.NotReplicated otherwise: not acked, the client retries)."""
        if not self.replica_acks:
            return await call.run_async(self.client)
        answer, confirmed = await replication.run_replicated(
            call, self.client, self.replica_acks, self.replica_ack_timeout_ms
        )
        if answer.code < 0:  # refused: nothing was written, nothing to confirm
            return answer
        if answer.code > 0 and confirmed < self.replica_acks:
            raise replication.NotReplicated(self.replica_acks, confirmed)
        if answer.code == 0:  # a repeat: its first write may have reached no replica yet
            await replication.confirm_replicated(
                self.client,
                dedupe_key,
                self.dedupe_ttl_s,
                self.replica_acks,
                self.replica_ack_timeout_ms,
            )
        return answer

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
        trigger_message = entry = ""
        if subscribed("published", "", frame.stream):
            trigger_args = [tenant, frame.stream, event_id, client, frame.id, frame.data]
            if self.enqueue_atomically:
                _, trigger_message = celery_message(
                    PUBLISHED_TRIGGER_TASK, trigger_args, RUNS_QUEUE
                )
            else:
                # Another broker: the task outbox holds it until it is published.
                entry = outbox_entry(PUBLISHED_TRIGGER_TASK, trigger_args)
        await register_async(self.client, tenant)
        dedupe_key = keys.client_message(tenant, client, frame.id)
        call = scripts.AppendEvent(
            seq_key=keys.stream_seq(tenant, frame.stream),
            log_key=keys.stream_log(tenant, frame.stream),
            dedupe_key=dedupe_key,
            queue_key=keys.celery_queue(RUNS_QUEUE),
            channel=keys.stream_channel(tenant, frame.stream),
            prefix=prefix,
            suffix=suffix,
            maxlen=retention or self.retention,
            dedupe_ttl=self.dedupe_ttl_s,
            event_id=event_id,
            trigger_message=trigger_message,
            task_outbox_key=keys.task_outbox(tenant),
            outbox_entry=entry,
        )
        answer = await self._write(call, dedupe_key)
        appended = Appended(*_receipt(answer.code, answer.value))
        if entry and not appended.duplicate:
            # Published after the append; a crash in between, or a broker that is down
            # (logged), leaves it in the outbox, and the sweep publishes it.
            try:
                await asyncio.to_thread(publish_outbox_entry, entry)
            except Exception:
                logger.warning("publish failed; left in the task outbox", exc_info=True)
            else:
                await self.client.zrem(keys.task_outbox(tenant), entry)
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
        budgets: Budgets | None = None,
        after_ack: bool = False,
    ) -> Appended:
        """Append the message and create its run with its first task, all or nothing.
        Raises LimitReached, having written nothing, when `limits` refuse the run, and
        BudgetExhausted when the tenant has spent its token `budgets` for the period.
        `weight` is the tenant's share in the fair queue (TenantConfig.weight; default 1).
        `agent_config` is the tenant's overrides of the agent's code (model, api_key_env,
        base_url: TenantConfig.agent_overrides), kept with the run for its workers.
        `after_ack`: leave the calls that follow the script (the ring's join, a publish to
        another broker) to the returned `after_ack`, which the gateway awaits once its ack
        is out, so the client's own message event never overtakes the ack."""
        run = _NewRun.of(tenant, client, frame, agent, retention or self.retention)
        flow = _FlowControl.of(tenant, run.deadline, limits)
        message = first_task_message(run.run_id) if self.enqueue_atomically else ""
        now = datetime.now(UTC)
        budgets = budgets or Budgets()
        call = self._accept_send_call(
            run, flow, message, weight if weight is not None else 1, agent_config, budgets, now
        )
        # Registered before its first keys are written, so the sweepers always find them.
        await register_async(self.client, tenant)
        answer = await self._write(call, call.dedupe_key)
        if answer.code == -3:
            raise BudgetExhausted(exhausted(answer.value, budgets, now))
        if answer.code < 0:
            code = "rate_limited" if answer.code == -1 else "overloaded"
            raise LimitReached(code, int(answer.value))
        seq, event_id, duplicate = _receipt(answer.code, answer.value)
        follow = self._after_script(tenant, run.run_id, answer.ring_epoch, message, duplicate)
        if follow is not None and not after_ack:
            await follow
            follow = None
        run_id = None if duplicate else run.run_id
        return Appended(seq, event_id, duplicate, run_id=run_id, after_ack=follow)

    def _after_script(
        self, tenant: str, run_id: str, ring_epoch: int, message: str, duplicate: bool
    ) -> Coroutine[Any, Any, None] | None:
        """What follows ACCEPT_SEND's script, if anything: the ring's join when the run made
        its tenant's queue non-empty, then the first task's publish to another broker."""
        if not ring_epoch and (duplicate or message):
            return None
        return self._follow(tenant, run_id, ring_epoch, message, duplicate)

    async def _follow(
        self, tenant: str, run_id: str, ring_epoch: int, message: str, duplicate: bool
    ) -> None:
        try:
            await self._join_and_publish(tenant, run_id, ring_epoch, message, duplicate)
        except Exception:
            # The send is accepted and acknowledged: what failed here the sweep repairs
            # (the ring, the ticket or a wake-up), so it is logged, not raised.
            logger.warning(
                "after an accepted send, the ring's join or the publish failed; the sweep "
                "repairs it tenant=%s run=%s",
                tenant,
                run_id,
                exc_info=True,
            )

    async def _join_and_publish(
        self, tenant: str, run_id: str, ring_epoch: int, message: str, duplicate: bool
    ) -> None:
        if ring_epoch:
            # The tenant's queue was empty: the ring (its own slot) learns of it, and the
            # ticket goes with that call. A crash before it leaves the run queued outside
            # the ring and without its ticket; the sweep repairs both (fairness.py).
            if ring_epoch == NEW_TENANT_EPOCH:
                await register_async(self.client, tenant, again=True)
            await join_call(tenant, ring_epoch, message).run_async(self.client)
        if not duplicate and not message:
            # Another broker: Redis is the outbox and the message only a wake-up, handed to
            # the publishing thread after the join (a ticket taken before the ring has its
            # tenant would find nothing); the ack does not wait for the broker. A crash or a
            # failed publish leaves the run queued; the sweep publishes a wake-up for it.
            enqueue_first_task_soon(run_id)

    def _accept_send_call(
        self,
        run: _NewRun,
        flow: _FlowControl,
        message: str,
        weight: int,
        agent_config: Mapping[str, str] | None,
        budgets: Budgets,
        now: datetime,
    ) -> scripts.AcceptSend:
        """ACCEPT_SEND for the new run: its message event, record, bounds and fair queue,
        and the tenant's token budgets against its counters of `now`'s UTC day and month
        (the keys are named even without budgets: a script's keys are fixed)."""
        tenant, stream = run.tenant, run.frame.stream
        record = run.record(agent_config, flow)
        tokens_day_key, tokens_month_key = counter_keys(tenant, now)
        return scripts.AcceptSend(
            seq_key=keys.stream_seq(tenant, stream),
            log_key=keys.stream_log(tenant, stream),
            dedupe_key=keys.client_message(tenant, run.client, run.frame.id),
            run_key=keys.run(run.run_id),
            deadlines_key=keys.run_deadlines(tenant),
            queue_key=keys.celery_queue(RUNS_QUEUE),
            inflight_key=flow.inflight_key,
            queued_key=flow.queued_key,
            fair_queue_key=keys.fair_queue(tenant),
            fair_state_key=keys.fair_state(tenant),
            tokens_day_key=tokens_day_key,
            tokens_month_key=tokens_month_key,
            channel=keys.stream_channel(tenant, stream),
            prefix=run.prefix,
            suffix=run.suffix,
            maxlen=run.retention,
            dedupe_ttl=self.dedupe_ttl_s,
            event_id=run.event_id,
            run_id=run.run_id,
            deadline=f"{run.deadline:.3f}",
            run_ttl=int(run.agent.deadline_s + RUN_RECORD_GRACE_S),
            celery_message=message,
            max_in_flight=flow.max_in_flight,
            max_queued=flow.max_queued,
            counted_until=flow.counted_until,
            fair_tenant=tenant if conf().fair_queue else "",
            fair_weight=quantum(weight),
            daily_budget=budgets.daily,
            monthly_budget=budgets.monthly,
            run_fields=record.fields(),
        )

    async def head(self, tenant: str, stream: str) -> int:
        value = await self.client.get(keys.stream_seq(tenant, stream))
        return int(value) if value else 0

    async def head_and_read(
        self, tenant: str, stream: str, since: int | None, page: int
    ) -> tuple[int, list[tuple[int, str]]]:
        """The stream's head and, after `since` (None: nothing), the events with since <
        seq <= min(head, since + page) that the log still holds, in order: a subscription's
        first read. The reads that arrive together share one pipeline (a GET and an XRANGE
        each, the GET first, so the range holds everything up to the head it reports)."""
        return await self._openings.submit(_Opening(tenant, stream, since, page))

    async def _read_openings(
        self, openings: Sequence[_Opening]
    ) -> list[tuple[int, list[tuple[int, str]]] | BaseException]:
        async with self.client.pipeline(transaction=False) as pipe:
            for opening in openings:
                pipe.get(keys.stream_seq(opening.tenant, opening.stream))
                if opening.since is not None:
                    log = keys.stream_log(opening.tenant, opening.stream)
                    pipe.xrange(log, min=f"{opening.since + 1}-0", count=opening.page)
            answers = await pipe.execute(raise_on_error=False)
        results: list[tuple[int, list[tuple[int, str]]] | BaseException] = []
        at = 0
        for opening in openings:
            count = 1 if opening.since is None else 2
            part, at = answers[at : at + count], at + count
            failed = next((a for a in part if isinstance(a, BaseException)), None)
            if failed is not None:
                results.append(failed)
                continue
            head = int(part[0]) if part[0] else 0
            events: list[tuple[int, str]] = []
            if opening.since is not None:
                last = min(head, opening.since + opening.page)
                for entry_id, fields in part[1]:
                    seq = _entry_seq(as_text(entry_id))
                    if seq > last:  # appended after the GET: the live path brings it
                        break
                    events.append((seq, as_text(fields[b"e"])))
            results.append((head, events))
        return results

    async def heads(self, tenant: str, streams: list[str]) -> dict[str, int]:
        """Several streams' heads in one round trip."""
        if not streams:
            return {}
        values = await self.client.mget([keys.stream_seq(tenant, s) for s in streams])
        return {s: int(v) if v else 0 for s, v in zip(streams, values, strict=True)}

    async def first_retained(self, tenant: str, stream: str) -> int | None:
        entries = await self.client.xrange(keys.stream_log(tenant, stream), count=1)
        return _entry_seq(as_text(entries[0][0])) if entries else None

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
                # Only XREADGROUP/XCLAIM of trimmed entries answer no fields; XRANGE cannot.
                assert fields is not None
                events.append((_entry_seq(as_text(entry_id)), as_text(fields[b"e"])))
            first = events[-1][0] + 1
        return events

    async def read_last(self, tenant: str, stream: str, count: int) -> list[tuple[int, str]]:
        """The stream's last `count` retained events, newest first."""
        entries = await self.client.xrevrange(keys.stream_log(tenant, stream), count=count)
        events: list[tuple[int, str]] = []
        for entry_id, fields in entries or []:
            assert fields is not None  # as in read(): XRANGE entries always have fields
            events.append((_entry_seq(as_text(entry_id)), as_text(fields[b"e"])))
        return events

    async def message_seqs(self, run_ids: list[str]) -> dict[str, int]:
        """The seq of the message event each run answers, for the runs whose record says."""
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(keys.run(run_id), "message_seq")
            values = await pipe.execute()
        return {run: int(v) for run, v in zip(run_ids, values, strict=True) if v}


def _entry_seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])
