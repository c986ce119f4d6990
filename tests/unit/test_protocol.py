"""Client frame parsing and server frame building (realtime/protocol.py): pure, no services."""

from __future__ import annotations

import json
from typing import Any

import pytest

from realtime.protocol import (
    MAX_JSON_DEPTH,
    PONG,
    STATUS_BY_CODE,
    Cancel,
    Ping,
    Presence,
    ProtocolError,
    Publish,
    Receipt,
    Send,
    Subscribe,
    Unsubscribe,
    ack_frame,
    error_frame,
    json_depth_exceeds,
    parse_frame,
)
from streams.events import dumps

LIMIT = 64 * 1024


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def refused(text: str, max_bytes: int = LIMIT) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_frame(text, max_bytes)
    return caught.value


def assert_bad_request(text: str, frame_id: str | None = None, mentions: str = "") -> None:
    error = refused(text)
    assert error.code == "bad_request"
    assert error.frame_id == frame_id
    assert mentions in error.detail
    body = json.loads(error.frame())
    assert body["status"] == 400
    assert body["id"] == frame_id


# --- every frame type, well formed -------------------------------------------------------


def test_send_with_every_field() -> None:
    parsed = parse_frame(
        frame(
            type="send",
            id="m-1",
            stream="room.1",
            agent="echo",
            text="héllo",
            options={"chunks": 3},
            prev="e1",
        ),
        LIMIT,
    )
    assert parsed == Send("m-1", "room.1", "echo", "héllo", {"chunks": 3}, "e1")


def test_send_optional_fields_default() -> None:
    parsed = parse_frame(frame(type="send", id="m", stream="s", agent="echo", text=""), LIMIT)
    assert parsed == Send("m", "s", "echo", "", {}, None)


def test_send_null_options_and_prev_mean_absent() -> None:
    parsed = parse_frame(
        frame(type="send", id="m", stream="s", agent="echo", text="t", options=None, prev=None),
        LIMIT,
    )
    assert parsed == Send("m", "s", "echo", "t", {}, None)


@pytest.mark.parametrize("data", [None, 0, "text", [1, 2], {"nested": {"x": [True]}}])
def test_publish_carries_any_json_data(data: Any) -> None:
    parsed = parse_frame(frame(type="publish", id="p", stream="s", data=data), LIMIT)
    assert parsed == Publish("p", "s", data)


def test_subscribe_with_and_without_since() -> None:
    assert parse_frame(frame(type="subscribe", stream="s"), LIMIT) == Subscribe("s", None)
    assert parse_frame(frame(type="subscribe", stream="s", since=None), LIMIT) == Subscribe(
        "s", None
    )
    assert parse_frame(frame(type="subscribe", stream="s", since=0), LIMIT) == Subscribe("s", 0)
    assert parse_frame(frame(type="subscribe", stream="s", since=42), LIMIT) == Subscribe("s", 42)


def test_other_frame_types() -> None:
    assert parse_frame(frame(type="unsubscribe", stream="s"), LIMIT) == Unsubscribe("s")
    assert parse_frame(frame(type="receipt", stream="s", seq=7), LIMIT) == Receipt("s", 7)
    assert parse_frame(frame(type="receipt", stream="s", seq=0), LIMIT) == Receipt("s", 0)
    assert parse_frame(frame(type="cancel", id="m-1"), LIMIT) == Cancel("m-1")
    assert parse_frame(frame(type="presence", stream="s"), LIMIT) == Presence("s")
    assert parse_frame(frame(type="ping"), LIMIT) == Ping()


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse_frame(frame(type="ping", id="x", extra=[1]), LIMIT) == Ping()


@pytest.mark.parametrize(
    "stream",
    ["a", "0", "room-1", "org/team/room", "a:b@c+d=e_f.g", "x" * 200],
)
def test_valid_stream_names(stream: str) -> None:
    assert parse_frame(frame(type="unsubscribe", stream=stream), LIMIT) == Unsubscribe(stream)


@pytest.mark.parametrize("message_id", ["a", "~" * 128, 'quote"and\\slash', "!#$%&'()*+,-./"])
def test_valid_message_ids(message_id: str) -> None:
    assert parse_frame(frame(type="cancel", id=message_id), LIMIT) == Cancel(message_id)


# --- frames that are not frames -----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "not json", "{", '{"type":"ping"', "{'type':'ping'}"])
def test_non_json_is_bad_request(text: str) -> None:
    assert_bad_request(text, mentions="JSON")


@pytest.mark.parametrize("text", ["[]", '["ping"]', '"ping"', "1", "null", "true"])
def test_non_object_is_bad_request(text: str) -> None:
    assert_bad_request(text, mentions="object")


@pytest.mark.parametrize("type_value", [None, 1, True, ["ping"], {"t": "ping"}])
def test_type_missing_or_not_a_string(type_value: Any) -> None:
    fields: dict[str, Any] = {"id": "m-1"}
    if type_value is not None:
        fields["type"] = type_value
    assert_bad_request(json.dumps(fields), frame_id="m-1", mentions="type")


@pytest.mark.parametrize("type_value", ["Ping", "", "sendx", "event", "ack"])
def test_unknown_type(type_value: str) -> None:
    assert_bad_request(frame(type=type_value, id="m-2"), frame_id="m-2", mentions="unknown")


def test_error_names_the_frame_id_only_when_it_is_a_string() -> None:
    assert refused(frame(type="nope", id=5)).frame_id is None
    assert refused(frame(type="nope", id="five")).frame_id == "five"


# --- every field missing or ill-typed, per frame type --------------------------------------

SEND = {"type": "send", "id": "m", "stream": "s", "agent": "echo", "text": "hi"}
PUBLISH = {"type": "publish", "id": "m", "stream": "s", "data": {"x": 1}}

BAD_IDS = [None, 1, 1.5, True, [], {}, "", "x" * 129, "has space", "tab\t", "é", "\x7f", "m\n"]
BAD_STREAMS = [
    *[None, 1, True, [], {}, "", "-leading", "_x", ".x", "has space", "x" * 201, "a#b"],
    *["room\n", "room\r\n", "é"],
]


def without(base: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in base.items() if key != name}


def with_value(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    # None stands for "field absent" so missing and ill-typed share one table.
    return without(base, name) if value is None else {**base, name: value}


@pytest.mark.parametrize("base", [SEND, PUBLISH, {"type": "cancel", "id": "m"}])
@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_message_id(base: dict[str, Any], value: Any) -> None:
    error = refused(json.dumps(with_value(base, "id", value)))
    assert error.code == "bad_request"
    assert "'id'" in error.detail
    # A string id is echoed back so the client can match the error, even an invalid one.
    assert error.frame_id == (value if isinstance(value, str) else None)


@pytest.mark.parametrize(
    "base",
    [
        SEND,
        PUBLISH,
        {"type": "subscribe", "stream": "s"},
        {"type": "unsubscribe", "stream": "s"},
        {"type": "receipt", "stream": "s", "seq": 1},
        {"type": "presence", "stream": "s"},
    ],
    ids=lambda base: base["type"],
)
@pytest.mark.parametrize("value", BAD_STREAMS)
def test_bad_stream(base: dict[str, Any], value: Any) -> None:
    error = refused(json.dumps(with_value(base, "stream", value)))
    assert error.code == "bad_request"
    assert "'stream'" in error.detail


@pytest.mark.parametrize("value", [None, 1, True, [], {}, "", "a" * 101])
def test_send_bad_agent(value: Any) -> None:
    assert_bad_request(json.dumps(with_value(SEND, "agent", value)), "m", "'agent'")


def test_send_agent_name_length_limit_is_inclusive() -> None:
    assert parse_frame(json.dumps({**SEND, "agent": "a" * 100}), LIMIT).agent == "a" * 100  # type: ignore[union-attr]


@pytest.mark.parametrize("value", [None, 1, True, [], {}])
def test_send_bad_text(value: Any) -> None:
    assert_bad_request(json.dumps(with_value(SEND, "text", value)), "m", "'text'")


@pytest.mark.parametrize("value", [[], "x", 1, True, [["k", "v"]]])
def test_send_bad_options(value: Any) -> None:
    assert_bad_request(json.dumps({**SEND, "options": value}), "m", "'options'")


@pytest.mark.parametrize("value", [1, True, [], {}, 1.0])
def test_send_bad_prev(value: Any) -> None:
    assert_bad_request(json.dumps({**SEND, "prev": value}), "m", "'prev'")


def test_publish_without_data() -> None:
    assert_bad_request(json.dumps(without(PUBLISH, "data")), "m", "'data'")


@pytest.mark.parametrize("value", [-1, 1.5, 2.0, "3", True, False, [], {}])
def test_subscribe_bad_since(value: Any) -> None:
    assert_bad_request(frame(type="subscribe", stream="s", since=value), None, "'since'")


@pytest.mark.parametrize("value", ["absent", None, -1, 1.5, "3", True, [], {}])
def test_receipt_bad_or_missing_seq(value: Any) -> None:
    fields: dict[str, Any] = {"type": "receipt", "stream": "s"}
    if value != "absent":
        fields["seq"] = value
    assert_bad_request(json.dumps(fields), None, "'seq'")


# --- size limit -------------------------------------------------------------------------


def padded_ping(pad: str) -> str:
    return '{"type":"ping","pad":"' + pad + '"}'


def test_frame_at_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    text = padded_ping("x" * 100)
    assert parse_frame(text, len(text)) == Ping()
    error = refused(text, len(text) - 1)
    assert error.code == "too_large"
    assert json.loads(error.frame())["status"] == 413


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_limit_counts_utf8_bytes_not_characters(char: str) -> None:
    text = padded_ping(char * 50)
    size = len(text.encode())
    assert len(text) < size  # the case the limit must not get wrong
    assert parse_frame(text, size) == Ping()
    # Fewer characters than the limit, more bytes: still too large.
    assert len(text) <= size - 1
    assert refused(text, size - 1).code == "too_large"


def test_too_large_is_checked_before_parsing() -> None:
    error = refused("x" * 11, 10)  # not JSON either: size wins
    assert error.code == "too_large"
    assert error.frame_id is None


# --- server frames ----------------------------------------------------------------------


@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("message_id", ["m-1", 'q"uote\\back', "~" * 128])
def test_ack_frame_is_exact_json(message_id: str, duplicate: bool) -> None:
    body = json.loads(ack_frame(message_id, "e" * 32, 12345, duplicate))
    assert body == {
        "type": "ack",
        "id": message_id,
        "event_id": "e" * 32,
        "seq": 12345,
        "duplicate": duplicate,
    }
    assert list(body) == ["type", "id", "event_id", "seq", "duplicate"]


@pytest.mark.parametrize("code", sorted(STATUS_BY_CODE))
def test_error_frame_shape_for_every_code(code: str) -> None:
    body = json.loads(error_frame(code, 'detail with "quotes"', "m-1"))
    assert body == {
        "type": "error",
        "id": "m-1",
        "code": code,
        "status": STATUS_BY_CODE[code],
        "detail": 'detail with "quotes"',
    }


def test_error_statuses_are_the_protocols() -> None:
    assert STATUS_BY_CODE == {
        "bad_request": 400,
        "forbidden": 403,
        "not_found": 404,
        "history_expired": 410,
        "too_large": 413,
        "rate_limited": 429,
        "overloaded": 429,
        "budget_exhausted": 429,
        "internal": 500,
        "unavailable": 503,
    }


def test_error_frame_with_null_id_retry_after_and_extras() -> None:
    body = json.loads(error_frame("rate_limited", "slow down", None, 250))
    assert body["id"] is None
    assert body["retry_after_ms"] == 250
    body = json.loads(error_frame("history_expired", "gone", None, stream="s", head=9))
    assert "retry_after_ms" not in body
    assert (body["stream"], body["head"], body["status"]) == ("s", 9, 410)


def test_protocol_error_frame_matches_error_frame() -> None:
    error = ProtocolError("overloaded", "busy", "m-9", retry_after_ms=100, stream="s")
    assert error.frame() == error_frame("overloaded", "busy", "m-9", 100, stream="s")
    assert json.loads(error.frame())["status"] == 429


def test_pong() -> None:
    assert json.loads(PONG) == {"type": "pong"}


# --- nesting -----------------------------------------------------------------------------


def nested(depth: int, leaf: Any = 1) -> Any:
    """`depth` levels of alternating arrays and objects around `leaf`."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [0, 1, MAX_JSON_DEPTH])
def test_free_form_json_up_to_the_documented_depth_is_accepted(depth: int) -> None:
    parsed = parse_frame(frame(type="publish", id="p", stream="s", data=nested(depth)), LIMIT)
    assert isinstance(parsed, Publish)
    dumps(parsed.data)  # and it can be written back out, inside an event
    options = {"k": nested(max(depth, 1) - 1)}  # the options object is a level itself
    assert isinstance(
        parse_frame(
            frame(type="send", id="m", stream="s", agent="a", text="", options=options), LIMIT
        ),
        Send,
    )


# 255 and beyond parse (orjson reads 1,024 levels) but could not be written back out.
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 255, 1000])
def test_deeper_free_form_json_is_a_bad_request(depth: int) -> None:
    text = "[" * depth + "]" * depth
    assert_bad_request(
        f'{{"type":"publish","id":"p","stream":"s","data":{text}}}', "p", "nests deeper"
    )
    assert_bad_request(
        f'{{"type":"send","id":"m","stream":"s","agent":"a","text":"","options":{{"x":{text}}}}}',
        "m",
        "nests deeper",
    )


def test_json_depth() -> None:
    assert not json_depth_exceeds("scalar", 0)
    assert json_depth_exceeds([], 0)
    assert not json_depth_exceeds({"a": [1, {"b": 2}]}, 3)
    assert json_depth_exceeds({"a": [1, {"b": []}]}, 3)


def test_subscribe_compact_is_a_boolean_defaulting_to_false() -> None:
    parse = parse_frame
    assert parse(frame(type="subscribe", stream="s", since=3, compact=True), LIMIT) == Subscribe(
        "s", 3, True
    )
    assert parse(frame(type="subscribe", stream="s", compact=None), LIMIT) == Subscribe("s", None)
    assert parse(frame(type="subscribe", stream="s", compact=False), LIMIT).compact is False


@pytest.mark.parametrize("value", [1, 0, "true", [], {}])
def test_subscribe_compact_refuses_anything_but_a_boolean(value: Any) -> None:
    text = json.dumps({"type": "subscribe", "stream": "s", "compact": value})
    assert_bad_request(text, None, "'compact' must be true or false")


@pytest.mark.parametrize("value", [1, "yes", [], {"x": 1}])
def test_send_interrupt_refuses_anything_but_a_boolean(value: Any) -> None:
    text = json.dumps({**SEND, "options": {"interrupt": value}})
    assert_bad_request(text, "m", "'options.interrupt' must be true or false")


def test_send_interrupt_is_read_from_the_options() -> None:
    from realtime.protocol import Send, interrupts

    assert interrupts(Send("m", "s", "echo", "t", {"interrupt": True}, None))
    assert not interrupts(Send("m", "s", "echo", "t", {"interrupt": False}, None))
    assert not interrupts(Send("m", "s", "echo", "t", {}, None))
