"""Coalescing of a model's reply pieces into fewer, larger deltas (no I/O, no threads).

A fast model yields a piece per token; appending each one costs a fenced Lua call, a
stream entry and a frame to every subscriber. The step loop therefore hands its pieces to
a `Coalescer`, which says when the buffered text should be appended as one delta:

- the first piece of a call at once (time to first token is what a user notices);
- then whenever the buffer holds `max_chars` characters or more, or a piece arrives
  `max_wait_s` or more after the previous flush, whichever comes first;
- and whatever is left when the caller says so: at the end of the call, before a fallback
  and before a retry decision. On a cancellation the caller discards it instead.

There is no timer: time is only looked at when a piece arrives. A model that stalls after
a buffered piece leaves that piece unsent until its next piece or the end of the call
(which the call's soft limit bounds). A slow model is not delayed at all: once
`max_wait_s` has passed since the last flush, its next piece is flushed as it arrives.

`max_chars <= 0` or `max_wait_s <= 0` disables coalescing: every piece is its own delta.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Coalescer:
    __slots__ = ("max_chars", "max_wait_s", "_clock", "_parts", "_size", "_flushed_at")

    def __init__(
        self,
        max_chars: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_chars = max_chars
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._parts: list[str] = []
        self._size = 0
        self._flushed_at: float | None = None  # None: nothing flushed yet in this call

    @property
    def enabled(self) -> bool:
        return self.max_chars > 0 and self.max_wait_s > 0

    @property
    def pending(self) -> int:
        """Characters buffered and not yet flushed."""
        return self._size

    def add(self, piece: str) -> str:
        """Buffer `piece`; returns the text to append now ("" when it stays buffered)."""
        if not piece:
            return ""
        self._parts.append(piece)
        self._size += len(piece)
        if (
            not self.enabled
            or self._flushed_at is None
            or self._size >= self.max_chars
            or self._clock() - self._flushed_at >= self.max_wait_s
        ):
            return self.flush()
        return ""

    def flush(self) -> str:
        """Everything buffered, as one text ("" when nothing is); the buffer is emptied."""
        if not self._parts:
            return ""
        text = self._parts[0] if len(self._parts) == 1 else "".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._flushed_at = self._clock()
        return text

    def discard(self) -> int:
        """Drop what is buffered (the run no longer needs it); returns how many characters."""
        dropped = self._size
        self._parts.clear()
        self._size = 0
        return dropped
