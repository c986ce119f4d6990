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
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
import redis.asyncio as aredis

from project.conf import conf
from streams import keys, scripts
from streams.buckets import AsyncBuckets
from streams.enqueue import (
    RUN_STEP_TASK,
    RUNS_QUEUE,
    TRIGGER_TASK,
    celery_message,
    enqueue_step,
    enqueue_trigger,
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
from streams.records import outbox_head, problem_entry, reason_of
from streams.subscriptions import subscribed

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


class _RunScripts:
    """The run scripts both stores call, registered on their client."""

    def __init__(self, client: Any, lease_s: float | None) -> None:
        self.client = client
        self.lease_s: float = lease_s if lease_s is not None else conf().run_lease_s
        self._claim = client.register_script(scripts.CLAIM_STEP)
        self._append_delta = client.register_script(scripts.APPEND_DELTA)
        self._finalize = client.register_script(scripts.FINALIZE_RUN)
        self._renew = client.register_script(scripts.RENEW_LEASE)
        self._hand_over = client.register_script(scripts.HAND_OVER)
        self._save_output = client.register_script(scripts.SAVE_OUTPUT)


class RunStore(_RunScripts):
    """The runs' Redis through a blocking client: the sweeper, cancels, triggers and
    management code. Workers execute steps through `AsyncRunStore`."""

    client: redis.Redis

    def __init__(self, client: redis.Redis, lease_s: float | None = None) -> None:
        super().__init__(client, lease_s)
        self._redeliver = client.register_script(scripts.REDELIVER_STEP)
        # Called by orchestration/triggers.py, which builds its keys and arguments.
        self.start_triggered_run = client.register_script(scripts.START_TRIGGERED_RUN)

    def load(self, run_id: str) -> Run | None:
        return _loaded(run_id, self.client.hgetall(keys.run(run_id)))

    def claim(self, run_id: str, step: int, retries: int = 0) -> Run | None:
        """Become the run's owner for this step, with a fresh lease; None when the run is
        gone, finished or already past this step. `retries` is the model retries spent so
        far, kept for a redelivery of the step."""
        call = _ClaimCall(run_id, step, retries, self.lease_s)
        return call.result(self._claim(keys=call.keys, args=call.args))

    def append_delta(self, run: Run, piece: str) -> int:
        """Append one reply piece at the run's current offset; returns its seq."""
        call = _AppendCall(run, piece, self.lease_s)
        return call.result(*self._append_delta(keys=call.keys, args=call.args))

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
        call = _FinalizeCall(run, status, detail, owner)
        finished = call.result(*self._finalize(keys=call.keys, args=call.args))
        if finished and call.enqueue_after:
            # Another broker: published after the script. A crash in between loses this
            # trigger (its subscribers do not run); with the broker in this Redis it cannot.
            enqueue_trigger(run_id, call.event_id)
        return finished

    def save_output(self, run: Run, step: int, output: str, fell_back: str = "") -> None:
        """Keep a finished step's output for the steps after it (owner only)."""
        call = _SaveOutputCall(run, step, output, fell_back)
        call.result(self._save_output(keys=call.keys, args=call.args))

    def text_of(self, run_id: str) -> str:
        return _text(self.client.get(keys.run_text(run_id)))

    def overdue(self, now: float, limit: int = 500) -> list[str]:
        ids = self.client.zrangebyscore(keys.RUN_DEADLINES, "-inf", now, start=0, num=limit)
        return [run_id.decode() for run_id in ids]

    def renew_lease(self, run: Run, extra_s: float = 0.0) -> bool:
        """Extend the owner's lease to `lease_s + extra_s` from now (never shortening it).
        False when the caller no longer owns a running step: it must write nothing more."""
        call = _RenewCall(run, self.lease_s + extra_s)
        return call.result(self._renew(keys=call.keys, args=call.args))

    def hand_over(self, run_id: str, owner: str) -> bool:
        """Give up the lease once the next step's task is queued; False if no longer ours."""
        call = _HandOverCall(run_id, owner, "")
        return bool(self._hand_over(keys=call.keys, args=call.args))

    def expired_leases(self, limit: int = 500) -> list[str]:
        """Runs whose step lease has run out, by the Redis clock the leases are set with."""
        seconds, micros = self.client.time()
        ids = self.client.zrangebyscore(
            keys.RUN_LEASES, "-inf", seconds + micros / 1e6, start=0, num=limit
        )
        return [run_id.decode() for run_id in ids]

    def redeliver(self, run_id: str, max_redeliveries: int = MAX_REDELIVERIES) -> Redelivery:
        """Enqueue a step whose lease ran out again, at most once however many sweepers try."""
        tenant, step, retries = self.client.hmget(keys.run(run_id), "tenant", "step", "retries")
        step_index = int(step) if step is not None else 0
        message = ""
        if step is not None and conf().broker_in_streams_redis:
            # Pushed by the script that fences the lost owner, so the step is never both
            # redelivered and still owned, nor marked redelivered without its message.
            _, message = celery_message(
                RUN_STEP_TASK, [run_id, step_index], RUNS_QUEUE, retries=int(retries or 0)
            )
        code, value = self._redeliver(
            keys=[keys.run(run_id), keys.RUN_LEASES, keys.celery_queue(RUNS_QUEUE)],
            args=[run_id, step if step is not None else "", message, max_redeliveries],
        )
        found = Redelivery("skipped", run_id, tenant.decode() if tenant else "", step_index)
        if code == 1:
            if not message:
                # Another broker: published after the script. A crash in between leaves the
                # run queued without a message; the deadline sweep still ends it.
                enqueue_step(run_id, step_index)
            return Redelivery("redelivered", run_id, found.tenant, step_index, int(value))
        if code == -2:
            return Redelivery("exhausted", run_id, found.tenant, step_index, int(value))
        return found


class AsyncRunStore(_RunScripts):
    """The runs' Redis through an asyncio client: what a worker's model-call runtime uses to
    claim, stream, hand over and finish steps. The same scripts, keys and arguments as
    `RunStore` (the `_...Call` builders below), awaited instead of blocking."""

    client: aredis.Redis

    def __init__(self, client: aredis.Redis, lease_s: float | None = None) -> None:
        super().__init__(client, lease_s)
        self._restart = client.register_script(scripts.RESTART_REPLY)
        self._renew_many = client.register_script(scripts.RENEW_LEASES)
        # Model-call rate limits (workers/quotas.py) through the same client.
        self.buckets = AsyncBuckets(client)

    async def claim(self, run_id: str, step: int, retries: int = 0) -> Run | None:
        call = _ClaimCall(run_id, step, retries, self.lease_s)
        return call.result(await self._claim(keys=call.keys, args=call.args))

    async def append_delta(self, run: Run, piece: str) -> int:
        call = _AppendCall(run, piece, self.lease_s)
        return call.result(*await self._append_delta(keys=call.keys, args=call.args))

    async def restart_reply(self, run: Run, attempt: int, reason: str, kept: str) -> None:
        """Void what the run's current step streamed (reply.restart) and start the reply
        again at offset 0 with `kept`, the text earlier steps streamed."""
        call = _RestartCall(run, attempt, reason, kept, self.lease_s)
        call.result(*await self._restart(keys=call.keys, args=call.args))

    async def finalize(self, run: Run, status: str, detail: Any = None) -> bool:
        """The run's one reply.done, by its owner; False when it already had one."""
        call = _FinalizeCall(run, status, detail, run.owner)
        finished = call.result(*await self._finalize(keys=call.keys, args=call.args))
        if finished and call.enqueue_after:
            await asyncio.to_thread(enqueue_trigger, run.run_id, call.event_id)
        return finished

    async def save_output(self, run: Run, step: int, output: str, fell_back: str = "") -> None:
        call = _SaveOutputCall(run, step, output, fell_back)
        call.result(await self._save_output(keys=call.keys, args=call.args))

    async def text_of(self, run_id: str) -> str:
        return _text(await self.client.get(keys.run_text(run_id)))

    async def renew_leases(self, runs: list[Run]) -> list[bool]:
        """Renew many owners' leases, a batch of RENEW_LEASE_BATCH per script call (so the
        loop and Redis are never held long); for each run, whether it is still its owner's."""
        renewed: list[bool] = []
        for start in range(0, len(runs), RENEW_LEASE_BATCH):
            batch = runs[start : start + RENEW_LEASE_BATCH]
            renewed_at = time.monotonic()
            args: list[Any] = [self.lease_s, RUN_RECORD_GRACE_S, keys.run("")]
            for run in batch:
                args += [run.run_id, run.owner]
            answers = await self._renew_many(keys=[keys.RUN_LEASES], args=args)
            for run, answer in zip(batch, answers, strict=True):
                if answer:
                    run.renewed_at = renewed_at
                renewed.append(bool(answer))
        return renewed

    async def hand_over(self, run: Run, step: int) -> bool:
        """Queue `step` of the run (the next one, or this one again for another worker) and
        give up the run, in one script when the broker is this Redis; False when the run is
        no longer this owner's (nothing is queued then)."""
        message = ""
        if conf().broker_in_streams_redis:
            _, message = celery_message(RUN_STEP_TASK, [run.run_id, step], RUNS_QUEUE)
        call = _HandOverCall(run.run_id, run.owner, message)
        handed = bool(await self._hand_over(keys=call.keys, args=call.args))
        if handed and not message:
            # Another broker: the run is queued first and its message published after; a
            # crash in between leaves it to the deadline sweep (docs/guarantees.md).
            await asyncio.to_thread(enqueue_step, run.run_id, step)
        return handed


def _loaded(run_id: str, raw: dict[bytes, bytes]) -> Run | None:
    if not raw or b"tenant" not in raw:
        return None
    return Run.from_hash(run_id, {k.decode(): v.decode() for k, v in raw.items()})


def _text(raw: bytes | None) -> str:
    return text_from_fragments(raw.decode()) if raw else ""


# One builder per script call: its keys and arguments, and what its answer means. The sync
# and async stores share them, so the two can never disagree on a script's contract.


class _ClaimCall:
    def __init__(self, run_id: str, step: int, retries: int, lease_s: float) -> None:
        self.run_id = run_id
        self.owner = uuid.uuid4().hex
        self.renewed_at = time.monotonic()
        self.keys = [keys.run(run_id), keys.run_text(run_id), keys.RUN_LEASES]
        self.args = [
            self.owner,
            step,
            lease_s,
            RUN_RECORD_GRACE_S,
            run_id,
            worker_id(),
            retries,
        ]

    def result(self, flat: list[bytes]) -> Run | None:
        if not flat:
            return None
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
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
        self.keys = _stream_and_run_keys(run)
        self.args = [
            keys.stream_channel(run.tenant, run.stream),
            prefix,
            suffix,
            run.retention,
            run.owner,
            run.emitted,
            len(piece),
            json_fragment(piece),
            lease_s,
            RUN_RECORD_GRACE_S,
            run.run_id,
        ]

    def result(self, code: int, value: Any) -> int:
        run = self.run
        if code == 1:
            run.emitted += len(self.piece)
            run.renewed_at = self.renewed_at
            return int(value)
        if code == -1:
            raise RunFinished(run.run_id)
        if code == -2:
            raise Fenced(run.run_id)
        # -3: our idea of the offset is stale: a fenced attempt, or a lost answer.
        raise StaleOffset(run.run_id, run.emitted, int(value))


class _RestartCall:
    def __init__(self, run: Run, attempt: int, reason: str, kept: str, lease_s: float) -> None:
        self.run = run
        self.kept = kept
        restart_prefix, restart_suffix = run.reply_event(
            "reply.restart", {"run": run.run_id, "attempt": attempt, "reason": reason}
        )
        delta_prefix = delta_suffix = ""
        if kept:
            delta_prefix, delta_suffix = run.reply_event(
                "reply.delta", {"run": run.run_id, "offset": 0, "text": kept}
            )
        self.renewed_at = time.monotonic()
        self.keys = _stream_and_run_keys(run)
        self.args = [
            keys.stream_channel(run.tenant, run.stream),
            restart_prefix,
            restart_suffix,
            run.retention,
            run.owner,
            len(kept),
            json_fragment(kept),
            delta_prefix,
            delta_suffix,
            lease_s,
            RUN_RECORD_GRACE_S,
            run.run_id,
        ]

    def result(self, code: int, value: Any) -> None:
        if code == -1:
            raise RunFinished(self.run.run_id)
        if code == -2:
            raise Fenced(self.run.run_id)
        self.run.emitted = self.run.step_base = len(self.kept)
        self.run.renewed_at = self.renewed_at


class _FinalizeCall:
    def __init__(self, run: Run, status: str, detail: Any, owner: str) -> None:
        self.run = run
        self.status = status
        tenant, stream, run_id = run.tenant, run.stream, run.run_id
        self.event_id = new_event_id()
        at = utc_now_iso()
        prefix, suffix = run.reply_event(
            "reply.done", {"run": run_id, "status": status, "detail": detail}, self.event_id, at
        )
        # Split the data object so the stored text can be spliced in before "detail".
        data_at = suffix.index(',"data":') + len(',"data":')
        detail_at = suffix.index(',"detail":', data_at)
        text_prefix = suffix[:detail_at] + ',"text":'
        # Agents subscribed to this reply: their trigger task goes in with the event.
        trigger_message, self.enqueue_after = _trigger_message(run, status, self.event_id)
        # Written by the same script, so only the finalize that wins records the run.
        history_max = conf().history_outbox_max
        history_head = (
            outbox_head(tenant, stream, run_id, status, self.event_id, at, reason_of(detail))
            if history_max > 0
            else ""
        )
        problem = problem_entry(
            run_id=run_id,
            tenant=tenant,
            stream=stream,
            agent=run.agent,
            status=status,
            detail=detail,
            at=at,
        )
        self.keys = [
            keys.stream_seq(tenant, stream),
            keys.stream_log(tenant, stream),
            keys.run(run_id),
            keys.run_text(run_id),
            keys.RUN_DEADLINES,
            keys.RUN_LEASES,
            keys.celery_queue(RUNS_QUEUE),
            keys.HISTORY_OUTBOX,
            keys.HISTORY_DROPPED,
            keys.RECENT_PROBLEMS,
        ]
        self.args = [
            keys.stream_channel(tenant, stream),
            prefix,
            text_prefix,
            suffix[detail_at:],
            run.retention,
            owner,
            status,
            run_id,
            FINISHED_RUN_TTL_S,
            trigger_message,
            history_head,
            history_max,
            problem,
            RECENT_PROBLEMS_MAX,
            keys.WORKER_STOP_PREFIX,
        ]

    def result(self, code: int, value: Any) -> bool:
        run = self.run
        if code == -2:
            raise Fenced(run.run_id)
        if code == 1:
            logger.info(
                "run finished tenant=%s stream=%s run=%s status=%s seq=%s",
                run.tenant,
                run.stream,
                run.run_id,
                self.status,
                value,
            )
        return code == 1


class _SaveOutputCall:
    def __init__(self, run: Run, step: int, output: str, fell_back: str) -> None:
        self.run, self.step, self.output, self.fell_back = run, step, output, fell_back
        self.keys = [keys.run(run.run_id)]
        self.args = [run.owner, f"{OUTPUT_FIELD}{step}", output, fell_back]

    def result(self, saved: int) -> None:
        if not saved:
            raise Fenced(self.run.run_id)
        self.run.outputs[self.step] = self.output
        if self.fell_back:
            self.run.fell_back = self.fell_back


class _RenewCall:
    def __init__(self, run: Run, lease_s: float) -> None:
        self.run = run
        self.renewed_at = time.monotonic()
        self.keys = [keys.run(run.run_id), keys.run_text(run.run_id), keys.RUN_LEASES]
        self.args = [run.owner, lease_s, RUN_RECORD_GRACE_S, run.run_id]

    def result(self, renewed: int) -> bool:
        if renewed:
            self.run.renewed_at = self.renewed_at
        return bool(renewed)


class _HandOverCall:
    def __init__(self, run_id: str, owner: str, message: str) -> None:
        self.keys = [keys.run(run_id), keys.RUN_LEASES, keys.celery_queue(RUNS_QUEUE)]
        self.args = [owner, run_id, message]


def _stream_and_run_keys(run: Run) -> list[str]:
    return [
        keys.stream_seq(run.tenant, run.stream),
        keys.stream_log(run.tenant, run.stream),
        keys.run(run.run_id),
        keys.run_text(run.run_id),
        keys.RUN_LEASES,
    ]


def _trigger_message(run: Run, status: str, event_id: str) -> tuple[str, bool]:
    """(Celery message for the trigger task, or "", whether to publish it after instead)
    when some agent subscribes to this run's reply.done."""
    if not subscribed("reply.done", run.agent, run.stream, status):
        return "", False
    if not conf().broker_in_streams_redis:
        return "", True
    _, message = celery_message(TRIGGER_TASK, [run.run_id, event_id], RUNS_QUEUE)
    return message, False
