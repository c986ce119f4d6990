"""Wire protocol v1: parsing client frames and building server frames. Pure, no I/O.

Every way a frame can be wrong maps to one `ProtocolError` with the code and status the
protocol names, so the consumer answers it with an `error` frame and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from streams.events import MESSAGE_ID, STREAM_NAME, dumps

STATUS_BY_CODE = {
    "bad_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "history_expired": 410,
    "too_large": 413,
    "rate_limited": 429,
    "overloaded": 429,
    "budget_exhausted": 429,
    # Written, not yet on the replicas SWITCHBOARD_REPLICA_ACKS asks for: retry the same id.
    "unavailable": 503,
    "internal": 500,
}

CLOSE_NORMAL = 1000
CLOSE_TOO_LARGE = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_SLOW_CONSUMER = 4008
CLOSE_TOO_MANY_CONNECTIONS = 4029

MAX_AGENT_NAME = 100
# Deepest nesting of a frame's free-form JSON (`publish` data, `send` options). orjson reads
# up to 1,024 levels but writes only 254, and the event wraps what it carries in two more:
# deeper frames would be accepted and then fail to be written.
MAX_JSON_DEPTH = 64


class ProtocolError(Exception):
    def __init__(
        self,
        code: str,
        detail: str,
        frame_id: str | None = None,
        retry_after_ms: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.frame_id = frame_id
        self.retry_after_ms = retry_after_ms
        self.extra = extra

    def frame(self) -> str:
        return error_frame(self.code, self.detail, self.frame_id, self.retry_after_ms, **self.extra)


def error_frame(
    code: str,
    detail: str,
    frame_id: str | None = None,
    retry_after_ms: int | None = None,
    **extra: Any,
) -> str:
    body: dict[str, Any] = {
        "type": "error",
        "id": frame_id,
        "code": code,
        "status": STATUS_BY_CODE[code],
        "detail": detail,
    }
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
    body.update(extra)
    return dumps(body)


@dataclass(frozen=True, slots=True)
class Send:
    id: str
    stream: str
    agent: str
    text: str
    options: dict[str, Any]
    prev: str | None


@dataclass(frozen=True, slots=True)
class Publish:
    id: str
    stream: str
    data: Any


@dataclass(frozen=True, slots=True)
class Subscribe:
    stream: str
    since: int | None
    # The missed replies as reply.done or reply.snapshot (realtime/compaction.py).
    compact: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    stream: str


@dataclass(frozen=True, slots=True)
class Receipt:
    stream: str
    seq: int


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class Presence:
    stream: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Frame = Send | Publish | Subscribe | Unsubscribe | Receipt | Cancel | Presence | Ping


class _Fields:
    """Typed access to a frame's fields; every miss is a bad_request naming the field."""

    __slots__ = ("raw", "frame_id")

    def __init__(self, raw: dict[str, Any], frame_id: str | None) -> None:
        self.raw = raw
        self.frame_id = frame_id

    def _bad(self, detail: str) -> ProtocolError:
        return ProtocolError("bad_request", detail, self.frame_id)

    def message_id(self) -> str:
        value = self.raw.get("id")
        if not isinstance(value, str) or not MESSAGE_ID.match(value):
            raise self._bad("'id' must be a string of 1 to 128 printable ASCII characters")
        return value

    def stream(self) -> str:
        value = self.raw.get("stream")
        if not isinstance(value, str):
            raise self._bad("'stream' must be a string")
        if not STREAM_NAME.match(value):
            raise self._bad(
                "'stream' must be 1 to 200 characters: letters, digits and _ . : @ / + = -,"
                " starting with a letter or digit"
            )
        return value

    def text(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise self._bad(f"'{name}' must be a string")
        return value

    def flag(self, raw: dict[str, Any], name: str, where: str = "") -> bool:
        """An optional boolean: absent or null is False, anything but a boolean is refused."""
        value = raw.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._bad(f"'{where}{name}' must be true or false")
        return value

    def seq(self, name: str, required: bool) -> int | None:
        value = self.raw.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._bad(f"'{name}' must be a non-negative integer")
        return value


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests arrays and objects more than `limit` deep (a scalar: 0)."""
    level: list[Any] = [value]
    depth = 0
    while level:
        containers = [item for item in level if isinstance(item, (dict, list))]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = []
        for container in containers:
            level.extend(container.values() if isinstance(container, dict) else container)
    return False


def _parse_send(fields: _Fields) -> Send:
    raw = fields.raw
    message_id = fields.message_id()
    stream = fields.stream()
    agent = fields.text("agent")
    if not agent or len(agent) > MAX_AGENT_NAME:
        raise fields._bad("'agent' must be a non-empty agent name")
    text = fields.text("text")
    options = raw.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise fields._bad("'options' must be an object")
    if json_depth_exceeds(options, MAX_JSON_DEPTH):
        raise fields._bad(f"'options' nests deeper than {MAX_JSON_DEPTH} levels")
    fields.flag(options, "interrupt", "options.")  # checked here, acted on by the gateway
    prev = raw.get("prev")
    if prev is not None and not isinstance(prev, str):
        raise fields._bad("'prev' must be an event id string or null")
    return Send(message_id, stream, agent, text, options, prev)


def _parse_publish(fields: _Fields) -> Publish:
    if "data" not in fields.raw:
        raise fields._bad("'data' is required")
    message_id, stream, data = fields.message_id(), fields.stream(), fields.raw["data"]
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise fields._bad(f"'data' nests deeper than {MAX_JSON_DEPTH} levels")
    return Publish(message_id, stream, data)


PARSERS = {
    "send": _parse_send,
    "publish": _parse_publish,
    "subscribe": lambda f: Subscribe(
        f.stream(), f.seq("since", required=False), f.flag(f.raw, "compact")
    ),
    "unsubscribe": lambda f: Unsubscribe(f.stream()),
    "receipt": lambda f: Receipt(f.stream(), f.seq("seq", required=True)),
    "cancel": lambda f: Cancel(f.message_id()),
    "presence": lambda f: Presence(f.stream()),
    "ping": lambda f: Ping(),
}


def parse_frame(text: str, max_bytes: int) -> Frame:
    """Parse one client text frame, or raise ProtocolError."""
    # Characters are at most 4 bytes: only count bytes when the length is ambiguous.
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
        raise ProtocolError("too_large", f"frame larger than {max_bytes} bytes")
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object")
    frame_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    frame_type = raw.get("type")
    if not isinstance(frame_type, str):
        raise ProtocolError("bad_request", "frame has no 'type' string", frame_id)
    parser = PARSERS.get(frame_type)
    if parser is None:
        raise ProtocolError("bad_request", f"unknown frame type {frame_type!r}", frame_id)
    return parser(_Fields(raw, frame_id))


def ack_frame(frame_id: str, event_id: str, seq: int, duplicate: bool) -> str:
    return (
        '{"type":"ack","id":'
        + dumps(frame_id)
        + ',"event_id":'
        + dumps(event_id)
        + ',"seq":'
        + str(seq)
        + ',"duplicate":'
        + ("true" if duplicate else "false")
        + "}"
    )


PONG = '{"type":"pong"}'


def interrupts(send: Send) -> bool:
    """Whether a `send` asks to cancel its client's runs in flight on the stream first."""
    return send.options.get("interrupt") is True
