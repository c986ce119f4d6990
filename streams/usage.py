"""Token usage and per-tenant token budgets, as plain data and arithmetic (no I/O here).

- **Usage of a model call**: what the provider reported (OpenAI-compatible streams' final
  `usage` chunk, Anthropic's `message_start`/`message_delta`), or an estimate when it
  reported nothing: `estimate_tokens`, a quarter of the characters, rounded up (about what
  English text costs in the common tokenizers; no tokenizer is shipped, since each model
  has its own). A run's usage adds up every model call it made, failed attempts included
  (a provider bills those too), and says `estimated` when any part was estimated.
- **Budgets**: a tenant may spend so many tokens per UTC day and per UTC calendar month
  (0: no budget). Usage is added to the tenant's counters of the current day and month as
  each model call ends (`streams/lua/add_usage.lua`); a `send` is refused while either
  counter has reached its budget (`streams/lua/accept_send.lua`). Runs already accepted
  finish whatever they spend, so a tenant may end a period somewhat over its budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# A quarter of the characters: the usual rule of thumb for English text.
CHARS_PER_TOKEN = 4
DAY = "day"
MONTH = "month"
# Counters outlive their period by this much, so the live page can still read a period
# that just ended and a clock a little behind another still finds its key.
COUNTER_GRACE_S = 2 * 24 * 3600


def estimate_tokens(text: str) -> int:
    """Tokens `text` probably costs: its characters / CHARS_PER_TOKEN, rounded up."""
    return tokens_for_chars(len(text))


def tokens_for_chars(chars: int) -> int:
    return -(-max(0, chars) // CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one model call (or a whole run) used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.estimated or other.estimated,
        )

    def as_detail(self) -> dict[str, Any]:
        """The run's usage as reply.done's `detail.usage` shows it."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total": self.total,
            "estimated": self.estimated,
        }


def call_usage(
    reported_prompt: int | None,
    reported_completion: int | None,
    prompt_chars: int,
    output_chars: int,
) -> Usage:
    """A call's usage: what the provider reported; each part it did not report estimated
    from the characters of the prompt sent and of the text received."""
    estimated = reported_prompt is None or reported_completion is None
    return Usage(
        reported_prompt if reported_prompt is not None else tokens_for_chars(prompt_chars),
        (
            reported_completion
            if reported_completion is not None
            else tokens_for_chars(output_chars)
        ),
        estimated,
    )


def usage_of(run_fields: Mapping[str, str]) -> Usage | None:
    """A run's usage as ADD_USAGE keeps it in the run's hash; None before its first call."""
    if "usage_prompt" not in run_fields and "usage_completion" not in run_fields:
        return None
    return Usage(
        int(run_fields.get("usage_prompt") or 0),
        int(run_fields.get("usage_completion") or 0),
        run_fields.get("usage_est") == "1",
    )


def usage_from_detail(detail: Any) -> Usage | None:
    """A reply.done's `detail.usage` (Usage.as_detail), if well formed (history reads it)."""
    usage = detail.get("usage") if isinstance(detail, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion, usage.get("estimated") is True)


def token_count(value: Any) -> int | None:
    """A provider's token count, if it is one: a non-negative int, bounded (the field comes
    from the network)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, 10**12)


def with_usage(detail: Any, usage: Usage | None) -> Any:
    """reply.done's detail with the run's usage in it (`None` stays None without usage)."""
    if usage is None:
        return detail
    if detail is None:
        return {"usage": usage.as_detail()}
    if isinstance(detail, dict):
        return {**detail, "usage": usage.as_detail()}
    return detail


# --- budget periods ---------------------------------------------------------------------


def day_label(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d")


def month_label(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m")


def day_resets_at(now: datetime) -> datetime:
    """The next UTC midnight: when today's counter stops counting."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def month_resets_at(now: datetime) -> datetime:
    """The first instant of the next UTC calendar month."""
    now = now.astimezone(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def resets_at(period: str, now: datetime) -> datetime:
    return day_resets_at(now) if period == DAY else month_resets_at(now)


def counter_expires_at(period: str, now: datetime) -> int:
    """Epoch seconds a period's counter is kept until (EXPIREAT)."""
    return int(resets_at(period, now).timestamp()) + COUNTER_GRACE_S


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Budgets:
    """A tenant's token budgets (0: none) as admission checks them."""

    daily: int = 0
    monthly: int = 0

    @property
    def any(self) -> bool:
        return self.daily > 0 or self.monthly > 0


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Which budget refused a send, and when it resets."""

    period: str  # DAY or MONTH
    budget: int
    resets_at: datetime

    def retry_after_ms(self, now: datetime) -> int:
        return max(1, int((self.resets_at - now).total_seconds() * 1000))


def exhausted(period: str, budgets: Budgets, now: datetime) -> Exhausted:
    budget = budgets.daily if period == DAY else budgets.monthly
    return Exhausted(period, budget, resets_at(period, now))
