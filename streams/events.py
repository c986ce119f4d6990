"""Stream events as JSON text, built around a seq that only Redis can assign.

An event is stored and sent as one JSON object. Its `seq` is assigned inside the append
script, so Python builds the text on either side of it: `prefix + str(seq) + suffix`.
The stored text is exactly the frame every subscriber receives, so it is never re-encoded.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

# \Z, not $: "$" also matches before a trailing newline, which would let "room\n" through.
STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,199}\Z")
MESSAGE_ID = re.compile(r"^[\x21-\x7e]{1,128}\Z")


def new_event_id() -> str:
    return uuid.uuid4().hex


def new_run_id(tenant: str) -> str:
    """`r<32 hex>.<TENANT>`: the id embeds its tenant (slugs hold no dot), so any holder of
    it finds the run's keys, which live in the tenant's hash slot (streams/keys.py)."""
    return "r" + uuid.uuid4().hex + "." + tenant


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def cause_of(client: str | None, message_id: str | None, prev: str | None) -> dict[str, Any]:
    return {"client": client, "message": message_id, "prev": prev}


def event_parts(
    *,
    stream: str,
    event_id: str,
    kind: str,
    sender: str,
    cause: dict[str, Any],
    data: dict[str, Any] | Any,
    ts: str | None = None,
) -> tuple[str, str]:
    """Return (prefix, suffix) such that prefix + str(seq) + suffix is the event's JSON."""
    prefix = '{"type":"event","stream":' + dumps(stream) + ',"seq":'
    suffix = (
        ',"id":'
        + dumps(event_id)
        + ',"kind":'
        + dumps(kind)
        + ',"from":'
        + dumps(sender)
        + ',"cause":'
        + dumps(cause)
        + ',"ts":'
        + dumps(ts or utc_now_iso())
        + ',"data":'
        + dumps(data)
        + "}"
    )
    return prefix, suffix


def json_fragment(text: str) -> str:
    """The JSON-escaped body of a string, without quotes; fragments concatenate safely."""
    return dumps(text)[1:-1]


def text_from_fragments(fragments: str) -> str:
    return orjson.loads('"' + fragments + '"')
