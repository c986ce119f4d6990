"""Gateway-side run operations that are not the hot `send` path."""

from __future__ import annotations

import asyncio
from typing import Any

from streams import keys
from streams.redis_clients import as_text, async_client, sync_client
from streams.runs import AsyncRunStore, RunStore


async def cancel_run(tenant: str, client: str, message_id: str) -> tuple[str, str] | None:
    """End the run a client's `send` started with reply.done `cancelled`.

    Returns None when cancelled, else (error code, detail):
    - `not_found`: this client sent no message with that id (or so long ago that its id is
      forgotten); another client's message ids are never visible, so they answer the same;
    - `bad_request`: the id was a `publish`, which starts no run, or the run has already
      finished (the detail names its status: `ok`, `degraded`, `cancelled` or `failed`).

    The worker holding the run hears of it at once (FINALIZE_RUN publishes on its stop
    channel, orchestration/inflight.py) and abandons the call without another write.
    """
    receipt = await async_client().get(keys.client_message(tenant, client, message_id))
    if receipt is None:
        return "not_found", f"no send with id {message_id!r} from this client"
    parts = as_text(receipt).split(" ")
    if len(parts) < 3:
        return "bad_request", f"message {message_id!r} was a publish, which starts no run"
    run_id = parts[2]
    finished, status = await asyncio.to_thread(_finalize_cancelled, run_id)
    if not finished:
        ended = f" with status {status!r}" if status else ""
        return "bad_request", f"the run of message {message_id!r} has already finished{ended}"
    return None


def _finalize_cancelled(run_id: str) -> tuple[bool, str]:
    """(True, "") when this call ended the run; else (False, its final status if known)."""
    store = RunStore(sync_client())
    if store.finalize(run_id, "cancelled", {"reason": "cancelled by client"}):
        return True, ""
    status = store.client.hget(keys.run(run_id), "final_status")
    return False, as_text(status) if status else ""


# What an interrupted run's reply is carried into the next run as (characters): the reply
# is bounded only by its model and deadline, a run's options are kept in its record.
INTERRUPTED_MAX_CHARS = 65_536


async def interrupt_runs(
    tenant: str, client: str, stream: str, inflight_key: str
) -> list[dict[str, Any]]:
    """Cancel `client`'s unfinished runs on `stream` among those a connection counts in
    `inflight_key` (its runs-in-flight set, so at most its in-flight limit), each with its
    one reply.done `cancelled`, as a `cancel` would. Returns what each was cut off at, in
    the order they were sent: {"run", "message" (the text it answered), "text" (its
    reply so far, at most INTERRUPTED_MAX_CHARS), "truncated"}. A run that finished
    meanwhile is left as it ended and not listed. When this returns, every listed run's
    reply.done is in the stream, so a run started after it comes after them in seq order."""
    redis = async_client()
    members: list[Any] = await redis.zrange(inflight_key, 0, -1, withscores=True)
    runs = [as_text(member) for member, _ in sorted(members, key=lambda pair: pair[1])]
    interrupted: list[dict[str, Any]] = []
    for run_id in runs:
        found: list[Any] = await redis.hmget(
            keys.run(run_id), ["client", "stream", "tenant", "text", "status"]
        )
        owner, on_stream, run_tenant, message, status = found
        # Only this client's runs of this tenant on this stream: whatever else the set
        # may hold is never touched.
        if (
            owner is None
            or as_text(owner) != client
            or as_text(on_stream or b"") != stream
            or as_text(run_tenant or b"") != tenant
            or as_text(status or b"") == "done"
        ):
            continue
        finished, _ = await asyncio.to_thread(_finalize_interrupted, run_id)
        if not finished:
            continue
        text = await AsyncRunStore(redis).text_of(run_id)
        interrupted.append(
            {
                "run": run_id,
                "message": as_text(message or b""),
                "text": text[:INTERRUPTED_MAX_CHARS],
                "truncated": len(text) > INTERRUPTED_MAX_CHARS,
            }
        )
    return interrupted


def _finalize_interrupted(run_id: str) -> tuple[bool, str]:
    store = RunStore(sync_client())
    if store.finalize(run_id, "cancelled", {"reason": "interrupted by client"}):
        return True, ""
    return False, ""
