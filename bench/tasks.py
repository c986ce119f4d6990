"""The naive path's Celery task: answer through the channel layer, the way the docs show."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer


@shared_task(name="bench.naive_reply", ignore_result=True)
def naive_reply(reply_channel: str, message_id: str | None, text: str) -> None:
    # A new event loop and layer connection per call: that is the cost being measured.
    async_to_sync(get_channel_layer().send)(
        reply_channel, {"type": "bench.reply", "id": message_id, "text": text}
    )
