"""Model-call rate limits per backend: requests and tokens per minute, as providers impose
them, held in Redis token buckets (streams/buckets.py) so one limit binds every worker.

Configured per backend name in `SWITCHBOARD["BACKEND_LIMITS"]`, e.g.
`{"openai": {"rpm": 500, "tpm": 90000}}`; a backend without an entry is not limited. Each
bucket holds one minute's worth (a provider's per-minute quota may be spent at once) and
refills at a sixtieth of it a second. A call costs one request and its estimated tokens.

The parts here are pure except `BackendBudget.take`, one script call per bucket (awaited on
the worker's model-call runtime).
"""

from __future__ import annotations

import math

from streams import keys
from streams.buckets import NEVER, AsyncBuckets, Bucket

# What the limits say (parsed from settings and agents' steps) is streams/rate_limits.py's.
from streams.rate_limits import BackendLimit

# Rough characters per token of English text; only an estimate of what a call will cost.
CHARS_PER_TOKEN = 4


def estimated_tokens(prompt: str) -> int:
    """What a call is charged against `tpm` before it is made: the prompt's tokens, roughly."""
    return max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))


def buckets_for(
    backend: str, limit: BackendLimit, kind: str = "backend"
) -> list[tuple[Bucket, str]]:
    """The buckets of a backend (or, kind "step", of an agent's step for one tenant) with
    what each counts ("requests" or "tokens")."""
    found = []
    if limit.rpm:
        found.append(
            (Bucket(f"{keys.PREFIX}:{kind}:{backend}:rpm", limit.rpm / 60, limit.rpm), "requests")
        )
    if limit.tpm:
        found.append(
            (Bucket(f"{keys.PREFIX}:{kind}:{backend}:tpm", limit.tpm / 60, limit.tpm), "tokens")
        )
    return found


# What a step does about a budget it could not take at once.
WAIT = "wait"
GIVE_UP = "give_up"


def decide(wait_ms: int, seconds_left: float, min_budget_s: float) -> str:
    """WAIT when the budget comes back early enough to still make a useful call before the
    deadline; GIVE_UP (the fallback, reason `rate_limited`) when it never comes back or
    only too late."""
    if wait_ms == NEVER or wait_ms < 0:
        return GIVE_UP
    return WAIT if wait_ms / 1000 <= seconds_left - min_budget_s else GIVE_UP


class BackendBudget:
    """Takes one call's worth (a request and its estimated tokens) from a backend's buckets.

    The buckets are paid one at a time and a paid one is remembered, so a step waiting for
    tokens does not pay for its request again on every try. That over-counts by at most
    one request per waiting step (kept if the step gives up): conservative, never above the
    provider's limit."""

    def __init__(
        self,
        buckets: AsyncBuckets,
        backend: str,
        limit: BackendLimit,
        prompt: str,
        kind: str = "backend",
    ) -> None:
        self._buckets = buckets
        tokens = estimated_tokens(prompt)
        self._unpaid = [
            (bucket, 1 if unit == "requests" else tokens)
            for bucket, unit in buckets_for(backend, limit, kind)
        ]

    async def take(self) -> int:
        """0 when every bucket is paid; else ms until the first unpaid one could be (NEVER:
        it cannot be, e.g. a prompt estimated above a whole minute's tokens)."""
        while self._unpaid:
            bucket, cost = self._unpaid[0]
            wait_ms = await self._buckets.take([bucket], cost)
            if wait_ms != 0:
                return wait_ms
            self._unpaid.pop(0)
        return 0
