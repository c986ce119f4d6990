"""Run state in Redis and the fenced appends a run's owner makes (sync: Celery workers).

A run's hash holds its step, owner, attempt, deadline, lease and how many characters its
reply has emitted. Only the current owner may append, and only at the current offset, so a
retried or redelivered step can never duplicate or reorder a delta, and only one
`reply.done` can ever be written.

A claimed step holds a lease (`RUN_LEASE_S`) that its worker renews with every append and,
while the model is silent, from a `LeaseKeeper` thread. A lease that runs out means the
worker died: the sweeper redelivers the step (`redeliver`) long before kombu would restore
the dead worker's message (its visibility timeout), and the new attempt fences the old one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import redis
from django.conf import settings

from history.records import outbox_head, problem_entry, reason_of
from orchestration.enqueue import (
    TRIGGER_TASK,
    broker_is_redis_at,
    celery_message,
    enqueue_step,
    enqueue_trigger,
)
from realtime import keys, scripts
from realtime.events import (
    cause_of,
    event_parts,
    json_fragment,
    new_event_id,
    text_from_fragments,
    utc_now_iso,
)
from realtime.streams import RUN_RECORD_GRACE_S, RUN_STEP_TASK, RUNS_QUEUE

logger = logging.getLogger(__name__)

FINISHED_RUN_TTL_S = 3600
# Run hash fields `out.0`, `out.1`, ...: each finished step's output, for the steps after it.
OUTPUT_FIELD = "out."
# Lost leases a run survives. A step that keeps killing its worker (a prompt that runs it
# out of memory, say) is ended with `failed` rather than handed to worker after worker.
MAX_REDELIVERIES = 3
# Failed and degraded runs kept for the admin's live queue page: a look, not an archive.
RECENT_PROBLEMS_MAX = 200


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


class RunStore:
    def __init__(self, client: redis.Redis, lease_s: float | None = None) -> None:
        self.client = client
        self.lease_s: float = (
            lease_s if lease_s is not None else settings.SWITCHBOARD["RUN_LEASE_S"]
        )
        self._claim = client.register_script(scripts.CLAIM_STEP)
        self._append_delta = client.register_script(scripts.APPEND_DELTA)
        self._finalize = client.register_script(scripts.FINALIZE_RUN)
        self._renew = client.register_script(scripts.RENEW_LEASE)
        self._hand_over = client.register_script(scripts.HAND_OVER)
        self._redeliver = client.register_script(scripts.REDELIVER_STEP)
        self._save_output = client.register_script(scripts.SAVE_OUTPUT)
        # Called by orchestration/triggers.py, which builds its keys and arguments.
        self.start_triggered_run = client.register_script(scripts.START_TRIGGERED_RUN)

    def load(self, run_id: str) -> Run | None:
        raw = self.client.hgetall(keys.run(run_id))
        if not raw or b"tenant" not in raw:
            return None
        return Run.from_hash(run_id, {k.decode(): v.decode() for k, v in raw.items()})

    def claim(self, run_id: str, step: int, retries: int = 0) -> Run | None:
        """Become the run's owner for this step, with a fresh lease; None when the run is
        gone, finished or already past this step. `retries` is the task's retry count,
        kept for a redelivery of the step."""
        owner = uuid.uuid4().hex
        renewed_at = time.monotonic()
        flat = self._claim(
            keys=[keys.run(run_id), keys.run_text(run_id), keys.RUN_LEASES],
            args=[
                owner,
                step,
                self.lease_s,
                RUN_RECORD_GRACE_S,
                run_id,
                f"{socket.gethostname()}:{os.getpid()}",
                retries,
            ],
        )
        if not flat:
            return None
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        run = Run.from_hash(run_id, fields)
        run.renewed_at = renewed_at
        return run

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
        renewed_at = time.monotonic()
        code, value = self._append_delta(
            keys=[
                keys.stream_seq(run.tenant, run.stream),
                keys.stream_log(run.tenant, run.stream),
                keys.run(run.run_id),
                keys.run_text(run.run_id),
                keys.RUN_LEASES,
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
                self.lease_s,
                RUN_RECORD_GRACE_S,
                run.run_id,
            ],
        )
        if code == 1:
            run.emitted += len(piece)
            run.renewed_at = renewed_at
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
        at = utc_now_iso()
        prefix, suffix = event_parts(
            stream=stream,
            event_id=event_id,
            kind="reply.done",
            sender=f"agent:{run.agent}",
            cause=run.cause(),
            data={"run": run_id, "status": status, "detail": detail},
            ts=at,
        )
        # Split the data object so the stored text can be spliced in before "detail".
        data_at = suffix.index(',"data":') + len(',"data":')
        detail_at = suffix.index(',"detail":', data_at)
        text_prefix = suffix[:detail_at] + ',"text":'
        # Agents subscribed to this reply: their trigger task goes in with the event.
        trigger_message, enqueue_after = _trigger_message(run, status, event_id)
        # Written by the same script, so only the finalize that wins records the run.
        history_max = settings.SWITCHBOARD["HISTORY_OUTBOX_MAX"]
        history_head = (
            outbox_head(tenant, stream, run_id, status, event_id, at, reason_of(detail))
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
        code, value = self._finalize(
            keys=[
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
                trigger_message,
                history_head,
                history_max,
                problem,
                RECENT_PROBLEMS_MAX,
            ],
        )
        if code == -2:
            raise Fenced(run_id)
        if code == 1 and enqueue_after:
            # Another broker: published after the script. A crash in between loses this
            # trigger (its subscribers do not run); with the broker in this Redis it cannot.
            enqueue_trigger(run_id, event_id)
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

    def save_output(self, run: Run, step: int, output: str, fell_back: str = "") -> None:
        """Keep a finished step's output for the steps after it (owner only)."""
        saved = self._save_output(
            keys=[keys.run(run.run_id)],
            args=[run.owner, f"{OUTPUT_FIELD}{step}", output, fell_back],
        )
        if not saved:
            raise Fenced(run.run_id)
        run.outputs[step] = output
        if fell_back:
            run.fell_back = fell_back

    def text_of(self, run_id: str) -> str:
        raw = self.client.get(keys.run_text(run_id))
        return text_from_fragments(raw.decode()) if raw else ""

    def overdue(self, now: float, limit: int = 500) -> list[str]:
        ids = self.client.zrangebyscore(keys.RUN_DEADLINES, "-inf", now, start=0, num=limit)
        return [run_id.decode() for run_id in ids]

    def renew_lease(self, run: Run, extra_s: float = 0.0) -> bool:
        """Extend the owner's lease to `lease_s + extra_s` from now (never shortening it).
        False when the caller no longer owns a running step: it must write nothing more."""
        renewed_at = time.monotonic()
        renewed = self._renew(
            keys=[keys.run(run.run_id), keys.run_text(run.run_id), keys.RUN_LEASES],
            args=[run.owner, self.lease_s + extra_s, RUN_RECORD_GRACE_S, run.run_id],
        )
        if renewed:
            run.renewed_at = renewed_at
        return bool(renewed)

    def owns(self, run: Run) -> bool:
        """Whether the caller still owns a running step (a read: nothing is renewed)."""
        status, owner = self.client.hmget(keys.run(run.run_id), "status", "owner")
        return status == b"running" and owner == run.owner.encode()

    def hand_over(self, run_id: str, owner: str) -> bool:
        """Give up the lease once the next step's task is queued; False if no longer ours."""
        return bool(self._hand_over(keys=[keys.run(run_id), keys.RUN_LEASES], args=[owner, run_id]))

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
        same_redis = broker_is_redis_at(settings.CELERY_BROKER_URL, settings.REDIS_URL)
        if step is not None and same_redis:
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


def _trigger_message(run: Run, status: str, event_id: str) -> tuple[str, bool]:
    """(Celery message for the trigger task, or "", whether to publish it after instead)
    when some agent subscribes to this run's reply.done."""
    from orchestration.agents import subscribers

    if not subscribers("reply.done", run.agent, run.stream, status):
        return "", False
    if not broker_is_redis_at(settings.CELERY_BROKER_URL, settings.REDIS_URL):
        return "", True
    _, message = celery_message(TRIGGER_TASK, [run.run_id, event_id], RUNS_QUEUE)
    return message, False


class LeaseKeeper:
    """Renews a claimed step's lease from a thread while the step runs.

    A model call can be silent for longer than a lease (a slow first token, a stalled
    provider) and a stalled backend iterator blocks the step's own loop, so the renewal
    cannot live there. Renewal is fenced by the owner token in Redis: once the step has
    lost the run (redelivered, finished, handed over) the keeper writes nothing and stops,
    and sets `lost` so the step abandons its model call (a cancel is noticed so).
    """

    def __init__(
        self,
        store: RunStore,
        run: Run,
        lost: threading.Event | None = None,
        check_s: float | None = None,
    ) -> None:
        self.store = store
        self.run = run
        # Three chances to renew before the lease runs out, so one slow round trip is not
        # taken for a dead worker (and never a busy loop, however short the lease).
        self.every_s = max(store.lease_s / 3, 0.05)
        # Set once the step no longer owns a running run (cancelled, swept, fenced), so its
        # model call is abandoned; between renewals a cheap read finds that out sooner.
        self.lost = lost if lost is not None else threading.Event()
        self.check_s = max(min(check_s or self.every_s, self.every_s), 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{run.run_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.store.lease_s)

    def _keep(self) -> None:
        run = self.run
        retry_at = 0.0
        checked_at = time.monotonic()
        while True:
            wake_at = max(min(run.renewed_at + self.every_s, checked_at + self.check_s), retry_at)
            if self._stop.wait(max(wake_at - time.monotonic(), 0.01)):
                return
            try:
                # Appends renew the lease too: only a silent stretch needs a heartbeat.
                if time.monotonic() - run.renewed_at < self.every_s:
                    checked_at = time.monotonic()
                    if self.store.owns(run):
                        continue
                    renewed = False
                else:
                    renewed = self.store.renew_lease(run)
                    checked_at = time.monotonic()
                if not renewed:
                    self.lost.set()
                    logger.info(
                        "lease keeper stops: the step no longer owns tenant=%s run=%s",
                        run.tenant,
                        run.run_id,
                    )
                    return
            except Exception:
                # Tried again shortly; should the lease lapse meanwhile, the step is
                # redelivered and this attempt fenced, which is safe.
                logger.exception("lease renewal failed tenant=%s run=%s", run.tenant, run.run_id)
                retry_at = time.monotonic() + min(self.every_s, 0.5)
