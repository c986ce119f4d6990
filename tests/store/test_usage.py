"""Token usage and budgets in Redis (streams/tokens.py, ADD_USAGE, ACCEPT_SEND): a run's
usage on its hash and its tenant's day and month counters, with their expiries; a send
refused, leaving no trace, once the tenant's budget for the period is spent; a repeat still
answered with its ack."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis

import agents
from realtime.protocol import Send
from streams import keys
from streams.log import Appended, BudgetExhausted, StreamStore
from streams.tokens import add_usage, counter_keys, tokens_used
from streams.usage import (
    COUNTER_GRACE_S,
    DAY,
    MONTH,
    Budgets,
    Usage,
    day_resets_at,
    usage_of,
)

pytestmark = pytest.mark.asyncio

TENANT = "acme"
OTHER = "globex"


def rid(name: str, tenant: str = TENANT) -> str:
    """A run id of the real form (it names its tenant), made from `name`."""
    return "r" + hashlib.md5(name.encode()).hexdigest() + "." + tenant


@pytest_asyncio.fixture
async def client(r: redis.Redis, store_redis_url: str) -> AsyncIterator[aredis.Redis]:
    connection = aredis.Redis.from_url(store_redis_url)
    yield connection
    await connection.aclose()


async def send(
    store: StreamStore, message_id: str, budgets: Budgets, tenant: str = TENANT
) -> Appended:
    echo = agents.get_agent("echo")
    frame = Send(message_id, "room", echo.name, "hi", {}, None)
    return await store.accept_send(tenant, "alice", frame, echo, budgets=budgets)


def run_fields(r: redis.Redis, run_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.run(run_id)).items()}


async def test_usage_adds_up_on_the_run_and_the_tenants_counters(
    client: aredis.Redis, r: redis.Redis
) -> None:
    store = StreamStore(client)
    run_id = (await send(store, "m-1", Budgets())).run_id or ""
    now = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert await add_usage(client, run_id, TENANT, Usage(10, 5), now) == (15, 15)
    assert await add_usage(client, run_id, TENANT, Usage(3, 2, estimated=True), now) == (20, 20)
    assert usage_of(run_fields(r, run_id)) == Usage(13, 7, estimated=True)
    # Counted per tenant: another's counters are its own.
    await add_usage(client, rid("other", OTHER), OTHER, Usage(1, 1), now)
    assert tokens_used(r, [TENANT, OTHER, "nobody"], now) == {
        TENANT: (20, 20),
        OTHER: (2, 2),
        "nobody": (0, 0),
    }
    # Each counter lives until its period ends, plus the grace.
    day_key, month_key = counter_keys(TENANT, now)
    new_year = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert r.expiretime(day_key) == new_year + COUNTER_GRACE_S
    assert r.expiretime(month_key) == new_year + COUNTER_GRACE_S
    # A run whose record is gone is not created again; its tenant's counters still count.
    await add_usage(client, rid("gone"), TENANT, Usage(1, 0), now)
    assert not r.exists(keys.run(rid("gone")))
    assert tokens_used(r, [TENANT], now)[TENANT] == (21, 21)


async def test_a_new_day_counts_afresh_while_the_month_goes_on(
    client: aredis.Redis, r: redis.Redis
) -> None:
    today = datetime(2026, 12, 4, 12, tzinfo=UTC)
    tomorrow = datetime(2026, 12, 5, 0, 0, 1, tzinfo=UTC)
    await add_usage(client, rid("1"), TENANT, Usage(100, 0), today)
    assert await add_usage(client, rid("2"), TENANT, Usage(0, 10), tomorrow) == (10, 110)


async def test_a_spent_budget_refuses_sends_and_leaves_no_trace(
    client: aredis.Redis, r: redis.Redis
) -> None:
    store = StreamStore(client)
    budgets = Budgets(daily=50, monthly=1000)
    first = await send(store, "m-1", budgets)
    await add_usage(client, first.run_id or "", TENANT, Usage(30, 19))
    second = await send(store, "m-2", budgets)  # 49 < 50: still accepted
    await add_usage(client, second.run_id or "", TENANT, Usage(0, 1))
    with pytest.raises(BudgetExhausted) as refused:
        await send(store, "m-3", budgets)
    spent = refused.value.exhausted
    assert (refused.value.code, spent.period, spent.budget) == ("budget_exhausted", DAY, 50)
    now = datetime.now(UTC)
    assert spent.resets_at == day_resets_at(now)  # the next UTC midnight
    assert 0 < spent.retry_after_ms(now) <= 24 * 3600 * 1000
    # Nothing of the refused send: two messages in the stream, two runs.
    assert int(r.get(keys.stream_seq(TENANT, "room")) or 0) == 2
    assert r.zcard(keys.run_deadlines(TENANT)) == 2
    assert not r.exists(keys.client_message(TENANT, "alice", "m-3"))
    # A repeat of an accepted id still gets its ack; another tenant is not refused.
    again = await send(store, "m-1", budgets)
    assert (again.seq, again.duplicate) == (first.seq, True)
    await send(store, "m-1", budgets, tenant=OTHER)
    # No budget, no refusal, whatever was used.
    await send(store, "m-4", Budgets())


async def test_the_monthly_budget_refuses_when_the_days_are_within_theirs(
    client: aredis.Redis,
) -> None:
    store = StreamStore(client)
    await add_usage(client, rid("1"), TENANT, Usage(500, 500))
    with pytest.raises(BudgetExhausted) as refused:
        await send(store, "m-1", Budgets(daily=5000, monthly=1000))
    assert refused.value.exhausted.period == MONTH
    assert refused.value.exhausted.resets_at.day == 1


async def test_concurrent_usage_is_counted_exactly(client: aredis.Redis, r: redis.Redis) -> None:
    await asyncio.gather(
        *(add_usage(client, rid(str(index)), TENANT, Usage(2, 3)) for index in range(20))
    )
    assert tokens_used(r, [TENANT])[TENANT] == (100, 100)
