"""Multi-agent workflows: an agent's `reply.done`, or a client's `published` event, starts
the agents subscribed to it.

FINALIZE_RUN queues the trigger task in the same transaction as the reply.done it is about
(only when some agent's pattern matches), so a trigger is never lost between the event and
its subscribers. The task lands here: for each subscriber the tenant may use, one run on
the same stream, whose message is the reply's text and whose `cause` carries the chain of
events from the client's message. APPEND_EVENT does the same for a client's `publish`
(the run's message is the published data). Each (event, subscriber) pair starts at most one run
however often the trigger is delivered (START_TRIGGERED_RUN's dedupe key), and a run
deeper than the tenant's maximum causal depth is refused, which bounds loops (an agent that
answers itself, two agents that answer each other).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from agents import Agent, subscribers
from project.conf import conf
from streams import keys, scripts
from streams.enqueue import RUNS_QUEUE
from streams.events import dumps, new_run_id
from streams.fairness import join_call, quantum
from streams.log import COUNTED_GRACE_S, enqueue_first_task, first_task_message
from streams.redis_clients import as_text
from streams.registry import NEW_TENANT_EPOCH, register
from streams.runs import RUN_RECORD_GRACE_S, RunRecord, RunStore

logger = logging.getLogger(__name__)

# How long an event remembers which subscriber runs it started: longer than any trigger
# message can wait in the queue (the deadline sweep and leases bound those to minutes).
TRIGGER_DEDUPE_TTL_S = 86400


@dataclass(frozen=True, slots=True)
class Triggered:
    """What the trigger did for one subscriber: `started`, `duplicate` (this event had
    already started it), `too_deep`, `forbidden` or `overloaded`."""

    agent: str
    outcome: str
    run_id: str = ""


def start_subscribers(store: RunStore, run_id: str, event_id: str) -> list[Triggered]:
    """Start every agent subscribed to the reply.done `event_id` of run `run_id`."""
    run = store.load(run_id)
    if run is None:
        logger.warning("trigger: run gone before its subscribers started run=%s", run_id)
        return []
    status = store.client.hget(keys.run(run_id), "final_status")
    status_text = as_text(status) if status else None
    if status_text is None:
        logger.warning("trigger: run not finished run=%s event=%s", run_id, event_id)
        return []
    agents = subscribers("reply.done", run.agent, run.stream, status_text)
    if not agents:
        return []
    config = _tenant(run.tenant)
    if config is None or not config.enabled:
        logger.info("trigger: tenant gone or disabled tenant=%s run=%s", run.tenant, run_id)
        return []
    cause = Cause(
        tenant=run.tenant,
        stream=run.stream,
        event_id=event_id,
        # The human origin stays the client whose message began the chain.
        client=run.client,
        message_id=run.message_id,
        text=store.text_of(run_id),
        retention=run.retention,
        depth=run.depth + 1,
        chain=[*run.events_so_far(), event_id],
        trigger={
            "kind": "reply.done",
            "agent": run.agent,
            "run": run.run_id,
            "event": event_id,
            "status": status_text,
        },
    )
    return [_start_one(store, cause, agent, config) for agent in agents]


def start_published_subscribers(
    store: RunStore,
    tenant: str,
    stream: str,
    event_id: str,
    client: str,
    message_id: str,
    data: Any,
) -> list[Triggered]:
    """Start every agent subscribed to a client's `published` event on `stream`. Its
    message is the data: a string as it is, anything else as JSON."""
    agents = subscribers("published", "", stream)
    if not agents:
        return []
    config = _tenant(tenant)
    if config is None or not config.enabled:
        logger.info("trigger: tenant gone or disabled tenant=%s event=%s", tenant, event_id)
        return []
    cause = Cause(
        tenant=tenant,
        stream=stream,
        event_id=event_id,
        client=client,
        message_id=message_id,
        text=data if isinstance(data, str) else dumps(data),
        retention=config.stream_retention,
        depth=1,
        chain=[event_id],
        trigger={"kind": "published", "client": client, "event": event_id, "data": data},
    )
    return [_start_one(store, cause, agent, config) for agent in agents]


@dataclass(frozen=True, slots=True)
class Cause:
    """The event a subscriber's run starts from, and what its run record carries of it."""

    tenant: str
    stream: str
    event_id: str
    client: str
    message_id: str
    text: str
    retention: int
    depth: int  # of the run it starts
    chain: list[str]  # event ids from the client's event to this one
    trigger: dict[str, Any]


def _start_one(store: RunStore, cause: Cause, agent: Agent, config: Any) -> Triggered:
    """Start `agent` for `cause`, once: refused when the tenant may not use it or the chain
    is too deep, a duplicate when this event already started it, else queued."""
    refused = _refusal(cause, agent, config)
    if refused is not None:
        return refused
    run_id = new_run_id(cause.tenant)
    deadline = time.time() + agent.deadline_s
    # With the broker in this Redis the run's first task is queued by the same script (or
    # by the ring's join that follows it: fairness.py).
    message = first_task_message(run_id) if conf().broker_in_streams_redis else ""
    register(store.client, cause.tenant)
    code, started_id, ring_epoch = _start_script(
        cause, agent, config, run_id, deadline, message
    ).run(store.client)
    if ring_epoch:
        if ring_epoch == NEW_TENANT_EPOCH:
            register(store.client, cause.tenant, again=True)
        join_call(cause.tenant, ring_epoch, message).run(store.client)
    return _started(cause, agent, code, started_id, run_id, message)


def _refusal(cause: Cause, agent: Agent, config: Any) -> Triggered | None:
    """Why this tenant's subscription may not start `agent` now, or None."""
    if not config.may_use(agent.name):
        logger.info(
            "trigger: agent not enabled for tenant tenant=%s agent=%s event=%s",
            cause.tenant,
            agent.name,
            cause.event_id,
        )
        return Triggered(agent.name, "forbidden")
    if cause.depth > config.max_causal_depth:
        logger.warning(
            "trigger refused: causal depth %s over the tenant's %s tenant=%s stream=%s "
            "agent=%s event=%s",
            cause.depth,
            config.max_causal_depth,
            cause.tenant,
            cause.stream,
            agent.name,
            cause.event_id,
        )
        return Triggered(agent.name, "too_deep")
    return None


def _start_script(
    cause: Cause, agent: Agent, config: Any, run_id: str, deadline: float, message: str
) -> scripts.StartTriggeredRun:
    """START_TRIGGERED_RUN for the new run: deduplicated by (event, agent), bounded by the
    tenant's queue, put in its fair queue, with the one run record (streams/runs.py)."""
    record = RunRecord(
        run=run_id,
        tenant=cause.tenant,
        stream=cause.stream,
        agent=agent.name,
        client=cause.client,
        message_id=cause.message_id,
        message_event=cause.event_id,
        text=cause.text,
        options={},
        deadline=deadline,
        retention=cause.retention,
        created=time.time(),
        agent_config=config.agent_overrides(agent.name),
        depth=cause.depth,
        chain=cause.chain,
        trigger=cause.trigger,
    )
    return scripts.StartTriggeredRun(
        dedupe_key=keys.trigger(cause.tenant, cause.event_id, agent.name),
        run_key=keys.run(run_id),
        deadlines_key=keys.run_deadlines(cause.tenant),
        queue_key=keys.celery_queue(RUNS_QUEUE),
        queued_key=keys.runs_queued(cause.tenant),
        fair_queue_key=keys.fair_queue(cause.tenant),
        fair_state_key=keys.fair_state(cause.tenant),
        run_id=run_id,
        deadline=f"{deadline:.3f}",
        run_ttl=int(agent.deadline_s + RUN_RECORD_GRACE_S),
        dedupe_ttl=TRIGGER_DEDUPE_TTL_S,
        celery_message=message,
        max_queued=config.max_queued_runs,
        counted_until=f"{deadline + COUNTED_GRACE_S:.3f}",
        fair_tenant=cause.tenant if conf().fair_queue else "",
        fair_weight=quantum(config.weight),
        run_fields=record.fields(),
    )


def _started(
    cause: Cause, agent: Agent, code: int, started_id: str, run_id: str, message: str
) -> Triggered:
    """What the script's answer means, logged; publishes the first task when the broker is
    not this Redis."""
    if code == 0:
        logger.info(
            "trigger: already started tenant=%s agent=%s event=%s run=%s",
            cause.tenant,
            agent.name,
            cause.event_id,
            started_id,
        )
        return Triggered(agent.name, "duplicate", started_id)
    if code == -2:
        logger.warning(
            "trigger refused: tenant's run queue is full tenant=%s agent=%s event=%s",
            cause.tenant,
            agent.name,
            cause.event_id,
        )
        return Triggered(agent.name, "overloaded")
    if not message:
        # Another broker: published after the script; a crash in between leaves the run
        # queued, and the deadline sweep still ends it with its reply.done.
        enqueue_first_task(run_id)
    logger.info(
        "run started by subscription tenant=%s stream=%s agent=%s run=%s event=%s depth=%s",
        cause.tenant,
        cause.stream,
        agent.name,
        run_id,
        cause.event_id,
        cause.depth,
    )
    return Triggered(agent.name, "started", run_id)


def _tenant(slug: str) -> Any:
    from tenants.config import tenant_cache

    return tenant_cache.get_sync(slug)
