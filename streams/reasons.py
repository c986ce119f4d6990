"""What a degraded reply.done tells the client of why (its detail's `message`): short,
for people, and free of keys, URLs and a provider's own words, which stay in the worker's
log. The machine-readable code stays in `detail.reason`."""

from __future__ import annotations

# By `detail.reason`, when the failure itself has nothing more precise to say.
MESSAGES = {
    "timeout": "timeout",
    "model_error": "model error",
    "deadline": "no time left before the run's deadline",
    "rate_limited": "model rate limit reached",
    "internal": "internal error",
}


def degraded_message(reason: str, error: BaseException | None = None) -> str:
    """`error`'s own summary (a backend's ModelError: "model not configured", "provider
    error 500") when it has one, else what `reason` stands for."""
    summary = getattr(error, "summary", "")
    if isinstance(summary, str) and summary:
        return summary
    return MESSAGES.get(reason, reason.replace("_", " "))
