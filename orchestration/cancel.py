"""Gateway-side run operations that are not the hot `send` path."""

from __future__ import annotations

import asyncio

from streams import keys
from streams.redis_clients import as_text, async_client, sync_client
from streams.runs import RunStore


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
