"""Baseline consumers: the plain Channels way of doing what the gateway does.

They are deliberately stock `AsyncWebsocketConsumer`s (a channel-layer channel per socket,
`close_old_connections` per message, handlers looked up by name), because the benchmarks
measure the gateway against what a Django project gets without it.

- `EchoConsumer`   echoes every text frame: the floor of a Channels round trip.
- `NaiveConsumer`  the naive orchestration path: `task.delay()` per frame, the task answers
                   with `async_to_sync(channel_layer.send)` to this consumer's channel.
- `PlainConsumer`  checks the same JWT the gateway accepts, then idles: idle memory and
                   connect-rate baseline.
- `GroupConsumer`  a `PlainConsumer` in a Channels group (one member per socket); a
                   `publish` frame is `group_send` to the group: the fan-out baseline.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import jwt
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from bench.tasks import naive_reply

CLOSE_UNAUTHORIZED = 4001
DEFAULT_GROUP = "bench-fanout"

# slug -> signing secret. Read once per process: a baseline that queried the database on
# every handshake would measure SQLite, not Channels.
_secrets: dict[str, str | None] = {}


def _load_secret(slug: str) -> str | None:
    from tenants.models import Tenant

    tenant = Tenant.objects.filter(slug=slug, enabled=True).first()
    return tenant.signing_secret if tenant else None


async def verify_token(token: str | None) -> dict[str, Any] | None:
    """The claims of a valid tenant token, or None: the plain-stack equivalent of the
    gateway's authentication (same algorithm, same required claims)."""
    if not token:
        return None
    try:
        slug = jwt.decode(token, options={"verify_signature": False}).get("tnt")
        if not isinstance(slug, str):
            return None
        if slug not in _secrets:
            _secrets[slug] = await database_sync_to_async(_load_secret)(slug)
        secret = _secrets[slug]
        if secret is None:
            return None
        return jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub", "tnt"]}
        )
    except jwt.PyJWTError:
        return None


def _query(scope: dict[str, Any]) -> dict[str, str]:
    raw = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True)
    return {name: values[0] for name, values in raw.items()}


class EchoConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None:
            await self.send(text_data=text_data)


class NaiveConsumer(AsyncWebsocketConsumer):
    """Frames in: `{"id", "text"}`; replies out: `{"type": "reply.done", "id", "text"}`."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            return
        frame = json.loads(text_data)
        # Blocking publish inside the event loop: exactly what the naive path does.
        naive_reply.delay(self.channel_name, frame.get("id"), frame.get("text", ""))

    async def bench_reply(self, event: dict[str, Any]) -> None:
        await self.send(
            text_data=json.dumps({"type": "reply.done", "id": event["id"], "text": event["text"]})
        )


class PlainConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.claims = await verify_token(_query(self.scope).get("token"))
        if self.claims is None:
            await self.accept()
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        await self.accept()


class GroupConsumer(PlainConsumer):
    """`?group=NAME` (default bench-fanout); `&join=0` for a publisher that only sends."""

    group: str | None = None

    async def connect(self) -> None:
        query = _query(self.scope)
        self.claims = await verify_token(query.get("token"))
        if self.claims is None:
            await self.accept()
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        if query.get("join", "1") != "0":
            self.group = query.get("group") or DEFAULT_GROUP
            # Joined before accept, so an open socket is already a member.
            await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            return
        frame = json.loads(text_data)
        if frame.get("type") == "publish":
            group = frame.get("group") or DEFAULT_GROUP
            await self.channel_layer.group_send(group, {"type": "bench.event", "text": text_data})

    async def bench_event(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])
