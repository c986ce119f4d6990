"""A stream's history as a conversation: each message followed by its reply, with the
reply's status, agent, latency and reason. Pure: rows in, turns out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from history.models import HistoryEntry


@dataclass(frozen=True, slots=True)
class Turn:
    """One run: the message that started it (None for a run another agent's event started)
    and its reply (None while only the message's row is in the range shown)."""

    run_id: str
    message: HistoryEntry | None
    reply: HistoryEntry | None

    @property
    def agent(self) -> str:
        return self.reply.sender.removeprefix("agent:") if self.reply else ""

    @property
    def latency_s(self) -> float | None:
        """From the message to its reply.done, as appended to the stream."""
        if self.message is None or self.reply is None:
            return None
        return (self.reply.created_at - self.message.created_at).total_seconds()

    @property
    def first_seq(self) -> int:
        return min(row.seq for row in (self.message, self.reply) if row is not None)


def turns(entries: Iterable[HistoryEntry]) -> list[Turn]:
    """The entries (one tenant's stream, any order) paired by run, in stream order of each
    run's first row."""
    messages: dict[str, HistoryEntry] = {}
    replies: dict[str, HistoryEntry] = {}
    for entry in entries:
        into = messages if entry.kind == HistoryEntry.MESSAGE else replies
        into[entry.run_id] = entry
    runs = messages.keys() | replies.keys()
    paired = [Turn(run, messages.get(run), replies.get(run)) for run in runs]
    return sorted(paired, key=lambda turn: turn.first_seq)
