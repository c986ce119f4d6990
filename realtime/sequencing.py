"""Per-connection, per-stream ordering: each seq delivered once, in order, none skipped.

Pure logic, no I/O. Live notifications normally arrive in seq order; a gap means one was
missed (a subscription racing its catch-up read, a pub/sub reconnect), and the caller
repairs it from the stream's log with the range `missing()` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StreamCursor:
    """`next_seq` is the first seq not yet delivered; None while the catch-up read runs."""

    next_seq: int | None = None
    max_pending: int = 1024
    pending: dict[int, str] = field(default_factory=dict)
    # Set when pending overflowed: events past the window were dropped and must be re-read.
    overflowed: bool = False
    # The highest seq dropped on overflow: the log is read up to it even when no later
    # event arrives to reveal the gap (the dropped one may be a run's last event).
    dropped_through: int = 0

    def start_at(self, next_seq: int) -> list[str]:
        """Begin delivering at next_seq; returns buffered events that are now deliverable."""
        self.next_seq = next_seq
        for seq in [s for s in self.pending if s < next_seq]:
            del self.pending[seq]
        return self._drain()

    def offer(self, seq: int, event: str) -> list[str]:
        """Accept one event; returns the events deliverable now, in order."""
        if seq == self.next_seq and not self.pending and not self.overflowed:
            self.next_seq = seq + 1  # the common case, on every socket of a fan-out
            return [event]
        if self.next_seq is not None and seq < self.next_seq:
            return []  # already delivered: a duplicate from a repair read or a replay
        if seq in self.pending:
            return []
        # The next expected seq is always taken: it drains the window rather than growing
        # it, and refusing it would leave a repair re-reading the same gap forever.
        if len(self.pending) >= self.max_pending and seq != self.next_seq:
            self.overflowed = True
            self.dropped_through = max(self.dropped_through, seq)
            return []
        self.pending[seq] = event
        return self._drain() if self.next_seq is not None else []

    def missing(self) -> tuple[int, int] | None:
        """The inclusive seq range to read from the log to close a gap, if there is one."""
        if self.next_seq is None:
            return None
        if self.pending:
            return self.next_seq, min(self.pending) - 1
        if self.overflowed:
            return self.next_seq, self.dropped_through
        return None

    def skip_to(self, next_seq: int) -> list[str]:
        """Give up on events before next_seq (pruned from history) and go on from there."""
        return self.start_at(max(next_seq, self.next_seq or 0))

    def _drain(self) -> list[str]:
        ready: list[str] = []
        while self.next_seq in self.pending:
            ready.append(self.pending.pop(self.next_seq))
            self.next_seq += 1
        if self.overflowed and self.next_seq > self.dropped_through:
            self.overflowed = False
        return ready
