"""Compact catch-up's folding (realtime/compaction.py): exact text, seq order, bounds."""

from __future__ import annotations

import json
from typing import Any

from realtime import compaction
from realtime.compaction import Compactor


def event(seq: int, kind: str, run: str = "r1", **data: Any) -> str:
    return json.dumps(
        {
            "type": "event",
            "stream": "room",
            "seq": seq,
            "id": f"e{seq}",
            "kind": kind,
            "from": "agent:echo",
            "cause": {"client": "alice", "message": "m1", "prev": None},
            "ts": "2026-01-01T00:00:00Z",
            "data": {"run": run, **data},
        }
    )


def delta(seq: int, offset: int, text: str, run: str = "r1") -> str:
    return event(seq, "reply.delta", run, offset=offset, text=text)


def kinds(frames: list[str]) -> list[tuple[int | None, str, Any]]:
    out = []
    for frame in frames:
        parsed = json.loads(frame)
        out.append((parsed.get("seq"), parsed["kind"], parsed["data"].get("text")))
    return out


def test_frames_after_the_window_pass_unchanged_after_the_snapshots() -> None:
    compactor = Compactor(3)
    frames = [
        event(1, "message", text="hi"),
        delta(2, 0, "ab"),
        delta(3, 2, "cd"),
        delta(4, 4, "ef"),
    ]
    out = compactor.feed(frames[:2]) + compactor.feed(frames[2:])
    assert kinds(out) == [
        (1, "message", "hi"),
        (3, "reply.snapshot", "abcd"),
        (4, "reply.delta", "ef"),
    ]
    assert compactor.finished
    assert compactor.feed([frames[0]]) == [frames[0]]


def test_unsequenced_frames_pass_where_they_are() -> None:
    join = json.dumps({"type": "event", "stream": "room", "kind": "join", "data": {}})
    out = Compactor(2).feed([delta(1, 0, "a"), join, delta(2, 1, "b")])
    assert [json.loads(frame)["kind"] for frame in out] == ["join", "reply.snapshot"]


def test_a_long_text_goes_out_as_several_snapshots_each_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(compaction, "SNAPSHOT_MAX_CHARS", 4)
    out = Compactor(4).feed([delta(seq, (seq - 1) * 3, "xyz") for seq in range(1, 5)])
    snapshots = [json.loads(frame)["data"] for frame in out]
    assert [(s["offset"], s["text"]) for s in snapshots] == [(0, "xyzxyz"), (6, "xyzxyz")]


def test_runs_beyond_the_bound_pass_through_and_a_later_snapshot_continues_them(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(compaction, "MAX_RUNS", 1)
    frames = [
        delta(1, 0, "a", run="r1"),
        delta(2, 0, "x", run="r2"),  # no room: passes as it is
        event(3, "reply.done", "r1", text="a", status="ok"),
        delta(4, 1, "y", run="r2"),  # room again: folded from its offset
    ]
    out = Compactor(4).feed(frames)
    assert kinds(out) == [
        (2, "reply.delta", "x"),
        (3, "reply.done", "a"),
        (4, "reply.snapshot", "y"),
    ]
    assert json.loads(out[-1])["data"]["offset"] == 1


def test_a_gap_in_offsets_sends_what_was_held_and_goes_on_from_the_new_offset() -> None:
    out = Compactor(3).feed([delta(1, 0, "ab"), delta(3, 5, "fg")])
    assert [(json.loads(f)["data"]["offset"], json.loads(f)["data"]["text"]) for f in out] == [
        (0, "ab"),
        (5, "fg"),
    ]


def test_runs_in_progress_are_those_with_a_piece_and_no_done_after_it() -> None:
    from realtime.compaction import runs_in_progress

    newest_first = [
        (6, delta(6, 2, "c", run="r1")),
        (5, event(5, "reply.done", "r2", text="x", status="ok")),
        (4, delta(4, 0, "x", run="r2")),
        (3, delta(3, 0, "ab", run="r1")),
        (2, event(2, "message", "r9", text="hi")),
    ]
    assert runs_in_progress([(seq, frame) for seq, frame in newest_first]) == {"r1": 3}


def test_a_join_at_the_head_keeps_only_the_runs_in_progress() -> None:
    compactor = Compactor(4, only=frozenset({"r1"}))
    out = compactor.feed(
        [
            event(1, "message", text="hi"),
            delta(2, 0, "ab"),
            delta(3, 0, "x", run="r2"),
            delta(4, 2, "cd"),
            delta(5, 4, "ef"),
        ]
    )
    assert kinds(out) == [(4, "reply.snapshot", "abcd"), (5, "reply.delta", "ef")]


def test_a_restart_is_sent_where_it_is_and_the_text_is_gathered_again_from_zero() -> None:
    frames = [
        delta(1, 0, "void"),
        event(2, "reply.restart", attempt=2, reason="model_error"),
        delta(3, 0, "new"),
    ]
    out = Compactor(3).feed(frames)
    assert kinds(out) == [(2, "reply.restart", None), (3, "reply.snapshot", "new")]
    assert json.loads(out[-1])["data"]["offset"] == 0
