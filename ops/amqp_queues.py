"""What an AMQP broker (RabbitMQ) tells about Celery's queues, for /metrics and the live page.

A passive queue.declare answers, per queue, the messages ready (waiting for a consumer) and
the consumers attached; it needs no management plugin and creates nothing. What it cannot
tell is how many messages are delivered and not yet acknowledged: that is RabbitMQ's
management API's (or `rabbitmqctl list_queues messages_unacknowledged`), so Switchboard
reports it as unknown rather than guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from kombu import Connection

# One scrape or page load waits this long at most for the broker.
AMQP_TIMEOUT_S = 2.0


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


@dataclass(frozen=True, slots=True)
class AmqpQueue:
    name: str
    ready: int  # messages waiting for a consumer (0 for a queue not declared yet)
    consumers: int
    declared: bool


def read_amqp_queues(
    url: str, names: list[str], timeout_s: float = AMQP_TIMEOUT_S
) -> list[AmqpQueue]:
    """Each named queue's ready messages and consumers, by passive declares on one short
    connection. Raises what kombu raises (OSError, amqp errors) when the broker does not
    answer."""
    found: list[AmqpQueue] = []
    connection = Connection(url, connect_timeout=timeout_s, heartbeat=0)
    try:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
        channel = connection.channel()
        for name in names:
            try:
                answer = channel.queue_declare(queue=name, passive=True)
            except connection.channel_errors:
                # Not declared yet (no worker started since the broker's data was reset):
                # empty. The broker closed the channel for it: open another.
                found.append(AmqpQueue(name, 0, 0, False))
                channel = connection.channel()
                continue
            found.append(
                AmqpQueue(name, int(answer.message_count), int(answer.consumer_count), True)
            )
    finally:
        connection.release()
    return found
