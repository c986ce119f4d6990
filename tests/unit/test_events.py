"""Stream event JSON (streams/events.py): valid around any seq, and text fragments that
concatenate into exactly the text that was split."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from streams import keys
from streams.events import (
    MESSAGE_ID,
    STREAM_NAME,
    cause_of,
    event_parts,
    json_fragment,
    new_event_id,
    new_run_id,
    text_from_fragments,
    utc_now_iso,
)

TRICKY = [
    "",
    "plain",
    'say "hi"',
    "back\\slash \\u0041 \\n",
    "new\nline\ttab\rreturn",
    "nul\x00 bell\x07 esc\x1b del\x7f",
    "line\u2028separator\u2029paragraph",
    "héllo wörld ñ",
    "中文 日本語 한국어",
    "emoji 🎉👍🏽 family 👨‍👩‍👧",
    "</script><!-- -->",
    "'single' `back`",
]


def event_json(seq: int, **overrides: Any) -> str:
    fields: dict[str, Any] = {
        "stream": "room/1",
        "event_id": "e1",
        "kind": "message",
        "sender": "client:alice",
        "cause": cause_of("alice", "m-1", None),
        "data": {"text": "hi", "agent": "echo"},
        "ts": "2026-01-02T03:04:05.678Z",
    }
    fields.update(overrides)
    prefix, suffix = event_parts(**fields)
    return prefix + str(seq) + suffix


@pytest.mark.parametrize("seq", [1, 2, 99, 10**12])
def test_event_is_valid_json_with_the_seq_spliced_in(seq: int) -> None:
    body = json.loads(event_json(seq))
    assert body == {
        "type": "event",
        "stream": "room/1",
        "seq": seq,
        "id": "e1",
        "kind": "message",
        "from": "client:alice",
        "cause": {"client": "alice", "message": "m-1", "prev": None},
        "ts": "2026-01-02T03:04:05.678Z",
        "data": {"text": "hi", "agent": "echo"},
    }
    assert list(body) == ["type", "stream", "seq", "id", "kind", "from", "cause", "ts", "data"]


@pytest.mark.parametrize("text", TRICKY)
def test_event_escapes_any_text(text: str) -> None:
    body = json.loads(event_json(3, stream="s", data={"text": text}, sender=f"client:{text}"))
    assert body["data"]["text"] == text
    assert body["from"] == f"client:{text}"


@pytest.mark.parametrize("data", [None, 1, "x", [1, "two"], {"nested": {"list": [True, None]}}])
def test_event_data_may_be_any_json(data: Any) -> None:
    assert json.loads(event_json(1, kind="published", data=data))["data"] == data


def test_timestamp_defaults_to_now_in_utc_iso8601() -> None:
    prefix, suffix = event_parts(
        stream="s", event_id="e", kind="published", sender="client:c", cause={}, data={}
    )
    ts = json.loads(prefix + "1" + suffix)["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now_iso())


def test_ids_are_unique_and_well_formed() -> None:
    event_ids = {new_event_id() for _ in range(100)}
    run_ids = {new_run_id("acme") for _ in range(100)}
    assert len(event_ids) == len(run_ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", event_id) for event_id in event_ids)
    assert all(re.fullmatch(r"r[0-9a-f]{32}\.acme", run_id) for run_id in run_ids)
    assert {keys.tenant_of_run(run_id) for run_id in run_ids} == {"acme"}
    for malformed in ("r1", "r" + "0" * 32, "x" + "0" * 32 + ".acme", "r" + "0" * 32 + "."):
        with pytest.raises(ValueError):
            keys.tenant_of_run(malformed)


@pytest.mark.parametrize("text", TRICKY)
def test_fragment_round_trip(text: str) -> None:
    fragment = json_fragment(text)
    assert not fragment.startswith('"') or text.startswith('"')
    assert text_from_fragments(fragment) == text
    # The fragment is what a JSON string holds between its quotes.
    assert json.loads('"' + fragment + '"') == text


def test_fragments_concatenate_into_the_whole_text() -> None:
    pieces = ['a "quoted', '" \\', "\\ né", "\n\x00", "🎉", "", "end"]
    joined = "".join(json_fragment(piece) for piece in pieces)
    assert text_from_fragments(joined) == "".join(pieces)


@pytest.mark.parametrize("seed", range(20))
def test_random_text_split_anywhere_round_trips(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = 'ab "\\/\n\t\r\x00\x01\x1f\x7fé€中😀\u2028' + "".join(
        chr(code) for code in range(0x20, 0x7F)
    )
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 10))))
    bounds = [0, *cuts, len(text)]
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    assert "".join(pieces) == text
    assert text_from_fragments("".join(json_fragment(piece) for piece in pieces)) == text


@pytest.mark.parametrize("name", ["a", "A1", "x" * 200, "a.b:c@d/e+f=g_h-i"])
def test_stream_name_pattern_accepts(name: str) -> None:
    assert STREAM_NAME.match(name)


@pytest.mark.parametrize("name", ["", "x" * 201, "-a", "a b", "a\n", "é", "a#b", "a*"])
def test_stream_name_pattern_refuses(name: str) -> None:
    assert not STREAM_NAME.match(name)


@pytest.mark.parametrize("message_id", ["", " ", "x" * 129, "a b", "é", "a\n"])
def test_message_id_pattern_refuses(message_id: str) -> None:
    assert not MESSAGE_ID.match(message_id)
