"""Gateway-side run operations that are not the hot `send` path."""

from __future__ import annotations

import asyncio

from orchestration.runs import RunStore
from realtime import keys
from realtime.redis_clients import async_client, sync_client


async def cancel_run(tenant: str, client: str, message_id: str) -> tuple[str, str] | None:
    """End the run a client's `send` started with reply.done `cancelled`.

    Returns None when cancelled, else (error code, detail). The model call notices at its
    next append (the run is no longer running) and stops.
    """
    receipt = await async_client().get(keys.client_message(tenant, client, message_id))
    if receipt is None:
        return "not_found", f"no message {message_id!r} from this client"
    parts = receipt.decode().split(" ")
    if len(parts) < 3:
        return "bad_request", f"message {message_id!r} was a publish, not a send"
    run_id = parts[2]
    finished = await asyncio.to_thread(_finalize_cancelled, run_id)
    if not finished:
        return "bad_request", f"run of message {message_id!r} has already finished"
    return None


def _finalize_cancelled(run_id: str) -> bool:
    return RunStore(sync_client()).finalize(run_id, "cancelled", {"reason": "cancelled by client"})
