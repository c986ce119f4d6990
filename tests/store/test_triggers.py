"""Multi-agent workflows on a real Redis (orchestration/triggers.py): a reply.done that an
agent subscribes to queues its trigger with the event, the trigger starts each subscriber
once, and chains stop at the tenant's maximum causal depth."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from agents import Agent, On, Step
from orchestration.triggers import start_published_subscribers, start_subscribers
from streams import keys
from streams.enqueue import PUBLISHED_TRIGGER_TASK, RUNS_QUEUE, TRIGGER_TASK
from streams.runs import RunStore
from tenants.config import tenant_cache
from tenants.models import Tenant, TenantAgent
from tests.store.conftest import TENANT, Streams, execute_step, log_events, of_kind

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def tenant() -> Iterator[Tenant]:
    tenant_cache._entries.clear()
    yield Tenant.objects.create(slug=TENANT, max_causal_depth=2)
    tenant_cache._entries.clear()


@pytest.fixture
def workflow(register_agent: Callable[..., Agent]) -> None:
    register_agent("answer", Step(backend="simulated", name="answer"))
    register_agent(
        "summary",
        Step(backend="simulated", name="summary", prompt="summary of: {input}"),
        subscribes=(On("reply.done", agent="answer", streams="support:*"),),
    )


def queued_tasks(r: redis.Redis) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message in the runs queue, oldest first."""
    found = []
    for raw in reversed(r.lrange(keys.celery_queue(RUNS_QUEUE), 0, -1)):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        found.append((message["headers"]["task"], args))
    return found


def triggers(r: redis.Redis) -> list[list[Any]]:
    return [args for name, args in queued_tasks(r) if name == TRIGGER_TASK]


def finish(streams: Streams, runs: RunStore, stream: str, agent: str = "answer") -> str:
    appended = streams.send(stream, f"m-{time.monotonic_ns()}", "question", agent=agent)
    assert appended.run_id is not None
    run_to_end(runs, appended.run_id)
    return appended.run_id


def run_to_end(runs: RunStore, run_id: str) -> None:
    """The run's steps in order; a finished step has already handed the run to the next
    (and queued its message) by the time it returns."""
    step = 0
    while (outcome := execute_step(runs, run_id, step, 0)).next_step is not None:
        step = outcome.next_step


def done_of(r: redis.Redis, stream: str, run_id: str) -> dict[str, Any]:
    [done] = [e for e in of_kind(log_events(r, stream), "reply.done") if e["data"]["run"] == run_id]
    return done


@pytest.mark.usefixtures("workflow")
def test_a_subscribed_reply_done_queues_its_trigger_with_the_event(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = finish(streams, runs, "support:1")
    done = done_of(r, "support:1", run_id)
    assert triggers(r) == [[run_id, done["id"]]]


@pytest.mark.usefixtures("workflow")
def test_no_trigger_where_no_pattern_matches(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    finish(streams, runs, "sales:1")  # not support:*
    finish(streams, runs, "support:2", agent="echo")  # not from answer
    assert triggers(r) == []


@pytest.mark.usefixtures("workflow")
def test_a_cancelled_reply_triggers_nothing(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    appended = streams.send("support:3", "m-1", "question", agent="answer")
    assert appended.run_id is not None
    assert runs.finalize(appended.run_id, "cancelled", {"reason": "cancelled by client"})
    assert triggers(r) == []


@pytest.mark.usefixtures("workflow")
def test_the_trigger_starts_the_subscriber_once_with_the_chain_in_its_cause(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = finish(streams, runs, "support:4")
    done = done_of(r, "support:4", run_id)
    [started] = start_subscribers(runs, run_id, done["id"])
    assert started.outcome == "started" and started.agent == "summary"
    # Delivered again (a redelivered or repeated task): the same run, nothing new.
    [again] = start_subscribers(runs, run_id, done["id"])
    assert (again.outcome, again.run_id) == ("duplicate", started.run_id)

    run_to_end(runs, started.run_id)
    summary = done_of(r, "support:4", started.run_id)
    message = of_kind(log_events(r, "support:4"), "message")[0]
    assert summary["from"] == "agent:summary"
    assert summary["data"]["text"] == "summary of: question"
    assert summary["cause"] == {
        "client": message["cause"]["client"],
        "message": message["cause"]["message"],
        "prev": done["id"],
        "depth": 1,
        "chain": [message["id"], done["id"]],
    }
    summaries = [e for e in log_events(r, "support:4") if e["from"] == "agent:summary"]
    assert {e["data"]["run"] for e in summaries} == {started.run_id}


def test_a_loop_stops_at_the_tenants_causal_depth(
    streams: Streams, runs: RunStore, r: redis.Redis, register_agent: Callable[..., Agent]
) -> None:
    register_agent(
        "ping", Step(backend="simulated"), subscribes=(On(agent="pong", streams="loop"),)
    )
    register_agent(
        "pong", Step(backend="simulated"), subscribes=(On(agent="ping", streams="loop"),)
    )
    run_id = finish(streams, runs, "loop", agent="ping")
    depths = [0]
    while True:
        done = done_of(r, "loop", run_id)
        [result] = start_subscribers(runs, run_id, done["id"])
        if result.outcome != "started":
            break
        run_id = result.run_id
        run_to_end(runs, run_id)
        depths.append(done_of(r, "loop", run_id)["cause"]["depth"])
    assert result.outcome == "too_deep"
    assert depths == [0, 1, 2]  # the tenant's max_causal_depth is 2
    dones = of_kind(log_events(r, "loop"), "reply.done")
    assert [e["from"] for e in dones] == ["agent:ping", "agent:pong", "agent:ping"]
    assert len(dones[-1]["cause"]["chain"]) == 3


@pytest.mark.usefixtures("workflow")
def test_a_subscriber_the_tenant_may_not_use_is_not_started(
    streams: Streams, runs: RunStore, r: redis.Redis, tenant: Tenant
) -> None:
    TenantAgent.objects.create(tenant=tenant, agent="summary", enabled=False)
    tenant_cache._entries.clear()
    run_id = finish(streams, runs, "support:5")
    [result] = start_subscribers(runs, run_id, done_of(r, "support:5", run_id)["id"])
    assert result.outcome == "forbidden"
    assert not r.exists(keys.trigger(TENANT, done_of(r, "support:5", run_id)["id"], "summary"))


@pytest.mark.usefixtures("workflow")
def test_a_triggered_run_carries_the_tenants_overrides_for_its_agent(
    streams: Streams, runs: RunStore, r: redis.Redis, tenant: Tenant
) -> None:
    TenantAgent.objects.create(tenant=tenant, agent="summary", model="small", api_key_env="K")
    tenant_cache._entries.clear()
    run_id = finish(streams, runs, "support:6")
    [result] = start_subscribers(runs, run_id, done_of(r, "support:6", run_id)["id"])
    loaded = runs.load(result.run_id)
    assert loaded is not None
    assert loaded.agent_config == {"model": "small", "api_key_env": "K"}
    assert (loaded.depth, loaded.trigger and loaded.trigger["agent"]) == (1, "answer")


@pytest.mark.usefixtures("workflow")
def test_a_full_tenant_queue_refuses_the_triggered_run_and_writes_nothing(
    streams: Streams, runs: RunStore, r: redis.Redis, tenant: Tenant
) -> None:
    run_id = finish(streams, runs, "support:7")
    Tenant.objects.filter(pk=tenant.pk).update(max_queued_runs=0)
    tenant_cache._entries.clear()
    event_id = done_of(r, "support:7", run_id)["id"]
    [result] = start_subscribers(runs, run_id, event_id)
    assert result.outcome == "overloaded"
    assert not r.exists(keys.trigger(TENANT, event_id, "summary"))
    # Room again: the same trigger, delivered again, now starts it.
    Tenant.objects.filter(pk=tenant.pk).update(max_queued_runs=10)
    tenant_cache._entries.clear()
    [result] = start_subscribers(runs, run_id, event_id)
    assert result.outcome == "started"


# --- a client's published event ------------------------------------------------------------


@pytest.fixture
def intake(register_agent: Callable[..., Agent]) -> None:
    register_agent(
        "intake",
        Step(backend="simulated", name="read", prompt="new ticket: {message}"),
        subscribes=(On("published", streams="tickets:*"),),
    )


@pytest.mark.usefixtures("intake")
def test_a_published_event_queues_its_trigger_once_with_the_event(
    streams: Streams, r: redis.Redis
) -> None:
    data = {"title": "printer on fire", "priority": 1}
    appended = streams.publish("tickets:1", "p-1", data)
    again = streams.publish("tickets:1", "p-1", data)  # a retry of the same publish
    assert again.duplicate
    published = [args for name, args in queued_tasks(r) if name == PUBLISHED_TRIGGER_TASK]
    assert published == [[TENANT, "tickets:1", appended.event_id, "alice", "p-1", data]]
    # Streams the pattern does not name, and no subscriber at all: nothing queued.
    streams.publish("sales:1", "p-2", data)
    assert len([1 for name, _ in queued_tasks(r) if name == PUBLISHED_TRIGGER_TASK]) == 1


@pytest.mark.usefixtures("intake")
def test_a_published_event_starts_its_subscriber_once_with_the_data_as_message(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    data = {"title": "printer on fire"}
    appended = streams.publish("tickets:2", "p-1", data)
    args = (TENANT, "tickets:2", appended.event_id, "alice", "p-1", data)
    [started] = start_published_subscribers(runs, *args)
    assert started.outcome == "started"
    [again] = start_published_subscribers(runs, *args)
    assert (again.outcome, again.run_id) == ("duplicate", started.run_id)

    run_to_end(runs, started.run_id)
    done = done_of(r, "tickets:2", started.run_id)
    assert done["data"]["text"] == 'new ticket: {"title":"printer on fire"}'
    assert done["cause"] == {
        "client": "alice",
        "message": "p-1",
        "prev": appended.event_id,
        "depth": 1,
        "chain": [appended.event_id],
    }
    loaded = runs.load(started.run_id)
    assert loaded is not None and loaded.trigger == {
        "kind": "published",
        "client": "alice",
        "event": appended.event_id,
        "data": data,
    }


@pytest.mark.usefixtures("intake")
def test_a_tenant_that_allows_no_triggered_run_refuses_published_ones_too(
    streams: Streams, runs: RunStore, tenant: Tenant
) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(max_causal_depth=0)
    tenant_cache._entries.clear()
    appended = streams.publish("tickets:3", "p-1", "plain text")
    [result] = start_published_subscribers(
        runs, TENANT, "tickets:3", appended.event_id, "alice", "p-1", "plain text"
    )
    assert result.outcome == "too_deep"


def test_a_published_pattern_names_no_agent(register_agent: Callable[..., Agent]) -> None:
    from agents import BadAgent

    with pytest.raises(BadAgent, match="published events come from clients"):
        register_agent("bad", subscribes=(On("published", agent="someone"),))
