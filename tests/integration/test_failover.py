"""Failover across models on the real cluster: a step whose model fails tries its fallback
models in order before its fixed fallback text, the reply.done names the model that
answered, a model that streamed before failing is voided with reply.restart, a bad request
does not fail over, and a tenant's grant (what the admin saves) chooses its own list.
The models are the fake provider's (tests/fakes/openai_server.py), told apart by name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from tests.fakes.openai_server import Call, FakeOpenAIServer

from .agents_app import catalog as it
from .conftest import SOFT_LIMIT_S, TENANT_KEY, TENANT_KEY_ENV, Connect, Switchboard
from .support import (
    assert_contiguous,
    collect_run,
    reply_text,
    restarts,
    split_run,
    wait_until,
)

pytestmark = pytest.mark.asyncio

FAILURE_WAIT_S = SOFT_LIMIT_S + 15
# Beat's persister runs every 2 s; the bound covers a busy machine (as test_history's).
PERSIST_WAIT_S = 60
_MODEL_OF_REPLY = """
import json
from history.models import HistoryEntry
rows = HistoryEntry.objects.filter(stream={stream!r}, kind="reply.done")
print(json.dumps(list(rows.values_list("model", flat=True))))
"""


async def calls_for(
    provider: FakeOpenAIServer, prompt: str, count: int, timeout: float = 5.0
) -> list[Call]:
    """The provider's calls with this prompt, in order, once `count` of them have ended."""
    return await asyncio.to_thread(
        provider.wait_for_calls, lambda call: call.prompt == prompt, count, timeout, True
    )


async def test_a_model_failing_with_500s_hands_over_to_its_fallback_model(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = unique("failover")
    text = unique("the first model is down")
    ack = await client.send(stream, it.FAILOVER, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == it.FAILOVER_ANSWER
    detail = dict(done["data"]["detail"])
    usage = detail.pop("usage")
    assert detail == {"model": {"backend": "openai", "model": it.FAILOVER_SECOND, "fallback": True}}
    prompt = it.FAILOVER_PROMPT.format(message=text)
    calls = await calls_for(provider, prompt, count=3)
    # The step's own model had its retry, then the fallback model answered, once.
    assert [(call.model, call.outcome) for call in calls] == [
        (it.FAILOVER_PRIMARY, "error"),
        (it.FAILOVER_PRIMARY, "error"),
        (it.FAILOVER_SECOND, "completed"),
    ]
    # Only the answering call used tokens (as the fake reports them): the 500s cost none.
    prompt_tokens = len(prompt.split()) + 10
    assert usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": calls[2].pieces_sent,
        "total": prompt_tokens + calls[2].pieces_sent,
        "estimated": False,
    }
    assert calls[2].text == it.FAILOVER_ANSWER
    assert restarts(events, ack["id"]) == []  # the 500s streamed nothing to void

    # The conversation history keeps which model answered the reply.
    async def reply_row() -> list[str] | None:
        output = await asyncio.to_thread(switchboard.shell, _MODEL_OF_REPLY.format(stream=stream))
        found = json.loads(output.splitlines()[-1])
        return found or None

    assert await wait_until(reply_row, PERSIST_WAIT_S, "the reply's history row", 0.5) == [
        f"openai:{it.FAILOVER_SECOND}"
    ]


async def test_a_model_that_streamed_then_broke_is_voided_before_the_fallbacks_answer(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("failover-cut")
    text = unique("the first model drops mid-answer")
    ack = await client.send(stream, it.FAILOVER_CUT, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"

    prompt = it.FAILOVER_CUT_PROMPT.format(message=text)
    cut, answered = await calls_for(provider, prompt, count=2)
    assert (cut.model, cut.outcome) == (it.FAILOVER_CUT_PRIMARY, "disconnected")
    assert len(cut.sent) == it.FAILOVER_CUT_PIECES_BEFORE
    # What the first model streamed reached the client, then one reply.restart voided it
    # and the fallback's whole answer streamed from offset 0: never the two spliced.
    [restart] = restarts(events, ack["id"])
    assert restart["data"]["reason"] == "failover"
    before = [e for e in events if e["kind"] == "reply.delta" and e["seq"] < restart["seq"]]
    assert "".join(e["data"]["text"] for e in before) == cut.text
    assert reply_text(deltas, done) == it.FAILOVER_CUT_ANSWER == answered.text
    assert done["data"]["detail"]["model"] == {
        "backend": "openai",
        "model": it.FAILOVER_CUT_SECOND,
        "fallback": True,
    }


async def test_when_every_model_fails_the_step_gives_its_fallback_text(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("failover-down")
    text = unique("every provider is down")
    ack = await client.send(stream, it.FAILOVER_DOWN, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    assert reply_text(deltas, done) == it.FAILOVER_DOWN_FALLBACK
    # The reason is the last model's.
    assert done["data"]["detail"] == {"reason": "model_error", "message": "provider error 502"}
    prompt = it.FAILOVER_DOWN_PROMPT.format(message=text)
    calls = await calls_for(provider, prompt, count=2)
    assert [call.model for call in calls] == list(it.FAILOVER_DOWN_MODELS)


async def test_a_bad_request_is_not_sent_to_the_fallback_model(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("failover-bad")
    text = unique("a request no model would take")
    ack = await client.send(stream, it.FAILOVER_BAD, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "degraded"
    assert reply_text(deltas, done) == it.FAILOVER_BAD_FALLBACK
    assert done["data"]["detail"] == {"reason": "model_error", "message": "provider error 400"}
    prompt = it.FAILOVER_BAD_PROMPT.format(message=text)
    [call] = await calls_for(provider, prompt, count=1)
    assert call.model == it.FAILOVER_BAD_PRIMARY
    assert provider.calls_where(lambda call: call.model == it.FAILOVER_BAD_SECOND) == []


async def test_a_tenants_grant_lists_its_own_fallback_models(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    tenant = unique("failover-tenant")
    model = "stream?text=the+tenant's+fallback&pieces=2"
    base_url = provider.base_url.removesuffix("/v1") + f"/tenants/{tenant}/v1"
    fallbacks = [
        {"backend": "openai", "model": model, "base_url": base_url, "api_key_env": TENANT_KEY_ENV}
    ]
    # What the admin saves: the row, validated as its form does.
    await asyncio.to_thread(
        switchboard.shell,
        "from tenants.models import Tenant, TenantAgent\n"
        f"tenant = Tenant.objects.create(slug={tenant!r})\n"
        f"grant = TenantAgent(tenant=tenant, agent={it.FAILOVER_TENANT!r}, "
        f"fallbacks={json.loads(json.dumps(fallbacks))!r})\n"
        "grant.full_clean()\n"
        "grant.save()\n",
    )
    client = await connect(tenant=tenant)
    stream = unique("chat")
    text = unique("my own fallback")
    ack = await client.send(stream, it.FAILOVER_TENANT, text)
    events = await collect_run(client, stream, ack["id"], timeout=FAILURE_WAIT_S)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == "the tenant's fallback"
    detail = dict(done["data"]["detail"])
    assert detail.pop("usage")["estimated"] is False
    assert detail == {"model": {"backend": "openai", "model": model, "fallback": True}}
    prompt = it.FAILOVER_TENANT_PROMPT.format(message=text)
    own, theirs = await calls_for(provider, prompt, count=2)
    assert own.model == it.FAILOVER_TENANT_PRIMARY
    # The tenant's list replaced the code's: its model, its endpoint, its key.
    assert theirs.model == model
    assert theirs.path == f"/tenants/{tenant}/v1/chat/completions"
    assert theirs.header("Authorization") == f"Bearer {TENANT_KEY}"
    assert (
        provider.calls_where(
            lambda call: call.prompt == prompt and call.model == it.FAILOVER_TENANT_CODE_SECOND
        )
        == []
    )
