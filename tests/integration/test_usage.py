"""Token usage and budgets over the real cluster and the fake OpenAI-compatible provider:
the provider's usage in reply.done, in Prometheus (scraped from a gateway's /metrics, as
the worker's pool process counted it) and in the tenant's counters; a tenant whose daily
budget is spent is refused its next send with budget_exhausted and when it resets, while
the run that spent it finished."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from client.connection import SwitchboardError
from examples.agents import ASSISTANT_PROMPT
from tests.fakes.openai_server import FakeOpenAIServer

from .conftest import PROVIDER_MODEL, Connect, Switchboard
from .support import collect_run, split_run, wait_until
from .test_agents import provider_calls
from .test_metrics import scrape, value

pytestmark = pytest.mark.asyncio

BUDGETED_TENANT = "budgeted"
DAILY_BUDGET = 20


def reported_usage(prompt: str, pieces: int) -> dict[str, object]:
    """What the fake provider reports for a call (tests/fakes/openai_server.py)."""
    prompt_tokens = len(prompt.split()) + 10
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": pieces,
        "total": prompt_tokens + pieces,
        "estimated": False,
    }


def tokens_today(switchboard: Switchboard, tenant: str) -> int:
    day = datetime.now(UTC).strftime("%Y%m%d")
    key = f"{switchboard.key_prefix}:tokens:{{{tenant}}}:day:{day}"
    return int(switchboard.redis().get(key) or 0)


async def test_the_providers_usage_reaches_reply_done_the_counters_and_metrics(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = unique("usage")
    text = f"How many tokens is this? ({unique('q')})"
    labels = {"tenant": "acme", "agent": "assistant", "model": PROVIDER_MODEL}
    before = await scrape(switchboard)
    counted_before = tokens_today(switchboard, "acme")

    ack = await client.send(stream, "assistant", text)
    _, done = split_run(await collect_run(client, stream, ack["id"]), ack["id"])
    prompt = ASSISTANT_PROMPT.format(message=text)
    [call] = await provider_calls(provider, prompt)
    assert call.body["stream_options"] == {"include_usage": True}
    usage = reported_usage(prompt, call.pieces_sent)
    assert done["data"]["status"] == "ok"
    assert done["data"]["detail"] == {"usage": usage}
    # The tenant's counter grew by at least this run's tokens (other tests run meanwhile).
    assert tokens_today(switchboard, "acme") - counted_before >= usage["total"]  # type: ignore[operator]

    async def counted() -> bool:
        now = await scrape(switchboard)
        grew = {
            kind: value(now, "switchboard_tokens_total", kind=kind, **labels)
            - value(before, "switchboard_tokens_total", kind=kind, **labels)
            for kind in ("prompt", "completion")
        }
        return (
            grew["prompt"] >= usage["prompt_tokens"]
            and grew["completion"]
            >= usage[  # type: ignore[operator]
                "completion_tokens"
            ]
        )

    await wait_until(counted, 15, "the tokens counted in /metrics")


async def test_a_spent_daily_budget_refuses_the_next_send_until_it_resets(
    switchboard: Switchboard,
    connect: Connect,
    provider: FakeOpenAIServer,
    unique: Callable[[str], str],
) -> None:
    switchboard.shell(
        "from tenants.models import Tenant\n"
        f"Tenant.objects.update_or_create(slug={BUDGETED_TENANT!r}, "
        f"defaults={{'daily_token_budget': {DAILY_BUDGET}}})\n"
    )
    client = await connect(tenant=BUDGETED_TENANT)
    stream = unique("budget")
    # Nothing spent yet: accepted, and the run finishes whatever it spends (more than the
    # budget: the prompt alone is over 20 tokens as the fake counts them).
    ack = await client.send(stream, "assistant", unique("a long enough question"))
    _, done = split_run(await collect_run(client, stream, ack["id"]), ack["id"])
    assert done["data"]["status"] == "ok"
    assert done["data"]["detail"]["usage"]["total"] >= DAILY_BUDGET
    assert tokens_today(switchboard, BUDGETED_TENANT) >= DAILY_BUDGET

    seq_key = f"{switchboard.key_prefix}:s:{{{BUDGETED_TENANT}}}:{stream}:seq"
    seq_before = switchboard.redis().get(seq_key)
    with pytest.raises(SwitchboardError) as refused:
        await client.send(stream, "assistant", "one more", id="over-budget")
    error = refused.value
    assert (error.code, error.status, error.frame["id"]) == ("budget_exhausted", 429, "over-budget")
    assert error.frame["period"] == "day"
    now = datetime.now(UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    assert error.frame["resets_at"] == midnight.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error.retry_after_ms is not None
    assert 0 < error.retry_after_ms <= (midnight - now).total_seconds() * 1000 + 1000
    # Refused means not applied: nothing was appended to the stream.
    assert switchboard.redis().get(seq_key) == seq_before
    # Another tenant is not concerned.
    other = await connect()
    await other.send(unique("elsewhere"), "echo", "still fine")
