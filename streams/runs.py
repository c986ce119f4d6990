"""Run state in Redis and the fenced appends a run's owner makes.

A run's hash holds its step, owner, attempt, deadline, lease and how many characters its
reply has emitted. Only the current owner may append, and only at the current offset, so a
retried or redelivered step can never duplicate or reorder a delta, and only one
`reply.done` can ever be written.

A claimed step holds a lease (`RUN_LEASE_S`) that its worker renews with every append and,
while the model is silent, in one pipeline for all the steps the worker holds
(orchestration/inflight.py). A lease that runs out means the worker died: the sweeper
redelivers the step (`redeliver`) long before kombu would restore the dead worker's message
(its visibility timeout), and the new attempt fences the old one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
import redis.asyncio as aredis
from redis.cluster import RedisCluster

from project.conf import conf
from streams import keys, scripts
from streams.buckets import AsyncBuckets
from streams.enqueue import (
    RUN_STEP_TASK,
    RUNS_QUEUE,
    TRIGGER_TASK,
    celery_message,
    enqueue_step,
    outbox_entry,
    publish_outbox_entry,
)
from streams.events import (
    cause_of,
    dumps,
    event_parts,
    json_fragment,
    new_event_id,
    text_from_fragments,
    utc_now_iso,
)
from streams.records import model_of, outbox_head, problem_entry, reason_of
from streams.redis_clients import as_text
from streams.subscriptions import subscribed
from streams.tokens import add_usage_call
from streams.usage import Usage, usage_of

logger = logging.getLogger(__name__)


def worker_id() -> str:
    """This process as a run's holder: the run hash's `worker`, and the name of the channel
    on which it hears that a run it holds was ended by someone else (after a fork, too)."""
    return f"{socket.gethostname()}:{os.getpid()}"


# The run record outlives its deadline long enough for a late step to find it finished.
RUN_RECORD_GRACE_S = 3600
FINISHED_RUN_TTL_S = 3600
# Leases one RENEW_LEASES call renews at most: about a millisecond of Redis time.
RENEW_LEASE_BATCH = 500
# Run hash fields `out.0`, `out.1`, ...: each finished step's output, for the steps after it.
OUTPUT_FIELD = "out."
# Lost leases a run survives. A step that keeps killing its worker (a prompt that runs it
# out of memory, say) is ended with `failed` rather than handed to worker after worker.
MAX_REDELIVERIES = 3
# Failed and degraded runs kept for the admin's live queue page: a look, not an archive.
RECENT_PROBLEMS_MAX = 200


class Fenced(Exception):
    """Another attempt owns the run now; this one must stop without writing."""


class StaleOffset(Fenced):
    """The reply's offset in the store is not where this attempt thought it was: another
    attempt moved it, or this attempt's own last append went through unanswered."""

    def __init__(self, run_id: str, expected: int, stored: int) -> None:
        super().__init__(f"{run_id}: offset {expected}, store has {stored}")
        self.stored = stored


class RunFinished(Exception):
    """The run already has its terminal event."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run's hash as it is created, by a client's `send` (streams/log.py, ACCEPT_SEND) or
    by a subscription (orchestration/triggers.py, START_TRIGGERED_RUN): the one schema both
    writers fill, which `Run.from_hash` reads back and the run scripts update."""

    run: str
    tenant: str
    stream: str
    agent: str
    client: str
    message_id: str
    message_event: str  # the event the run answers: the client's message, or the trigger's
    text: str
    options: dict[str, Any]
    deadline: float  # epoch seconds
    retention: int  # the tenant's stream retention when the run was accepted
    created: float  # epoch seconds
    # The tenant's overrides for this agent (model, api_key_env, base_url).
    agent_config: dict[str, str] = field(default_factory=dict)
    # A run started by a subscription: its causal depth, the events from the client's
    # message to the one that started it, and the trigger (None: a client's send).
    depth: int = 0
    chain: list[str] = field(default_factory=list)
    trigger: dict[str, Any] | None = None
    # Where FINALIZE_RUN and CLAIM_STEP uncount a run that counts against limits.
    inflight_key: str = ""
    queued_key: str = ""

    def fields(self) -> list[Any]:
        """The hash's fields as the scripts take them: name, value, name, value, ..."""
        named: dict[str, Any] = {
            "run": self.run,
            "tenant": self.tenant,
            "stream": self.stream,
            "agent": self.agent,
            "client": self.client,
            "message_id": self.message_id,
            "message_event": self.message_event,
            "text": self.text,
            "options": dumps(self.options),
            "deadline": f"{self.deadline:.3f}",
            "retention": self.retention,
            "created": f"{self.created:.3f}",
        }
        if self.trigger is not None:
            named["depth"] = self.depth
            named["chain"] = dumps(self.chain)
            named["trigger"] = dumps(self.trigger)
        if self.agent_config:
            named["agent_cfg"] = dumps(dict(self.agent_config))  # orjson takes dicts only
        if self.inflight_key:
            named["inflight_key"] = self.inflight_key
            named["queued_key"] = self.queued_key
        flat: list[Any] = []
        for name, value in named.items():
            flat += [name, value]
        return flat


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
    step: int = 0
    redeliveries: int = 0
    # time.monotonic() of this owner's last lease renewal (claim, append or heartbeat).
    renewed_at: float = 0.0
    # Runs started by a subscription (orchestration/triggers.py): how many runs led here
    # from a client's message, and the events along the way (that message first).
    depth: int = 0
    chain: list[str] = field(default_factory=list)
    trigger: dict[str, Any] | None = None
    # The tenant's overrides for this agent (model, api_key_env, base_url), as accepted.
    agent_config: dict[str, str] = field(default_factory=dict)
    # Earlier steps' outputs by index, and the step that gave its fallback and went on.
    outputs: dict[int, str] = field(default_factory=dict)
    fell_back: str = ""
    # Tool events (tool.call, tool.result) the run has appended; the step that appended
    # the last ones, until a reply.restart voided them (-1: none stand); the names of the
    # tools that ran, in order of first use (reply.done's detail.tools).
    tool_events: int = 0
    tool_step: int = -1
    tools_ran: list[str] = field(default_factory=list)
    # Tokens the run's model calls used so far, every step's (ADD_USAGE); None: no call yet.
    usage: Usage | None = None

    @classmethod
    def from_hash(cls, run_id: str, fields: dict[str, str]) -> Run:
        """A claimed run from its hash: RunRecord's fields and what the scripts added."""
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
            retention=int(fields.get("retention") or conf().stream_retention),
            attempt=int(fields.get("attempt", 0)),
            emitted=int(fields.get("emitted", 0)),
            step_base=int(fields.get("step_base", 0)),
            owner=fields.get("owner", ""),
            step=int(fields.get("step") or 0),
            redeliveries=int(fields.get("redeliveries") or 0),
            depth=int(fields.get("depth") or 0),
            chain=orjson.loads(fields["chain"]) if fields.get("chain") else [],
            trigger=orjson.loads(fields["trigger"]) if fields.get("trigger") else None,
            agent_config=orjson.loads(fields["agent_cfg"]) if fields.get("agent_cfg") else {},
            outputs={
                int(name[len(OUTPUT_FIELD) :]): value
                for name, value in fields.items()
                if name.startswith(OUTPUT_FIELD)
            },
            fell_back=fields.get("fell_back", ""),
            tool_events=int(fields.get("tool_events") or 0),
            tool_step=int(fields["tool_step"]) if fields.get("tool_step") else -1,
            tools_ran=orjson.loads(fields["tools_ran"]) if fields.get("tools_ran") else [],
            usage=usage_of(fields),
        )

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def cause(self) -> dict[str, Any]:
        cause = cause_of(self.client, self.message_id, self.message_event)
        if self.depth:
            # A triggered run: `prev` is the event that started it, `chain` every event from
            # the client's message to that one.
            cause["depth"] = self.depth
            cause["chain"] = self.chain
        return cause

    def reply_event(
        self, kind: str, data: dict[str, Any], event_id: str = "", ts: str | None = None
    ) -> tuple[str, str]:
        """(prefix, suffix) of one of this run's reply events (`event_parts`): sent by its
        agent, caused by what caused the run."""
        return event_parts(
            stream=self.stream,
            event_id=event_id or new_event_id(),
            kind=kind,
            sender=f"agent:{self.agent}",
            cause=self.cause(),
            data=data,
            ts=ts,
        )

    def events_so_far(self) -> list[str]:
        """The chain a run started by this run's events carries before its own trigger."""
        return self.chain if self.chain else [self.message_event]


@dataclass(frozen=True, slots=True)
class Redelivery:
    """What redeliver did: `redelivered`, `exhausted` (the caller ends the run) or `skipped`
    (renewed meanwhile, finished, past its deadline, or another sweeper was first)."""

    outcome: str
    run_id: str
    tenant: str = ""
    step: int = 0
    redeliveries: int = 0


class _RunStoreBase:
    """What both stores hold: their client and the lease their claims take."""

    def __init__(self, client: Any, lease_s: float | None) -> None:
        self.client = client
        self.lease_s: float = lease_s if lease_s is not None else conf().run_lease_s


class RunStore(_RunStoreBase):
    """The runs' Redis through a blocking client: the sweeper, cancels, triggers and
    management code. Workers execute steps through `AsyncRunStore`."""

    client: redis.Redis

    def __init__(self, client: redis.Redis, lease_s: float | None = None) -> None:
        super().__init__(client, lease_s)

    def load(self, run_id: str) -> Run | None:
        return _loaded(run_id, self.client.hgetall(keys.run(run_id)))

    def claim(self, run_id: str, step: int, retries: int = 0) -> Run | None:
        """Become the run's owner for this step, with a fresh lease; None when the run is
        gone, finished or already past this step. `retries` is the model retries spent so
        far, kept for a redelivery of the step."""
        call = _ClaimCall(run_id, step, retries, self.lease_s)
        return call.result(call.script.run(self.client))

    def append_delta(self, run: Run, piece: str) -> int:
        """Append one reply piece at the run's current offset; returns its seq."""
        call = _AppendCall(run, piece, self.lease_s)
        return call.result(call.script.run(self.client))

    def append_tool_event(
        self, run: Run, kind: str, data: dict[str, Any], tools_ran: list[str] | None = None
    ) -> int:
        """A tool.call or tool.result of the run's current step (AsyncRunStore's)."""
        call = _ToolEventCall(run, kind, data, tools_ran, self.lease_s)
        return call.result(call.script.run(self.client))

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
                self.client.zrem(keys.run_deadlines(keys.tenant_of_run(run_id)), run_id)
                return False
        call = _FinalizeCall(run, status, detail, owner)
        finished = call.result(call.script.run(self.client))
        if finished and call.outbox_entry:
            # Another broker: published after the script, from the task outbox the script
            # wrote it to; should this process die first, the sweep publishes it.
            publish_outbox_entry(call.outbox_entry)
            self.client.zrem(keys.task_outbox(run.tenant), call.outbox_entry)
        return finished

    def save_output(self, run: Run, step: int, output: str, fell_back: str = "") -> None:
        """Keep a finished step's output for the steps after it (owner only)."""
        call = _SaveOutputCall(run, step, output, fell_back)
        call.result(call.script.run(self.client))

    def text_of(self, run_id: str) -> str:
        return _text(self.client.get(keys.run_text(run_id)))

    def overdue(self, tenant: str, now: float, limit: int = 500) -> list[str]:
        """The tenant's runs past their deadline (its index in its own slot)."""
        return self.overdue_of([tenant], now, limit)

    def overdue_of(self, tenants: list[str], now: float, limit: int = 500) -> list[str]:
        """The runs of these tenants past their deadline, up to `limit` per tenant, in one
        pipelined round trip (a tenant's index is in its own slot)."""
        return self._listed([keys.run_deadlines(tenant) for tenant in tenants], now, limit)

    def _listed(self, indexes: list[str], until: float, limit: int) -> list[str]:
        if not indexes:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrangebyscore(index, "-inf", until, start=0, num=limit)
            pages = pipe.execute()
        return [as_text(run_id) for page in pages for run_id in page]

    def renew_lease(self, run: Run, extra_s: float = 0.0) -> bool:
        """Extend the owner's lease to `lease_s + extra_s` from now (never shortening it).
        False when the caller no longer owns a running step: it must write nothing more."""
        call = _RenewCall(run, self.lease_s + extra_s)
        return call.result(call.script.run(self.client))

    def hand_over(self, run_id: str, owner: str) -> bool:
        """Give up the lease once the next step's task is queued; False if no longer ours."""
        return _hand_over(run_id, owner, "", 0.0).run(self.client).done

    def expired_leases(self, tenant: str, limit: int = 500) -> list[str]:
        """The tenant's runs whose step lease has run out, by the Redis clock the leases
        are set with (the clock of the tenant's node)."""
        return self.expired_leases_of([tenant], limit)

    def expired_leases_of(self, tenants: list[str], limit: int = 500) -> list[str]:
        """The same for many tenants, up to `limit` each, in one pipelined round trip after
        one TIME. On a Redis Cluster that clock is the node of the first tenant's, not each
        tenant's own: a lease listed early by a skewed clock is harmless, since
        REDELIVER_STEP checks it again by its own node's clock and leaves it if it holds."""
        if not tenants:
            return []
        seconds, micros = _redis_time(self.client, keys.run_leases(tenants[0]))
        indexes = [keys.run_leases(tenant) for tenant in tenants]
        return self._listed(indexes, seconds + micros / 1e6, limit)

    def redeliver(self, run_id: str, max_redeliveries: int = MAX_REDELIVERIES) -> Redelivery:
        """Enqueue a step whose lease ran out again, at most once however many sweepers try."""
        tenant, step, retries = self.client.hmget(keys.run(run_id), "tenant", "step", "retries")
        step_index = int(step) if step is not None else 0
        message = ""
        in_redis = conf().broker_in_streams_redis
        if step is not None and in_redis:
            # Pushed by the script that fences the lost owner, so the step is never both
            # redelivered and still owned, nor marked redelivered without its message.
            _, message = celery_message(
                RUN_STEP_TASK, [run_id, step_index], RUNS_QUEUE, retries=int(retries or 0)
            )
        leases = keys.run_leases(keys.tenant_of_run(run_id))
        (code, value), lease = scripts.RedeliverStep(
            run_key=keys.run(run_id),
            leases_key=leases,
            queue_key=keys.celery_queue(RUNS_QUEUE),
            run_id=run_id,
            step=as_text(step) if step is not None else "",
            message=message,
            max_redeliveries=max_redeliveries,
            publish_lease_s=0.0 if in_redis else conf().outbox_grace_s,
        ).run(self.client)
        found = Redelivery("skipped", run_id, as_text(tenant) if tenant else "", step_index)
        if code == 1:
            if not message:
                # Another broker: published after the script, under a publish lease. A
                # crash in between lets the lease run out, and this sweep publishes again.
                enqueue_step(run_id, step_index)
                _drop_publish_lease(run_id, lease).run(self.client)
            return Redelivery("redelivered", run_id, found.tenant, step_index, int(value))
        if code == -2:
            return Redelivery("exhausted", run_id, found.tenant, step_index, int(value))
        return found


class AsyncRunStore(_RunStoreBase):
    """The runs' Redis through an asyncio client: what a worker's model-call runtime uses to
    claim, stream, hand over and finish steps. The same scripts, keys and arguments as
    `RunStore` (the `_...Call` builders below), awaited instead of blocking."""

    client: aredis.Redis

    def __init__(self, client: aredis.Redis, lease_s: float | None = None) -> None:
        super().__init__(client, lease_s)
        # Model-call rate limits (workers/quotas.py) through the same client.
        self.buckets = AsyncBuckets(client)

    async def claim(self, run_id: str, step: int, retries: int = 0) -> Run | None:
        call = _ClaimCall(run_id, step, retries, self.lease_s)
        return call.result(await call.script.run_async(self.client))

    async def append_delta(self, run: Run, piece: str) -> int:
        call = _AppendCall(run, piece, self.lease_s)
        return call.result(await call.script.run_async(self.client))

    async def append_tool_event(
        self, run: Run, kind: str, data: dict[str, Any], tools_ran: list[str] | None = None
    ) -> int:
        """One tool.call or tool.result of the run's current step, as its next tool event
        (StaleOffset when it is not: the value is how many the run has). `tools_ran`, when
        given, replaces the run's list of tools that ran."""
        call = _ToolEventCall(run, kind, data, tools_ran, self.lease_s)
        return call.result(await call.script.run_async(self.client))

    async def restart_reply(self, run: Run, attempt: int, reason: str, kept: str) -> None:
        """Void what the run's current step streamed (reply.restart) and start the reply
        again at offset 0 with `kept`, the text earlier steps streamed."""
        call = _RestartCall(run, attempt, reason, kept, self.lease_s)
        call.result(await call.script.run_async(self.client))

    async def finalize(self, run: Run, status: str, detail: Any = None) -> bool:
        """The run's one reply.done, by its owner; False when it already had one."""
        call = _FinalizeCall(run, status, detail, run.owner)
        finished = call.result(await call.script.run_async(self.client))
        if finished and call.outbox_entry:
            await asyncio.to_thread(publish_outbox_entry, call.outbox_entry)
            await self.client.zrem(keys.task_outbox(run.tenant), call.outbox_entry)
        return finished

    async def save_output(self, run: Run, step: int, output: str, fell_back: str = "") -> None:
        call = _SaveOutputCall(run, step, output, fell_back)
        call.result(await call.script.run_async(self.client))

    async def add_usage(self, run: Run, usage: Usage) -> tuple[int, int]:
        """One model call's tokens, on the run (whoever owns it now: the call was made) and
        its tenant's day and month counters; returns the counters' totals."""
        call = add_usage_call(run.run_id, run.tenant, usage, datetime.now(UTC))
        totals = await call.run_async(self.client)
        run.usage = usage if run.usage is None else run.usage + usage
        return totals

    async def text_of(self, run_id: str) -> str:
        return _text(await self.client.get(keys.run_text(run_id)))

    async def renew_leases(self, runs: list[Run]) -> list[bool]:
        """Renew many owners' leases, a batch of RENEW_LEASE_BATCH per script call (so the
        loop and Redis are never held long); for each run, whether it is still its owner's."""
        # A tenant's runs and lease index share its slot: one call per tenant and batch.
        by_tenant: dict[str, list[int]] = {}
        for index, run in enumerate(runs):
            by_tenant.setdefault(run.tenant, []).append(index)
        renewed: list[bool] = [False] * len(runs)
        for tenant, indexes in by_tenant.items():
            for start in range(0, len(indexes), RENEW_LEASE_BATCH):
                batch = [runs[i] for i in indexes[start : start + RENEW_LEASE_BATCH]]
                renewed_at = time.monotonic()
                answers = await scripts.RenewLeases(
                    leases_key=keys.run_leases(tenant),
                    lease_s=self.lease_s,
                    grace_s=RUN_RECORD_GRACE_S,
                    run_prefix=keys.run_prefix(tenant),
                    owners=[item for run in batch for item in (run.run_id, run.owner)],
                ).run_async(self.client)
                for i, run, answer in zip(
                    indexes[start : start + RENEW_LEASE_BATCH], batch, answers, strict=True
                ):
                    if answer:
                        run.renewed_at = renewed_at
                    renewed[i] = bool(answer)
        return renewed

    async def hand_over(self, run: Run, step: int) -> bool:
        """Queue `step` of the run (the next one, or this one again for another worker) and
        give up the run, in one script when the broker is this Redis; False when the run is
        no longer this owner's (nothing is queued then)."""
        message = ""
        in_redis = conf().broker_in_streams_redis
        if in_redis:
            _, message = celery_message(RUN_STEP_TASK, [run.run_id, step], RUNS_QUEUE)
        publish_lease_s = 0.0 if in_redis else conf().outbox_grace_s
        handed = await _hand_over(run.run_id, run.owner, message, publish_lease_s).run_async(
            self.client
        )
        if handed.done and not message:
            # Another broker: the run is queued first, under a publish lease, and its
            # message published after; a crash in between lets the lease run out and the
            # lease sweep publishes the step again (docs/guarantees.md).
            await asyncio.to_thread(enqueue_step, run.run_id, step)
            await _drop_publish_lease(run.run_id, handed.lease).run_async(self.client)
        return handed.done


def _loaded(run_id: str, raw: Mapping[bytes | str, bytes | str]) -> Run | None:
    if not raw or b"tenant" not in raw:
        return None
    return Run.from_hash(run_id, {as_text(k): as_text(v) for k, v in raw.items()})


def _text(raw: bytes | str | None) -> str:
    return text_from_fragments(as_text(raw)) if raw else ""


# One builder per script call: the script's call (streams/scripts.py) for a run, and what
# its answer means for the run. The sync and async stores share them, so the two can never
# disagree on a script's contract.


class _ClaimCall:
    def __init__(self, run_id: str, step: int, retries: int, lease_s: float) -> None:
        self.run_id = run_id
        self.renewed_at = time.monotonic()
        self.script = scripts.ClaimStep(
            run_key=keys.run(run_id),
            text_key=keys.run_text(run_id),
            leases_key=keys.run_leases(keys.tenant_of_run(run_id)),
            owner=uuid.uuid4().hex,
            step=step,
            lease_s=lease_s,
            grace_s=RUN_RECORD_GRACE_S,
            run_id=run_id,
            worker=worker_id(),
            retries=retries,
        )

    def result(self, fields: dict[str, str]) -> Run | None:
        if not fields:
            return None
        run = Run.from_hash(self.run_id, fields)
        run.renewed_at = self.renewed_at
        return run


class _AppendCall:
    def __init__(self, run: Run, piece: str, lease_s: float) -> None:
        self.run = run
        self.piece = piece
        prefix, suffix = run.reply_event(
            "reply.delta", {"run": run.run_id, "offset": run.emitted, "text": piece}
        )
        self.renewed_at = time.monotonic()
        self.script = scripts.AppendDelta(
            seq_key=keys.stream_seq(run.tenant, run.stream),
            log_key=keys.stream_log(run.tenant, run.stream),
            run_key=keys.run(run.run_id),
            text_key=keys.run_text(run.run_id),
            leases_key=keys.run_leases(run.tenant),
            channel=keys.stream_channel(run.tenant, run.stream),
            prefix=prefix,
            suffix=suffix,
            maxlen=run.retention,
            owner=run.owner,
            offset=run.emitted,
            piece_chars=len(piece),
            piece_fragment=json_fragment(piece),
            lease_s=lease_s,
            grace_s=RUN_RECORD_GRACE_S,
            run_id=run.run_id,
        )

    def result(self, answer: scripts.Coded) -> int:
        run = self.run
        if answer.code == 1:
            run.emitted += len(self.piece)
            run.renewed_at = self.renewed_at
            return int(answer.value)
        if answer.code == -1:
            raise RunFinished(run.run_id)
        if answer.code == -2:
            raise Fenced(run.run_id)
        # -3: our idea of the offset is stale: a fenced attempt, or a lost answer.
        raise StaleOffset(run.run_id, run.emitted, int(answer.value))


class _ToolEventCall:
    def __init__(
        self,
        run: Run,
        kind: str,
        data: dict[str, Any],
        tools_ran: list[str] | None,
        lease_s: float,
    ) -> None:
        self.run = run
        self.tools_ran = tools_ran
        prefix, suffix = run.reply_event(kind, data)
        self.renewed_at = time.monotonic()
        self.script = scripts.AppendToolEvent(
            seq_key=keys.stream_seq(run.tenant, run.stream),
            log_key=keys.stream_log(run.tenant, run.stream),
            run_key=keys.run(run.run_id),
            text_key=keys.run_text(run.run_id),
            leases_key=keys.run_leases(run.tenant),
            channel=keys.stream_channel(run.tenant, run.stream),
            prefix=prefix,
            suffix=suffix,
            maxlen=run.retention,
            owner=run.owner,
            count=run.tool_events,
            step=run.step,
            tools_ran=dumps(tools_ran) if tools_ran is not None else "",
            lease_s=lease_s,
            grace_s=RUN_RECORD_GRACE_S,
            run_id=run.run_id,
        )

    def result(self, answer: scripts.Coded) -> int:
        run = self.run
        if answer.code == 1:
            run.tool_events += 1
            run.tool_step = run.step
            if self.tools_ran is not None:
                run.tools_ran = list(self.tools_ran)
            run.renewed_at = self.renewed_at
            return int(answer.value)
        if answer.code == -1:
            raise RunFinished(run.run_id)
        if answer.code == -2:
            raise Fenced(run.run_id)
        raise StaleOffset(run.run_id, run.tool_events, int(answer.value))


class _RestartCall:
    def __init__(self, run: Run, attempt: int, reason: str, kept: str, lease_s: float) -> None:
        self.run = run
        self.kept = kept
        restart_prefix, restart_suffix = run.reply_event(
            # `step`: the tool events of this step and later ones are void with its text.
            "reply.restart",
            {"run": run.run_id, "attempt": attempt, "reason": reason, "step": run.step},
        )
        delta_prefix = delta_suffix = ""
        if kept:
            delta_prefix, delta_suffix = run.reply_event(
                "reply.delta", {"run": run.run_id, "offset": 0, "text": kept}
            )
        self.renewed_at = time.monotonic()
        self.script = scripts.RestartReply(
            seq_key=keys.stream_seq(run.tenant, run.stream),
            log_key=keys.stream_log(run.tenant, run.stream),
            run_key=keys.run(run.run_id),
            text_key=keys.run_text(run.run_id),
            leases_key=keys.run_leases(run.tenant),
            channel=keys.stream_channel(run.tenant, run.stream),
            restart_prefix=restart_prefix,
            restart_suffix=restart_suffix,
            maxlen=run.retention,
            owner=run.owner,
            keep_chars=len(kept),
            keep_fragment=json_fragment(kept),
            delta_prefix=delta_prefix,
            delta_suffix=delta_suffix,
            lease_s=lease_s,
            grace_s=RUN_RECORD_GRACE_S,
            run_id=run.run_id,
        )

    def result(self, answer: scripts.Coded) -> None:
        if answer.code == -1:
            raise RunFinished(self.run.run_id)
        if answer.code == -2:
            raise Fenced(self.run.run_id)
        self.run.emitted = self.run.step_base = len(self.kept)
        self.run.tool_step = -1
        self.run.renewed_at = self.renewed_at


class _FinalizeCall:
    """The run's reply.done, and with it whatever FINALIZE_RUN writes in the same script:
    subscribers' trigger, the history outbox record, the admin's list of problems."""

    def __init__(self, run: Run, status: str, detail: Any, owner: str) -> None:
        self.run = run
        self.status = status
        self.event_id = new_event_id()
        at = utc_now_iso()
        prefix, text_prefix, tail = _reply_done_parts(run, status, detail, self.event_id, at)
        # Agents subscribed to this reply: their trigger task goes in with the event.
        trigger_message, enqueue_after = _trigger_message(run, status, self.event_id)
        self.outbox_entry = (
            outbox_entry(TRIGGER_TASK, [run.run_id, self.event_id]) if enqueue_after else ""
        )
        history_max, history_head = _history_head(run, status, detail, self.event_id, at)
        self.script = scripts.FinalizeRun(
            seq_key=keys.stream_seq(run.tenant, run.stream),
            log_key=keys.stream_log(run.tenant, run.stream),
            run_key=keys.run(run.run_id),
            text_key=keys.run_text(run.run_id),
            deadlines_key=keys.run_deadlines(run.tenant),
            leases_key=keys.run_leases(run.tenant),
            queue_key=keys.celery_queue(RUNS_QUEUE),
            history_outbox_key=keys.history_outbox(run.tenant),
            history_dropped_key=keys.history_dropped(run.tenant),
            problems_key=keys.recent_problems(run.tenant),
            channel=keys.stream_channel(run.tenant, run.stream),
            prefix=prefix,
            text_prefix=text_prefix,
            tail=tail,
            maxlen=run.retention,
            owner=owner,
            status=status,
            run_id=run.run_id,
            finished_ttl=FINISHED_RUN_TTL_S,
            trigger_message=trigger_message,
            history_head=history_head,
            history_max=history_max,
            problem_entry=problem_entry(
                run_id=run.run_id,
                tenant=run.tenant,
                stream=run.stream,
                agent=run.agent,
                status=status,
                detail=detail,
                at=at,
            ),
            problems_max=RECENT_PROBLEMS_MAX,
            worker_stop_prefix=keys.WORKER_STOP_PREFIX,
            task_outbox_key=keys.task_outbox(run.tenant),
            outbox_entry=self.outbox_entry,
        )

    def result(self, answer: scripts.Coded) -> bool:
        run = self.run
        if answer.code == -2:
            raise Fenced(run.run_id)
        if answer.code == 1:
            logger.info(
                "run finished tenant=%s stream=%s run=%s status=%s seq=%s",
                run.tenant,
                run.stream,
                run.run_id,
                self.status,
                answer.value,
            )
        return answer.code == 1


def _reply_done_parts(
    run: Run, status: str, detail: Any, event_id: str, at: str
) -> tuple[str, str, str]:
    """The reply.done event around its seq and its text, which only the script knows (the
    reply as the deltas stored it): (prefix, text_prefix, tail), the text going between
    text_prefix and tail, just before "detail" in the data object."""
    prefix, suffix = run.reply_event(
        "reply.done", {"run": run.run_id, "status": status, "detail": detail}, event_id, at
    )
    data_at = suffix.index(',"data":') + len(',"data":')
    detail_at = suffix.index(',"detail":', data_at)
    return prefix, suffix[:detail_at] + ',"text":', suffix[detail_at:]


def _history_head(run: Run, status: str, detail: Any, event_id: str, at: str) -> tuple[int, str]:
    """(the outbox's cap, the run's outbox record head, "" with history off). Written by
    the finalize script, so only the finalize that wins records the run."""
    history_max = conf().history_outbox_max
    if history_max <= 0:
        return history_max, ""
    head = outbox_head(
        run.tenant,
        run.stream,
        run.run_id,
        status,
        event_id,
        at,
        reason_of(detail),
        model_of(detail),
    )
    return history_max, head


class _SaveOutputCall:
    def __init__(self, run: Run, step: int, output: str, fell_back: str) -> None:
        self.run, self.step, self.output, self.fell_back = run, step, output, fell_back
        self.script = scripts.SaveOutput(
            run_key=keys.run(run.run_id),
            owner=run.owner,
            field=f"{OUTPUT_FIELD}{step}",
            output=output,
            fell_back=fell_back,
        )

    def result(self, saved: bool) -> None:
        if not saved:
            raise Fenced(self.run.run_id)
        self.run.outputs[self.step] = self.output
        if self.fell_back:
            self.run.fell_back = self.fell_back


class _RenewCall:
    def __init__(self, run: Run, lease_s: float) -> None:
        self.run = run
        self.renewed_at = time.monotonic()
        self.script = scripts.RenewLease(
            run_key=keys.run(run.run_id),
            text_key=keys.run_text(run.run_id),
            leases_key=keys.run_leases(run.tenant),
            owner=run.owner,
            lease_s=lease_s,
            grace_s=RUN_RECORD_GRACE_S,
            run_id=run.run_id,
        )

    def result(self, renewed: bool) -> bool:
        if renewed:
            self.run.renewed_at = self.renewed_at
        return renewed


def _hand_over(run_id: str, owner: str, message: str, publish_lease_s: float) -> scripts.HandOver:
    return scripts.HandOver(
        run_key=keys.run(run_id),
        leases_key=keys.run_leases(keys.tenant_of_run(run_id)),
        queue_key=keys.celery_queue(RUNS_QUEUE),
        owner=owner,
        run_id=run_id,
        message=message,
        publish_lease_s=publish_lease_s,
    )


def _drop_publish_lease(run_id: str, lease: str) -> scripts.DropPublishLease:
    return scripts.DropPublishLease(
        run_key=keys.run(run_id),
        leases_key=keys.run_leases(keys.tenant_of_run(run_id)),
        run_id=run_id,
        lease=lease,
    )


def _redis_time(client: redis.Redis, key: str) -> tuple[int, int]:
    """The Redis clock of `key`'s node (TIME names no key: on a Redis Cluster it is sent
    to that node, whose clock the scripts writing the key's leases read)."""
    if isinstance(client, RedisCluster):
        answer = client.time(target_nodes=client.get_node_from_key(key))
    else:
        answer = client.time()
    seconds, micros = answer
    return int(seconds), int(micros)


def _trigger_message(run: Run, status: str, event_id: str) -> tuple[str, bool]:
    """(Celery message for the trigger task, or "", whether to publish it after instead)
    when some agent subscribes to this run's reply.done."""
    if not subscribed("reply.done", run.agent, run.stream, status):
        return "", False
    if not conf().broker_in_streams_redis:
        return "", True
    _, message = celery_message(TRIGGER_TASK, [run.run_id, event_id], RUNS_QUEUE)
    return message, False
