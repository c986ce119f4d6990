"""Agents over the real cluster and a fake model provider: the "openai" backend streaming
from tests/fakes/openai_server.py through a real worker and gateway to real sockets.

Every test reads both sides: the events a client receives, and the calls the provider got
(`provider.calls`: prompt, model, headers, what was streamed and how each call ended). The
test agents are in tests/integration/agents_app (catalog.py says what each one's model
does); `assistant` and `summariser` are the shipped examples (examples/agents.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta

import celery
import pytest

from client.connection import Event, SwitchboardClient
from examples.agents import ASSISTANT_PROMPT, SUMMARY_PROMPT
from streams.enqueue import TRIGGER_TASK
from tests.fakes.openai_server import Call, FakeOpenAIServer

from .agents_app import catalog as it
from .conftest import (
    KEY_PREFIX,
    PROVIDER_KEY,
    PROVIDER_MODEL,
    SOFT_LIMIT_S,
    TENANT,
    TENANT_KEY,
    TENANT_KEY_ENV,
    Connect,
    Switchboard,
)
from .support import (
    assert_contiguous,
    collect_run,
    collect_until,
    reply_text,
    restarts,
    split_run,
    ts,
    wait_until,
)

pytestmark = pytest.mark.asyncio

FAILURE_WAIT_S = SOFT_LIMIT_S + 15
# The tenants' maximum causal depth: SWITCHBOARD_MAX_CAUSAL_DEPTH's default (the test
# cluster does not set it).
DEFAULT_MAX_CAUSAL_DEPTH = 3
RUNS_QUEUE = "switchboard.runs"  # CELERY_TASK_DEFAULT_QUEUE
WORKER = "worker-0"


# --- helpers -----------------------------------------------------------------------------


def prompted(prompt: str) -> Callable[[Call], bool]:
    return lambda call: call.prompt == prompt


async def provider_calls(
    provider: FakeOpenAIServer, prompt: str, count: int = 1, timeout: float = 5.0
) -> list[Call]:
    """The provider's calls with this prompt, once `count` of them have ended (a call's end
    is recorded by the fake just after its last byte, which may be after the reply.done)."""
    return await asyncio.to_thread(provider.wait_for_calls, prompted(prompt), count, timeout, True)


def reply_of(events: list[Event], run_id: str) -> tuple[list[Event], Event]:
    """(deltas, done) of one run among a stream's events, by run id: a run started by a
    subscription carries the same client message id as the run that caused it."""
    mine = [e for e in events if e["kind"].startswith("reply.") and e["data"]["run"] == run_id]
    dones = [e for e in mine if e["kind"] == "reply.done"]
    assert len(dones) == 1, dones
    return [e for e in mine if e["kind"] == "reply.delta"], dones[0]


def is_done_from(agent: str) -> Callable[[Event], bool]:
    return lambda event: event["kind"] == "reply.done" and event["from"] == f"agent:{agent}"


async def quiet_until_marker(client: SwitchboardClient, stream: str) -> list[Event]:
    """Publish a marker and return the stream's events up to it: what was appended after
    the events already taken. The marker's seq is after everything appended before it."""
    marker = await client.publish(stream, {"marker": True})
    events = await collect_until(client, stream, lambda event: event["seq"] == marker["seq"])
    assert events[-1]["kind"] == "published" and events[-1]["data"] == {"marker": True}
    return events[:-1]


async def wait_for_log(switchboard: Switchboard, needle: str, timeout: float = 15.0) -> str:
    """Wait until the worker has logged a line containing `needle`; returns that line."""

    async def logged() -> str | None:
        text = await asyncio.to_thread(switchboard.log, WORKER)
        return next((line for line in text.splitlines() if needle in line), None)

    return await wait_until(logged, timeout, f"the worker to log {needle!r}", interval=0.1)


def trigger_key(tenant: str, event_id: str, agent: str) -> str:
    """Where START_TRIGGERED_RUN keeps the run an event started for a subscriber."""
    return f"{KEY_PREFIX}:trig:{{{tenant}}}:{event_id}:{agent}"


def make_tenant(switchboard: Switchboard, slug: str, **fields: object) -> None:
    switchboard.shell(
        f"from tenants.models import Tenant\nTenant.objects.create(slug={slug!r}, **{fields!r})\n"
    )


# --- one agent, one model call -----------------------------------------------------------


async def test_assistant_streams_its_reply_from_the_provider(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("chat")  # not support:*, so no summariser follows
    text = f"How do I reset my password? ({unique('q')})"
    ack = await client.send(stream, "assistant", text)
    events = await collect_run(client, stream, ack["id"])
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert all(event["from"] == "agent:assistant" for event in (*deltas, done))

    prompt = ASSISTANT_PROMPT.format(message=text)
    [call] = await provider_calls(provider, prompt)
    # The provider's usage (the fake's: the prompt's words + 10, one token a piece).
    prompt_tokens = len(prompt.split()) + 10
    assert done["data"]["detail"] == {
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": call.pieces_sent,
            "total": prompt_tokens + call.pieces_sent,
            "estimated": False,
        }
    }
    assert call.outcome == "completed"
    assert call.path == "/v1/chat/completions"
    assert call.body["stream"] is True
    assert call.body["messages"] == [{"role": "user", "content": prompt}]
    # The step names no model: SWITCHBOARD_OPENAI_MODEL.
    assert call.model == PROVIDER_MODEL
    # The key is read from the variable SWITCHBOARD_OPENAI_API_KEY_ENV names.
    assert call.header("Authorization") == f"Bearer {PROVIDER_KEY}"
    # Streamed, not buffered: each piece the provider sent (150 ms apart) is its own delta.
    assert len(call.sent) == 4
    assert [delta["data"]["text"] for delta in deltas] == call.sent
    assert reply_text(deltas, done) == call.text == prompt
    assert provider.calls_where(prompted(prompt)) == [call]


async def test_a_429_is_retried_after_the_providers_retry_after(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("flaky")
    text = unique("rate limited once")
    ack = await client.send(stream, it.FLAKY, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"

    prompt = it.FLAKY_PROMPT.format(message=text)
    first, second = await provider_calls(provider, prompt, count=2)
    assert (first.outcome, second.outcome) == ("error", "completed")
    assert len(provider.calls_where(prompted(prompt))) == 2
    # The retry came no sooner than the provider asked (our own backoff here is 0.05 s).
    assert second.started_at - first.started_at >= it.FLAKY_RETRY_AFTER_S
    # The 429 streamed nothing: the reply is the retry's, once.
    assert [delta["data"]["text"] for delta in deltas] == second.sent
    assert reply_text(deltas, done) == prompt


async def test_a_stream_cut_mid_reply_restarts_the_reply_and_never_splices_two_answers(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("cut")
    text = unique("the connection drops after two pieces")
    ack = await client.send(stream, it.CUT, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"

    prompt = it.CUT_PROMPT.format(message=text)
    cut, retried = await provider_calls(provider, prompt, count=2)
    assert (cut.outcome, retried.outcome) == ("disconnected", "completed")
    assert len(cut.sent) == it.CUT_PIECES_BEFORE
    # The first answer's pieces reached the client, then one reply.restart voided them, and
    # the second answer (a different text) streamed from offset 0: the reply is the second
    # answer alone, never the first one's prefix glued to the rest of the second.
    [restart] = restarts(events, ack["id"])
    assert restart["data"]["run"] == done["data"]["run"]
    assert restart["data"]["reason"] == "retry"
    before = [e for e in events if e["kind"] == "reply.delta" and e["seq"] < restart["seq"]]
    assert "".join(e["data"]["text"] for e in before) == "".join(cut.sent)
    assert retried.text == it.CUT_RETRY_TEXT
    assert [delta["data"]["text"] for delta in deltas] == retried.sent
    assert reply_text(deltas, done) == it.CUT_RETRY_TEXT


async def test_a_stalled_call_ends_at_its_soft_limit_with_the_fallback(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("stall")
    text = unique("the model goes quiet")
    ack = await client.send(stream, it.STALL, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    detail = dict(done["data"]["detail"])
    # Cut off before the provider's usage chunk: what it used is estimated from what it sent.
    assert detail.pop("usage")["estimated"] is True
    assert detail == {"reason": "timeout", "message": "timeout"}

    [call] = await provider_calls(provider, it.STALL_PROMPT.format(message=text))
    # The worker closed the connection: the stalled call did not hold on to it.
    assert call.outcome == "client_closed"
    assert len(call.sent) == 1
    # What streamed before the stall stays; the fallback follows it.
    assert reply_text(deltas, done) == call.text + "\n" + it.STALL_FALLBACK
    # A lower bound only (server timestamps): it waited for the step's soft limit.
    assert ts(done) - ts(events[0]) >= timedelta(seconds=it.STALL_SOFT_LIMIT_S)


async def test_cancel_closes_the_stalled_provider_call(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("hang")
    text = unique("cancelled while the model is quiet")
    ack = await client.send(stream, it.HANG, text)
    # The first piece arrived: the call is open and stalled after it.
    first = await collect_until(client, stream, lambda event: event["kind"] == "reply.delta")
    prompt = it.HANG_PROMPT.format(message=text)
    [call] = provider.calls_where(prompted(prompt))
    assert call.outcome is None

    await client.cancel(ack["id"])
    events = first + await collect_run(client, stream, ack["id"])
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "cancelled"
    assert reply_text(deltas, done) == call.sent[0]
    # The provider sees the connection closed within seconds, long before the step's soft
    # limit (HANG_SOFT_LIMIT_S) would have ended the call.
    await provider_calls(provider, prompt, timeout=it.HANG_SOFT_LIMIT_S / 2)
    assert call.outcome == "client_closed"
    assert provider.calls_where(prompted(prompt)) == [call]


# --- pipelines of steps ------------------------------------------------------------------


async def test_a_chain_streams_only_its_visible_steps(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("chain")
    text = unique("route me")
    ack = await client.send(stream, it.CHAIN, text)
    events = await collect_run(client, stream, ack["id"])
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    # Both model steps' usage, as the provider reported it, added up across the steps.
    usage = done["data"]["detail"]["usage"]
    assert usage["estimated"] is False

    [route] = await provider_calls(provider, it.CHAIN_ROUTE_PROMPT.format(message=text))
    assert route.model == it.CHAIN_ROUTE_MODEL
    assert route.text == it.CHAIN_ROUTE_TEXT
    # The answer step was asked with the route step's output.
    answer_prompt = it.CHAIN_ANSWER_PROMPT.format(route=route.text, message=text)
    [answer] = await provider_calls(provider, answer_prompt)
    assert answer.model == it.CHAIN_ANSWER_MODEL
    assert answer.started_at > route.started_at
    calls = (route, answer)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        sum(len(call.prompt.split()) + 10 for call in calls),
        sum(call.pieces_sent for call in calls),
    )

    # The reply: the answer's pieces as they streamed, then the check step's text.
    assert [delta["data"]["text"] for delta in deltas] == [*answer.sent, it.CHAIN_CHECKED]
    assert reply_text(deltas, done) == answer.text + it.CHAIN_CHECKED
    # The hidden step's output is in no event on the stream, then or later.
    everything = events + await quiet_until_marker(client, stream)
    assert it.CHAIN_ROUTE_TEXT not in json.dumps(everything)


async def test_a_failed_step_that_continues_gives_its_fallback_to_the_next(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("route-fails")
    text = unique("no topic")
    ack = await client.send(stream, it.ROUTE_FAILS, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    detail = dict(done["data"]["detail"])
    # Only the answer step's call used tokens: the failed one was refused outright.
    assert detail.pop("usage")["estimated"] is False
    assert detail == {"reason": "model_error", "message": "model error", "step": "route"}

    # The hidden step's fallback fed the answer step (which echoes its prompt) and was not
    # streamed itself.
    answer_prompt = it.ROUTE_FAILS_ANSWER_PROMPT.format(route=it.ROUTE_FAILS_FALLBACK, message=text)
    assert reply_text(deltas, done) == answer_prompt

    # A 400 is permanent: asked once, not retried.
    route_prompt = it.ROUTE_FAILS_ROUTE_PROMPT.format(message=text)
    [route] = await provider_calls(provider, route_prompt)
    assert route.outcome == "error"
    [answer] = await provider_calls(provider, answer_prompt)
    assert answer.text == answer_prompt
    assert answer.started_at > route.started_at


async def test_a_steps_rate_limit_binds_per_tenant_and_answers_at_once_when_spent(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    # Fresh tenants: the step's budget is per tenant and lasts the cluster's lifetime.
    first_tenant, second_tenant = unique("metered-a"), unique("metered-b")
    make_tenant(switchboard, first_tenant)
    make_tenant(switchboard, second_tenant)
    client = await connect(tenant=first_tenant)
    stream = unique("metered")
    texts = [unique("first"), unique("second")]
    dones = []
    for text in texts:
        ack = await client.send(stream, it.METERED, text)
        _, done = split_run(await collect_run(client, stream, ack["id"]), ack["id"])
        dones.append(done["data"])
    assert dones[0]["status"] == "ok"
    assert (dones[1]["status"], dones[1]["text"], dones[1]["detail"]) == (
        "degraded",
        it.METERED_FALLBACK,
        {"reason": "rate_limited", "message": "model rate limit reached"},
    )
    # The spent call never reached the provider.
    assert provider.calls_where(prompted(it.METERED_PROMPT.format(message=texts[1]))) == []

    other = await connect(tenant=second_tenant)
    text = unique("another tenant")
    ack = await other.send(stream, it.METERED, text)
    _, done = split_run(await collect_run(other, stream, ack["id"]), ack["id"])
    assert done["data"]["status"] == "ok"
    [call] = await provider_calls(provider, it.METERED_PROMPT.format(message=text))
    assert call.outcome == "completed"


# --- agents triggered by agents ----------------------------------------------------------


async def test_an_assistant_reply_on_a_support_stream_starts_one_summariser(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    sender = unique("customer")
    client = await connect(client=sender)
    stream = f"support:{unique('case')}"
    text = unique("My invoice is wrong")
    ack = await client.send(stream, "assistant", text)
    events = await collect_until(client, stream, is_done_from("summariser"))
    assert_contiguous(events)
    message = events[0]
    assert message["id"] == ack["event_id"]
    assistant_done = next(e for e in events if is_done_from("assistant")(e))
    assistant_text = assistant_done["data"]["text"]
    assert assistant_text == ASSISTANT_PROMPT.format(message=text)

    summary_run = events[-1]["data"]["run"]
    assert summary_run != assistant_done["data"]["run"]
    deltas, done = reply_of(events, summary_run)
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == SUMMARY_PROMPT.format(input=assistant_text)
    # It began after the reply that caused it, on the same stream.
    assert deltas[0]["seq"] > assistant_done["seq"]
    for event in (*deltas, done):
        assert event["stream"] == stream
        assert event["from"] == "agent:summariser"
        assert event["cause"] == {
            "client": sender,
            "message": ack["id"],
            "prev": assistant_done["id"],
            "depth": 1,
            "chain": [ack["event_id"], assistant_done["id"]],
        }

    # Exactly one: the event started one summariser run, and it made one call.
    redis = switchboard.redis()
    started = redis.get(trigger_key(TENANT, assistant_done["id"], "summariser"))
    assert started == summary_run.encode()
    summary_prompt = SUMMARY_PROMPT.format(input=assistant_text)
    assert len(await provider_calls(provider, summary_prompt)) == 1
    later = await quiet_until_marker(client, stream)
    assert [e for e in later if e["kind"].startswith("reply.")] == []


async def test_a_stream_the_subscription_does_not_match_starts_no_summariser(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    # Near the pattern "support:*", not in it.
    stream = f"support-{unique('case')}"
    text = unique("Where is my parcel?")
    ack = await client.send(stream, "assistant", text)
    events = await collect_run(client, stream, ack["id"])
    _, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assistant_prompt = ASSISTANT_PROMPT.format(message=text)
    assert len(await provider_calls(provider, assistant_prompt)) == 1

    # A control, sent only now, on a stream that does match: its summariser is queued
    # behind anything that reply.done could have queued (the trigger task is pushed in the
    # reply.done's own transaction; both the Celery queue and the tenant's run queue are
    # FIFO), so once the control's summary has streamed, a summariser of the first reply
    # would at least have been started and have called the provider.
    control_stream = f"support:{unique('control')}"
    await client.send(control_stream, "assistant", unique("control question"))
    await collect_until(client, control_stream, is_done_from("summariser"))

    redis = switchboard.redis()
    assert redis.exists(trigger_key(TENANT, done["id"], "summariser")) == 0
    summary_prompt = SUMMARY_PROMPT.format(input=done["data"]["text"])
    assert provider.calls_where(prompted(summary_prompt)) == []
    assert provider.calls_where(prompted(assistant_prompt))[0].outcome == "completed"
    # Nothing more was appended to the first stream.
    assert await quiet_until_marker(client, stream) == []


async def test_a_published_event_starts_its_subscriber_once_even_when_published_twice(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = f"inbox:{unique('tickets')}"
    data = {"ticket": unique("printer on fire")}
    await client.subscribe(stream)  # a publish, unlike a send, does not subscribe
    published = await client.publish(stream, data, id="ticket-1")
    # The client's retry of the same publish (same id) is a duplicate: nothing starts again.
    again = await client.publish(stream, data, id="ticket-1")
    assert again["duplicate"] and again["seq"] == published["seq"]

    done = await collect_until(client, stream, is_done_from(it.INTAKE), timeout=15)
    reply = done[-1]
    assert reply["data"]["status"] == "ok"
    message = json.dumps(data, separators=(",", ":"))
    assert reply["data"]["text"] == it.INTAKE_PROMPT.format(message=message)
    assert reply["cause"] == {
        "client": client.client,
        "message": "ticket-1",
        "prev": published["event_id"],
        "depth": 1,
        "chain": [published["event_id"]],
    }
    events = done + await quiet_until_marker(client, stream)
    assert len([e for e in events if e["kind"] == "reply.done"]) == 1
    [call] = await provider_calls(provider, it.INTAKE_PROMPT.format(message=message))
    assert call.outcome == "completed"


async def test_a_trigger_delivered_twice_starts_its_subscriber_once(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = f"support:{unique('twice')}"
    text = unique("Can I change my plan?")
    await client.send(stream, "assistant", text)
    events = await collect_until(client, stream, is_done_from("summariser"))
    assistant_done = next(e for e in events if is_done_from("assistant")(e))
    summary_run = events[-1]["data"]["run"]

    # The same trigger again, as a broker redelivery would bring it, through Celery's own
    # client (not our Lua enqueue).
    def deliver_again() -> None:
        app = celery.Celery("it-redelivery", broker=switchboard.redis_url, set_as_current=False)
        app.conf.broker_transport_options = {"global_keyprefix": f"{KEY_PREFIX}:celery:"}
        try:
            app.send_task(
                TRIGGER_TASK,
                args=[assistant_done["data"]["run"], assistant_done["id"]],
                queue=RUNS_QUEUE,
            )
        finally:
            app.close()

    await asyncio.to_thread(deliver_again)
    # The worker found the run this event had already started, and started nothing.
    await wait_for_log(
        switchboard,
        f"trigger: already started tenant={TENANT} agent=summariser "
        f"event={assistant_done['id']} run={summary_run}",
    )

    # The duplicate has been handled: nothing new on the stream, no second call.
    later = await quiet_until_marker(client, stream)
    assert [e for e in later if e["kind"].startswith("reply.")] == []
    summary_prompt = SUMMARY_PROMPT.format(input=assistant_done["data"]["text"])
    assert len(provider.calls_where(prompted(summary_prompt))) == 1
    started = switchboard.redis().get(trigger_key(TENANT, assistant_done["id"], "summariser"))
    assert started == summary_run.encode()


@pytest.mark.parametrize("max_depth", [DEFAULT_MAX_CAUSAL_DEPTH, 1])
async def test_agents_answering_each_other_stop_at_the_tenants_causal_depth(
    switchboard: Switchboard,
    connect: Connect,
    unique: Callable[[str], str],
    max_depth: int,
) -> None:
    tenant = TENANT
    if max_depth != DEFAULT_MAX_CAUSAL_DEPTH:
        tenant = unique("shallow")
        await asyncio.to_thread(make_tenant, switchboard, tenant, max_causal_depth=max_depth)
    sender = unique("looper")
    client = await connect(client=sender, tenant=tenant)
    stream = f"loop:{unique('pingpong')}"
    text = unique("serve")
    ack = await client.send(stream, it.PING, text)

    # The run one deeper than the tenant allows is refused, and that ends the loop.
    refused_agent = it.PING if max_depth % 2 else it.PONG
    await wait_for_log(
        switchboard,
        f"trigger refused: causal depth {max_depth + 1} over the tenant's {max_depth} "
        f"tenant={tenant} stream={stream} agent={refused_agent} ",
    )
    events = await quiet_until_marker(client, stream)
    assert_contiguous(events)
    assert events[0]["id"] == ack["event_id"]
    dones = [e for e in events if e["kind"] == "reply.done"]
    assert len(dones) == max_depth + 1
    expected_text, chain, prev = text, [ack["event_id"]], ack["event_id"]
    for depth, done in enumerate(dones):
        agent, prompt = (it.PING, it.PING_PROMPT) if depth % 2 == 0 else (it.PONG, it.PONG_PROMPT)
        expected_text = prompt.format(input=expected_text)
        assert done["from"] == f"agent:{agent}"
        assert done["data"]["status"] == "ok"
        assert reply_text(*reply_of(events, done["data"]["run"])) == expected_text
        cause = {"client": sender, "message": ack["id"], "prev": prev}
        if depth:
            cause |= {"depth": depth, "chain": list(chain)}
        assert done["cause"] == cause
        chain.append(done["id"])
        prev = done["id"]


# --- a tenant's own model and key --------------------------------------------------------


async def test_a_tenants_agent_grant_chooses_the_model_key_and_endpoint(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    tenant = unique("byok")
    model = "stream?text=overridden"
    base_url = provider.base_url.removesuffix("/v1") + f"/tenants/{tenant}/v1"
    grant = {"model": model, "api_key_env": TENANT_KEY_ENV, "base_url": base_url}
    await asyncio.to_thread(
        switchboard.shell,
        "from tenants.models import Tenant, TenantAgent\n"
        f"tenant = Tenant.objects.create(slug={tenant!r})\n"
        f"TenantAgent.objects.create(tenant=tenant, agent='assistant', **{grant!r})\n",
    )
    client = await connect(tenant=tenant)
    stream = unique("chat")
    text = unique("Use my own key")
    ack = await client.send(stream, "assistant", text)
    events = await collect_run(client, stream, ack["id"])
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == "overridden"

    [call] = await provider_calls(provider, ASSISTANT_PROMPT.format(message=text))
    assert call.model == model
    assert call.header("Authorization") == f"Bearer {TENANT_KEY}"
    assert call.path == f"/tenants/{tenant}/v1/chat/completions"
