"""Bad input: each gets an `error` frame naming it, and the connection stays usable."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from client.connection import SwitchboardClosed, SwitchboardError

from .conftest import Connect

pytestmark = pytest.mark.asyncio

LIMIT = 64 * 1024
LONG_ID = "x" * 129


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


SEND = {"type": "send", "id": "b-1", "stream": "bad", "agent": "echo", "text": "hi"}
PUBLISH = {"type": "publish", "id": "b-2", "stream": "bad", "data": {}}


def _without(frame: dict, field: str) -> dict:
    return {k: v for k, v in frame.items() if k != field}


def _nested_frame(kind: str, field: str, depth: int) -> str:
    """A send or publish whose `field` nests `depth` levels (built as text: orjson would
    refuse to write it)."""
    base = dict(SEND if kind == "send" else PUBLISH)
    base.pop(field, None)
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return _json(base)[:-1] + f',"{field}":{{"x":{inner}}}}}'


# (raw frame, the error's expected id). Every one is a bad_request (400).
BAD_FRAMES: dict[str, tuple[str | bytes, str | None]] = {
    "not-json": ("this is not json", None),
    "truncated-json": ('{"type": "ping"', None),
    "binary-frame": (b'{"type": "ping"}', None),
    "empty-text": ("", None),
    "json-array": ("[1, 2]", None),
    "json-string": ('"ping"', None),
    "json-number": ("42", None),
    "json-null": ("null", None),
    "missing-type": (_json({"id": "b-0"}), "b-0"),
    "type-not-string": (_json({"type": 7}), None),
    "unknown-type": (_json({"type": "shout", "id": "b-0"}), "b-0"),
    "send-missing-id": (_json(_without(SEND, "id")), None),
    "send-id-not-string": (_json({**SEND, "id": 12}), None),
    "send-id-empty": (_json({**SEND, "id": ""}), ""),
    "send-id-too-long": (_json({**SEND, "id": LONG_ID}), LONG_ID),
    "send-id-with-space": (_json({**SEND, "id": "a b"}), "a b"),
    "send-missing-stream": (_json(_without(SEND, "stream")), "b-1"),
    "send-stream-not-string": (_json({**SEND, "stream": ["bad"]}), "b-1"),
    "send-stream-empty": (_json({**SEND, "stream": ""}), "b-1"),
    "send-stream-bad-chars": (_json({**SEND, "stream": "has space"}), "b-1"),
    "send-stream-too-long": (_json({**SEND, "stream": "s" * 201}), "b-1"),
    "send-missing-agent": (_json(_without(SEND, "agent")), "b-1"),
    "send-agent-not-string": (_json({**SEND, "agent": 1}), "b-1"),
    "send-agent-empty": (_json({**SEND, "agent": ""}), "b-1"),
    "send-missing-text": (_json(_without(SEND, "text")), "b-1"),
    "send-text-not-string": (_json({**SEND, "text": {"t": 1}}), "b-1"),
    "send-options-not-object": (_json({**SEND, "options": [1]}), "b-1"),
    "send-prev-not-string": (_json({**SEND, "prev": 5}), "b-1"),
    "publish-missing-id": (_json(_without(PUBLISH, "id")), None),
    "publish-missing-stream": (_json(_without(PUBLISH, "stream")), "b-2"),
    "publish-stream-not-string": (_json({**PUBLISH, "stream": 3}), "b-2"),
    "publish-missing-data": (_json(_without(PUBLISH, "data")), "b-2"),
    "subscribe-missing-stream": (_json({"type": "subscribe"}), None),
    "subscribe-since-negative": (_json({"type": "subscribe", "stream": "s", "since": -1}), None),
    "subscribe-since-string": (_json({"type": "subscribe", "stream": "s", "since": "3"}), None),
    "subscribe-since-float": (_json({"type": "subscribe", "stream": "s", "since": 1.5}), None),
    "subscribe-since-bool": (_json({"type": "subscribe", "stream": "s", "since": True}), None),
    "unsubscribe-missing-stream": (_json({"type": "unsubscribe"}), None),
    "receipt-missing-stream": (_json({"type": "receipt", "seq": 1}), None),
    "receipt-missing-seq": (_json({"type": "receipt", "stream": "s"}), None),
    "receipt-seq-not-int": (_json({"type": "receipt", "stream": "s", "seq": "1"}), None),
    "cancel-missing-id": (_json({"type": "cancel"}), None),
    "cancel-id-not-string": (_json({"type": "cancel", "id": 1}), None),
    "presence-missing-stream": (_json({"type": "presence"}), None),
    "presence-stream-not-string": (_json({"type": "presence", "stream": None}), None),
    # Nested past MAX_JSON_DEPTH (64). Up to 1,023 levels parse, but from 255 on they could
    # not be written back out and were answered `internal` (which clients retry).
    "publish-data-nested-65": (_nested_frame("publish", "data", 65), "b-2"),
    "publish-data-nested-300": (_nested_frame("publish", "data", 300), "b-2"),
    "publish-data-nested-1000": (_nested_frame("publish", "data", 1000), "b-2"),
    "send-options-nested-300": (_nested_frame("send", "options", 300), "b-1"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frame_gets_bad_request_and_the_connection_stays_usable(
    connect: Connect, unique: Callable[[str], str], case: str
) -> None:
    raw, expected_id = BAD_FRAMES[case]
    client = await connect()
    await client.send_raw(raw)
    error = await client.recv_frame()
    assert error["type"] == "error"
    assert (error["code"], error["status"]) == ("bad_request", 400), error
    assert error["id"] == expected_id
    assert isinstance(error["detail"], str) and error["detail"]
    assert "retry_after_ms" not in error
    # Still usable, and the refused frame started nothing.
    assert (await client.ping())["type"] == "pong"
    stream = unique("after-bad")
    ack = await client.send(stream, "echo", "still here")
    assert ack["seq"] == 1
    assert client.unread_frames() == []


async def test_valid_id_with_every_printable_ascii_character(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    ack = await client.publish(unique("ids"), {}, id=printable)
    assert ack["id"] == printable


async def test_frame_over_the_limit_is_too_large(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    assert client.welcome["limits"]["max_frame_bytes"] == LIMIT
    stream = unique("large")
    frame = _json({"type": "publish", "id": "big", "stream": stream, "data": "x" * LIMIT})
    assert len(frame.encode()) > LIMIT
    await client.send_raw(frame)
    error = await client.recv_frame()
    assert (error["code"], error["status"]) == ("too_large", 413), error
    # Multi-byte characters count as bytes: under the limit in characters, over in bytes.
    wide = _json({"type": "publish", "id": "wide", "stream": stream, "data": "é" * (LIMIT // 2)})
    assert len(wide) < LIMIT < len(wide.encode())
    await client.send_raw(wide)
    assert (await client.recv_frame())["code"] == "too_large"
    # Nothing was appended, and a frame just under the limit is fine.
    assert (await client.subscribe(stream))["head"] == 0
    fits = "x" * (LIMIT - 200)
    ack = await client.publish(stream, fits)
    assert ack["seq"] == 1
    assert (await client.next_event(stream))["data"] == fits


async def test_frame_too_large_to_read_closes_1009(connect: Connect) -> None:
    client = await connect()
    # Past daphne's 1 MiB message limit: the server cannot read it at all.
    huge = "x" * (2 << 20)
    await client.send_raw(_json({"type": "publish", "id": "huge", "stream": "s", "data": huge}))
    assert await client.wait_closed() == 1009
    with pytest.raises(SwitchboardClosed):
        await client.ping()


async def test_unknown_agent_is_not_found_and_appends_nothing(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("no-agent")
    with pytest.raises(SwitchboardError) as missing:
        await client.send(stream, "no-such-agent", "hello", id="na-1")
    assert (missing.value.code, missing.value.status) == ("not_found", 404)
    assert missing.value.frame["id"] == "na-1"
    assert (await client.subscribe(stream))["head"] == 0
    # The refused id was not remembered: it can be used for a real send.
    ack = await client.send(stream, "echo", "hello", id="na-1")
    assert ack["duplicate"] is False


async def test_streams_outside_the_tokens_patterns_are_forbidden(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    allowed, other = unique("team:room"), unique("elsewhere")
    client = await connect(streams=["team:*", "lobby"])
    assert (await client.subscribe(allowed))["type"] == "subscribed"
    assert (await client.subscribe("lobby"))["type"] == "subscribed"
    assert (await client.publish(allowed, {"ok": True}))["seq"] == 1

    with pytest.raises(SwitchboardError) as send:
        await client.send(other, "echo", "no", id="f-1")
    assert (send.value.code, send.value.status, send.value.frame["id"]) == ("forbidden", 403, "f-1")
    with pytest.raises(SwitchboardError) as publish:
        await client.publish(other, {}, id="f-2")
    assert (publish.value.code, publish.value.frame["id"]) == ("forbidden", "f-2")
    for request in (client.subscribe, client.presence):
        with pytest.raises(SwitchboardError) as refused:
            await request(other)
        assert refused.value.code == "forbidden"
    # A pattern is a glob over the whole name, not a prefix.
    with pytest.raises(SwitchboardError):
        await client.subscribe("lobby2")
    await client.receipt(other, 1)
    assert (await client.recv_frame())["code"] == "forbidden"

    # Nothing reached the forbidden stream.
    observer = await connect()
    assert (await observer.subscribe(other))["head"] == 0
    assert (await client.ping())["type"] == "pong"
