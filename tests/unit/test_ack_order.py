"""A client's own write comes before its event (realtime/subscription.py): the hub hands a
notification on as soon as it arrives (realtime/pubsub_link.py), which can be before the
write's answer, so a subscription keeps the stream's released events while a send or
publish of its connection to that stream is in flight, and lets them go as the acks are
written: those up to the acked seq at once, all of them once no write waits."""

from __future__ import annotations

from realtime.subscription import StreamSubscription


class Connection:
    """What a subscription uses of its connection, recording what reaches the socket."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.writes_in_flight: dict[str, int] = {}

    def push(self, frame: str) -> None:
        self.frames.append(frame)

    def push_many(self, frames: list[str]) -> None:
        self.frames.extend(frames)

    # The connection's side of a write, as GatewayConsumer._write_started/_write_ended.
    def start(self, stream: str) -> None:
        self.writes_in_flight[stream] = self.writes_in_flight.get(stream, 0) + 1

    def end(self, subscription: StreamSubscription, acked: int | None) -> None:
        if acked is not None:
            self.push(f"ack {acked}")
        self.writes_in_flight[subscription.stream] -= 1
        if not self.writes_in_flight[subscription.stream]:
            del self.writes_in_flight[subscription.stream]
        subscription.release_after_ack(acked)


def placed(connection: Connection, next_seq: int = 1) -> StreamSubscription:
    subscription = StreamSubscription(connection, "room")  # type: ignore[arg-type]
    subscription.cursor.start_at(next_seq)
    return subscription


def test_with_no_write_in_flight_an_event_goes_on_at_once() -> None:
    connection = Connection()
    subscription = placed(connection)
    subscription.on_event(1, "e1")
    assert connection.frames == ["e1"]


def test_the_own_event_waits_for_its_ack() -> None:
    connection = Connection()
    subscription = placed(connection)
    connection.start("room")
    subscription.on_event(1, "e1")  # the write's own event, before its answer
    assert connection.frames == []
    connection.end(subscription, 1)
    assert connection.frames == ["ack 1", "e1"]
    subscription.on_event(2, "e2")
    assert connection.frames[-1] == "e2"


def test_pipelined_writes_release_what_each_ack_covers() -> None:
    connection = Connection()
    subscription = placed(connection)
    connection.start("room")
    connection.start("room")
    for seq in (1, 2, 3):  # 1 and 3 are this client's, 2 someone else's
        subscription.on_event(seq, f"e{seq}")
    connection.end(subscription, 1)
    assert connection.frames == ["ack 1", "e1"]
    connection.end(subscription, 3)
    assert connection.frames == ["ack 1", "e1", "ack 3", "e2", "e3"]


def test_a_refused_write_lets_everything_kept_go_on() -> None:
    connection = Connection()
    subscription = placed(connection)
    connection.start("room")
    connection.start("room")
    subscription.on_event(1, "e1")
    connection.end(subscription, None)  # refused: no ack, no event of its own
    assert connection.frames == ["e1"]


def test_events_kept_stay_in_order_with_a_repair_and_are_bounded() -> None:
    connection = Connection()
    subscription = placed(connection)
    connection.start("room")
    subscription.repairing = True  # a repair is under way (its read is done below)
    subscription.on_event(2, "e2")  # 1 is missing: the cursor holds 2 back
    subscription._release(subscription.cursor.offer(1, "e1"))  # the repair's read
    assert connection.frames == []
    connection.end(subscription, 2)
    assert connection.frames == ["ack 2", "e1", "e2"]

    connection.start("room")
    total = StreamSubscription.MAX_BEFORE_ACK + 1
    for seq in range(3, 3 + total):
        subscription.on_event(seq, f"e{seq}")
    # Past the bound the kept events go on without waiting any longer.
    assert connection.frames[-1] == f"e{2 + total}"
    assert subscription.before_ack == []
