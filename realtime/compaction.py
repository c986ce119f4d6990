"""Compact catch-up: a subscriber's missed replies as snapshots, not as every delta.

A `subscribe` with `compact: true` and a `since` behind the head gets the events it
missed (seqs since+1 .. the head when it subscribed: the catch-up window) with each run's
`reply.delta` events left out (a `reply.restart` is still sent in its place: it voids
what the client had, tool calls included, and the run's text is gathered again from 0):

- a run whose `reply.done` is in the window is delivered as that `reply.done` alone (its
  text is the whole reply);
- a run still streaming at the end of the window is delivered as one `reply.snapshot`,
  sent right after the window's last event: its `text` is the run's text from `offset`
  (0 when the window holds the run's start or a restart, else the offset of the first
  delta the client missed: it has the text before it) up to where the window ends. The live
  deltas that follow start exactly there, so the text before `offset`, the snapshot's text
  and the later deltas make the final text.

A snapshot is not a stored event: its `seq` is the seq of the last event of its run that
it covers, and its `id` is that event's id prefixed with `snapshot:`. It may be lower than
the seq of events delivered before it (they belong to other runs or are other kinds); a
client moves its position to the larger of the two and never treats a snapshot as a repeat
or a gap. Within the window, seqs skip where deltas were left out; the last seq of the
window is always delivered or covered by a snapshot, so the client's position ends at the
window's end (the `subscribed` frame's `head`) and the live events follow without a gap.

A compact `subscribe` without `since` (a join at the head) gets the same for the replies
still streaming near the head: the runs with a piece among the last LOOKBACK events and no
`reply.done` after it are read from their message on, and each comes as one snapshot from
offset 0 before the live events; nothing else before the head is sent.

Bounded: at most MAX_RUNS runs are folded at once (the deltas of further runs pass
through unchanged, which a snapshot at a later offset still continues correctly), and a
snapshot carries at most SNAPSHOT_MAX_CHARS characters: a longer text goes out as several
snapshots, each at the offset where the last ended (like large deltas). Pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.events import dumps

MAX_RUNS = 64
LOOKBACK = 200  # events read back from the head to find the replies still streaming
SNAPSHOT_MAX_CHARS = 65_536
FOLDED_KINDS = frozenset({"reply.delta", "reply.restart"})


@dataclass(slots=True)
class _Partial:
    """One run's text in the window since its last snapshot, restart or start."""

    offset: int = 0
    pieces: list[str] = field(default_factory=list)
    chars: int = 0
    pending: bool = False  # something to send: text, or a restart that voids the old
    envelope: dict[str, Any] = field(default_factory=dict)  # of the last event covered

    def take(self, event: dict[str, Any], data: dict[str, Any]) -> list[str]:
        """Fold one delta or restart in; returns a snapshot when the text outgrew a frame."""
        out: list[str] = []
        if event["kind"] == "reply.restart":
            self._reset(0)
        else:
            offset = data.get("offset")
            piece = data.get("text")
            if not isinstance(offset, int) or not isinstance(piece, str):
                return out
            if offset != self.offset + self.chars:
                # Not contiguous (the log lost some, or a later attempt): what is held is
                # sent as it is, and the text goes on from this delta's offset.
                if self.pending:
                    out.append(self.snapshot())
                self._reset(offset, pending=False)
            self.pieces.append(piece)
            self.chars += len(piece)
        self.pending = True
        self.envelope = event
        if self.chars >= SNAPSHOT_MAX_CHARS:
            out.append(self.snapshot())
            self._reset(self.offset + self.chars, pending=False)
        return out

    def _reset(self, offset: int, pending: bool = True) -> None:
        self.offset, self.pieces, self.chars, self.pending = offset, [], 0, pending

    def snapshot(self) -> str:
        envelope = self.envelope
        data = envelope.get("data") or {}
        return dumps(
            {
                "type": "event",
                "stream": envelope.get("stream"),
                "seq": envelope.get("seq"),
                "id": "snapshot:" + str(envelope.get("id")),
                "kind": "reply.snapshot",
                "from": envelope.get("from"),
                "cause": envelope.get("cause"),
                "ts": envelope.get("ts"),
                "data": {
                    "run": data.get("run"),
                    "offset": self.offset,
                    "text": "".join(self.pieces),
                },
            }
        )


class Compactor:
    """Folds the catch-up window's reply deltas into snapshots, in seq order; after the
    window's end (`through`) every event passes through unchanged."""

    __slots__ = ("through", "runs", "finished", "only")

    def __init__(self, through: int, only: frozenset[str] | None = None) -> None:
        self.through = through
        self.runs: dict[str, _Partial] = {}
        self.finished = False
        # A join at the head (no `since`): only these runs' pieces are folded, and every
        # other event up to `through` is left out (the client asked for what comes next).
        self.only = only

    def feed(self, frames: list[str]) -> list[str]:
        """What to send for `frames` (released in seq order; unsequenced ones pass)."""
        if self.finished:
            return frames
        out: list[str] = []
        for index, frame in enumerate(frames):
            event = orjson.loads(frame)
            seq = event.get("seq") if isinstance(event, dict) else None
            if not isinstance(seq, int):
                out.append(frame)
                continue
            if seq > self.through:
                self._finish(out)
                out.extend(frames[index:])
                return out
            if self.only is None or self._wanted(event):
                self._one(event, frame, out)
            if seq == self.through:
                self._finish(out)
                out.extend(frames[index + 1 :])
                return out
        return out

    def _wanted(self, event: dict[str, Any]) -> bool:
        data = event.get("data")
        run = data.get("run") if isinstance(data, dict) else None
        return event.get("kind") in FOLDED_KINDS and self.only is not None and run in self.only

    def _one(self, event: dict[str, Any], frame: str, out: list[str]) -> None:
        kind = event.get("kind")
        data = event.get("data")
        run = data.get("run") if isinstance(data, dict) else None
        if not isinstance(run, str) or not isinstance(data, dict):
            out.append(frame)
            return
        if kind in FOLDED_KINDS:
            partial = self.runs.get(run)
            if partial is None:
                if len(self.runs) >= MAX_RUNS:
                    out.append(frame)
                    return
                partial = self.runs[run] = _Partial()
                if kind == "reply.delta" and isinstance(data.get("offset"), int):
                    partial.offset = data["offset"]
            out.extend(partial.take(event, data))
            if kind == "reply.restart":
                out.append(frame)  # voids what the client had of the run, as it comes
            return
        if kind == "reply.done":
            self.runs.pop(run, None)  # its text is the whole reply: nothing else to send
        out.append(frame)

    def _finish(self, out: list[str]) -> None:
        """The window's end: a snapshot for each run still streaming, oldest last event
        first, so the last one sent carries the window's last seq when it was folded."""
        partials = sorted(
            (p for p in self.runs.values() if p.pending), key=lambda p: p.envelope.get("seq", 0)
        )
        out.extend(partial.snapshot() for partial in partials)
        self.runs = {}
        self.finished = True


def runs_in_progress(recent: list[tuple[int, str]]) -> dict[str, int]:
    """Among events newest first, the runs with a piece and no reply.done after it: run ->
    the seq of its oldest piece seen (at most MAX_RUNS, the most recently active)."""
    finished: set[str] = set()
    found: dict[str, int] = {}
    for seq, frame in recent:
        event = orjson.loads(frame)
        data = event.get("data") if isinstance(event, dict) else None
        run = data.get("run") if isinstance(data, dict) else None
        if not isinstance(run, str):
            continue
        kind = event.get("kind")
        if kind == "reply.done":
            finished.add(run)
        elif kind in FOLDED_KINDS and run not in finished:
            if run in found or len(found) < MAX_RUNS:
                found[run] = seq
    return found
