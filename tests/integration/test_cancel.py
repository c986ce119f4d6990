"""`cancel` over real processes: the run ends with one reply.done `cancelled`, its model
call is abandoned at once (the worker process is free again long before the call would
have ended), nothing of it is appended afterwards, and cancels that cannot be honoured get
a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from client.connection import SwitchboardClient, SwitchboardError

from .conftest import KEY_PREFIX, SOFT_LIMIT_S, TENANT, Connect, Switchboard
from .support import collect_run, collect_until, reply_text, split_run, wait_until

pytestmark = pytest.mark.asyncio

FAILURE_WAIT_S = SOFT_LIMIT_S + 15
# Far longer than the soft limit: these calls end at the soft limit or when cancelled.
STALL_MS = 600_000


def run_key(switchboard: Switchboard, client: SwitchboardClient, message_id: str) -> str:
    assert client.client is not None
    receipt = switchboard.redis().get(
        f"{KEY_PREFIX}:m:{{{TENANT}}}:{len(client.client)}:{client.client}:{message_id}"
    )
    assert receipt is not None, "an acknowledged send has its dedupe receipt"
    run_id = receipt.decode().split(" ")[2]
    return f"{KEY_PREFIX}:run:{{{TENANT}}}:{run_id}"


async def wait_for_status(switchboard: Switchboard, key: str, status: bytes) -> None:
    redis = switchboard.redis()

    async def reached() -> bool:
        return redis.hget(key, "status") == status

    await wait_until(reached, timeout=15, what=f"{key} to be {status.decode()}")


async def wait_for_idle_worker(switchboard: Switchboard) -> None:
    """No step of an earlier test still holds a worker process."""
    redis = switchboard.redis()

    async def idle() -> bool:
        return redis.zcard(f"{KEY_PREFIX}:runs:{{{TENANT}}}:leases") == 0

    await wait_until(idle, timeout=FAILURE_WAIT_S, what="the worker to be idle")


async def test_cancel_of_a_stalled_call_frees_its_worker_at_once(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    """The worker has two processes. One holds a control call that stalls until the soft
    limit; the other a call we cancel. A run sent after the cancel can only use the
    cancelled call's process, and it completes while the control call, started first,
    is still stalled: the cancelled call did not run to its soft limit."""
    await wait_for_idle_worker(switchboard)
    client = await connect()
    stream, control_stream = unique("cancel"), unique("control")

    control = await client.send(control_stream, "echo", "control", {"latency_ms": STALL_MS})
    control_key = run_key(switchboard, client, control["id"])
    await wait_for_status(switchboard, control_key, b"running")

    # The first piece comes at once, the next only after the soft limit.
    doomed = await client.send(
        stream, "echo", "doomed reply", {"chunks": 4, "chunk_delay_ms": STALL_MS}
    )
    before_cancel = await collect_until(
        client, stream, lambda event: event["kind"] == "reply.delta"
    )
    await client.cancel(doomed["id"])

    after = await client.send(stream, "echo", "after the cancel")
    events = before_cancel + await collect_run(client, stream, after["id"], timeout=15)
    assert switchboard.redis().hget(control_key, "status") == b"running", (
        "the run after the cancel should have finished while the control call still stalled"
    )

    deltas, done = split_run(events, doomed["id"])
    assert done["data"]["status"] == "cancelled"
    assert done["data"]["detail"] == {"reason": "cancelled by client"}
    assert reply_text(deltas, done) == "doo"
    doomed_events = [e for e in events if e["cause"]["message"] == doomed["id"]]
    assert doomed_events[-1] is done, "nothing of the cancelled run after its reply.done"
    _, after_done = split_run(events, after["id"])
    assert after_done["data"]["status"] == "ok"

    # The control call ends at its soft limit as usual.
    control_events = await collect_run(client, control_stream, control["id"], FAILURE_WAIT_S)
    _, control_done = split_run(control_events, control["id"])
    assert control_done["data"]["status"] == "degraded"
    # And the cancelled run's log holds nothing after its reply.done either.
    log = [
        entry
        for _, fields in switchboard.redis().xrange(f"{KEY_PREFIX}:s:{{{TENANT}}}:{stream}:log")
        if (entry := json.loads(fields[b"e"]))["cause"]["message"] == doomed["id"]
    ]
    assert [e["kind"] for e in log] == ["message", "reply.delta", "reply.done"]


async def test_cancel_of_an_unknown_id_or_another_clients_send_is_not_found(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    owner, stranger = await connect(), await connect()
    stream = unique("not-yours")
    ack = await owner.send(stream, "echo", "mine", {"latency_ms": 300})
    for message_id in ("never-sent", ack["id"]):
        with pytest.raises(SwitchboardError) as refused:
            await stranger.cancel(message_id)
        assert (refused.value.code, refused.value.status) == ("not_found", 404)
        assert refused.value.frame["id"] == message_id
    # Another client's cancel touched nothing.
    _, done = await owner.reply(ack["id"])
    assert done["data"]["status"] == "ok"


async def test_cancel_of_a_finished_run_says_how_it_ended(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("finished")
    ack = await client.send(stream, "echo", "quick")
    _, done = await client.reply(ack["id"])
    assert done["data"]["status"] == "ok"
    with pytest.raises(SwitchboardError) as late:
        await client.cancel(ack["id"])
    assert (late.value.code, late.value.status) == ("bad_request", 400)
    assert "already finished with status 'ok'" in late.value.frame["detail"]

    slow = await client.send(stream, "echo", "slow", {"latency_ms": STALL_MS})
    await client.cancel(slow["id"])
    with pytest.raises(SwitchboardError) as twice:
        await client.cancel(slow["id"])
    assert "already finished with status 'cancelled'" in twice.value.frame["detail"]
    _, cancelled = await client.reply(slow["id"])
    assert cancelled["data"]["status"] == "cancelled"
    assert (await client.ping())["type"] == "pong"  # the connection stays usable
