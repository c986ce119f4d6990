"""Lua scripts: every write to a stream is one atomic script.

Atomicity is what makes the promises hold: the dedupe check, the seq, the log entry, the
live notification and (for a `send`) the run record and its Celery message are written
together or not at all, so a crash between two of them cannot lose or duplicate anything.

A published notification is `SEQ "\\n" EVENT_JSON` on the stream's channel.

Layout. Each script is a file of its own in `streams/lua/`, named after it. Its first
lines are a comment saying what it does atomically, its keys, its arguments and its answer,
then the lines that bind KEYS and ARGV to named locals; the body uses only those names.
Logic several scripts share is a fragment in the same directory, which a script pulls in
with a line `-- #include NAME.lua`, resolved here when the script is loaded, so each piece
of logic is written once.

Here, one typed wrapper per script: a dataclass whose fields are the script's keys
and arguments, named as its header binds them (`KEYS` and `ARGV` list them in that order),
and whose `result` turns the answer into Python values. `run` (blocking client) and
`run_async` (asyncio client) call it: EVALSHA, loading the script first when the server
does not know it (redis-py's `register_script`), registered once per client.
tests/unit/test_lua_scripts.py checks every wrapper against its file's header.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from project.conf import conf

LUA_DIR = Path(__file__).resolve().parent / "lua"
INCLUDE = re.compile(r"^[ \t]*-- #include (?P<name>\S+)[ \t]*$", re.MULTILINE)

# A script argument as redis-py encodes it.
Arg = str | int | float


# The fragment whose command depends on the client: streams/lua/publish.lua.
PUBLISH_FRAGMENT = "publish.lua"


def lua_source(name: str, including: tuple[str, ...] = (), sharded: bool = False) -> str:
    """The text of `streams/lua/<name>` with its includes replaced by the fragments' text
    (which may include others in turn). `sharded`: for a Redis Cluster, where the publish
    fragment publishes with SPUBLISH (sharded pub/sub) instead of PUBLISH."""
    if name in including:
        raise ValueError(f"Lua include cycle: {' -> '.join((*including, name))}")
    text = (LUA_DIR / name).read_text(encoding="utf-8")
    if name == PUBLISH_FRAGMENT and sharded:
        text = text.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
    return INCLUDE.sub(lambda found: lua_source(found["name"], (*including, name), sharded), text)


def is_cluster_client(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (streams/redis_clients.py)."""
    return isinstance(client, RedisCluster | AsyncRedisCluster)


class Lua:
    """One script file, read and resolved once per kind of Redis, and its registration on
    each client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = lua_source(name)
        self._sharded_source: str | None = None
        # Keyed weakly: a client that is closed and dropped takes its registration along.
        self._registered: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        # The last client and its script: nearly every call finds it here (a process has
        # one client of each kind), without the weak mapping's cost on the hot path.
        self._last: tuple[weakref.ref[Any], Any] | None = None

    def source_for(self, client: Any) -> str:
        """The script's text for `client`: with SPUBLISH for a Redis Cluster."""
        if not is_cluster_client(client):
            return self.source
        if self._sharded_source is None:
            self._sharded_source = lua_source(self.name, sharded=True)
        return self._sharded_source

    def on(self, client: redis.Redis | aredis.Redis) -> Any:
        """redis-py's Script (AsyncScript for an asyncio client) for `client`."""
        last = self._last
        if last is not None and last[0]() is client:
            return last[1]
        script = self._registered.get(client)
        if script is None:
            script = self._registered[client] = client.register_script(self.source_for(client))
        self._last = (weakref.ref(client), script)
        return script


class CrossSlot(Exception):
    """A script call whose keys hash to more than one slot: a Redis Cluster refuses it."""


R = TypeVar("R")


class Script(Generic[R]):
    """One call of a script: its keys and arguments as fields, in the order of `KEYS` and
    `ARGV`; a script that takes a variable number of either has one more field, named by
    `KEYS_TAIL` or `ARGV_TAIL`, holding the rest in order.

    Every call's keys must hash to one slot (a Redis Cluster runs a script on one node);
    with SWITCHBOARD_CHECK_SCRIPT_SLOTS on (the test suites) each call is checked, on a
    single Redis too, except the keys named in `SINGLE_REDIS_KEYS`: Celery's own (kombu's
    queue lists), which a script writes only while the broker is the streams' single Redis.
    With any other broker the wrapper passes the call's first key in their place (the
    script leaves them alone then: its message arguments are empty)."""

    __slots__ = ()

    LUA: ClassVar[Lua]
    KEYS: ClassVar[tuple[str, ...]]
    ARGV: ClassVar[tuple[str, ...]]
    KEYS_TAIL: ClassVar[str] = ""
    ARGV_TAIL: ClassVar[str] = ""
    SINGLE_REDIS_KEYS: ClassVar[frozenset[str]] = frozenset()

    def keys(self) -> list[Any]:
        found = list(_getter(type(self), "KEYS")(self))
        if self.KEYS_TAIL:
            found.extend(getattr(self, self.KEYS_TAIL))
        if self.SINGLE_REDIS_KEYS or conf().check_script_slots:
            found = _slot_keys(type(self), found)
        return found

    def args(self) -> list[Any]:
        found = list(_getter(type(self), "ARGV")(self))
        if self.ARGV_TAIL:
            found.extend(getattr(self, self.ARGV_TAIL))
        return found

    def result(self, raw: Any) -> R:
        """The script's answer as Python values."""
        raise NotImplementedError

    def run(self, client: redis.Redis) -> R:
        return self.result(self.LUA.on(client)(keys=self.keys(), args=self.args()))

    async def run_async(self, client: aredis.Redis) -> R:
        return self.result(await self.LUA.on(client)(keys=self.keys(), args=self.args()))

    def queue(self, client: aredis.Redis, pipe: Any) -> None:
        """Queue the call on `pipe`, a pipeline of `client`, as a plain EVALSHA; pass its
        answer from `pipe.execute()` to `result`. Not redis-py's script object on the
        pipeline: that makes every execute ask SCRIPT EXISTS first, a round trip (and a
        pooled connection) more per batch for what is known after the first; and a Redis
        Cluster's pipeline refuses it. A NoScriptError answer (a Redis restarted or
        flushed since) is the caller's to retry alone, which loads the script
        (run_pipelined_async does)."""
        keys = self.keys()
        pipe.execute_command("EVALSHA", self.LUA.on(client).sha, len(keys), *keys, *self.args())


_EXEMPT: dict[tuple[type, int], tuple[int, ...]] = {}


def _exempt_positions(cls: type[Script[Any]], count: int) -> tuple[int, ...]:
    """Where in a call's key list of `count` keys the class's SINGLE_REDIS_KEYS are
    (computed once per class and count: this runs on the hot path)."""
    found = _EXEMPT.get((cls, count))
    if found is None:
        found = _EXEMPT[(cls, count)] = _find_exempt(cls, count)
    return found


def _find_exempt(cls: type[Script[Any]], count: int) -> tuple[int, ...]:
    exempt = cls.SINGLE_REDIS_KEYS
    positions = [i for i, name in enumerate(cls.KEYS) if name in exempt]
    if cls.KEYS_TAIL and cls.KEYS_TAIL in exempt:
        positions.extend(range(len(cls.KEYS), count))
    return tuple(positions)


def _slot_keys(cls: type[Script[Any]], found: list[Any]) -> list[Any]:
    """The call's keys as sent: single-Redis-only keys replaced by the first other key when
    the broker is elsewhere, and (SWITCHBOARD_CHECK_SCRIPT_SLOTS) checked to share a slot."""
    current = conf()
    exempt: tuple[int, ...] = _exempt_positions(cls, len(found)) if cls.SINGLE_REDIS_KEYS else ()
    if exempt and not current.broker_in_streams_redis:
        others = [key for i, key in enumerate(found) if i not in exempt]
        if others:
            for i in exempt:
                found[i] = others[0]
            exempt = ()
    if current.check_script_slots:
        slots = {key_slot(_key_bytes(key)) for i, key in enumerate(found) if i not in exempt}
        if len(slots) > 1:
            raise CrossSlot(f"{cls.__name__}: keys in {len(slots)} slots: {found!r}")
    return found


def _key_bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


_GETTERS: dict[tuple[type, str], Callable[[Any], tuple[Any, ...]]] = {}


def _getter(cls: type[Script[Any]], table: str) -> Callable[[Any], tuple[Any, ...]]:
    """The fields named in `cls.KEYS` or `cls.ARGV` as a tuple, by one C-level call: this
    runs on every script call of the hot path."""
    getter = _GETTERS.get((cls, table))
    if getter is None:
        names: tuple[str, ...] = getattr(cls, table)
        if not names:
            getter = _nothing
        elif len(names) == 1:
            getter = _one(attrgetter(names[0]))
        else:
            getter = attrgetter(*names)
        _GETTERS[(cls, table)] = getter
    return getter


def _nothing(call: Any) -> tuple[Any, ...]:
    return ()


def _one(get: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    # attrgetter of one name answers the value itself, not a tuple of it.
    return lambda call: (get(call),)


class Coded(NamedTuple):
    """The {code, value} answer of most scripts: what each code means is in the script's
    header (1 done, 0 nothing to do, negative refused); `value` as text."""

    code: int
    value: str


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _coded(raw: list[Any]) -> Coded:
    code, value = raw
    return Coded(int(code), _text(value))


class Started(NamedTuple):
    """A Coded answer of a script that may create a run (ACCEPT_SEND, START_TRIGGERED_RUN):
    `ring_epoch` is the tenant's fair-queue epoch when the run made the queue non-empty
    (the caller then tells the ring, FAIR_JOIN), else 0."""

    code: int
    value: str
    ring_epoch: int


def _started(raw: list[Any]) -> Started:
    code, value, *rest = raw
    return Started(int(code), _text(value), int(rest[0]) if rest else 0)


def _texts(raw: list[bytes | str]) -> list[str]:
    return [_text(item) for item in raw]


# --- streams: appends ------------------------------------------------------------------------


@dataclass(slots=True)
class AppendEvent(Script[Coded]):
    """A client's `publish` (streams/log.py): value is "SEQ EVENT_ID"; code 0: duplicate."""

    LUA = Lua("append_event.lua")
    KEYS = ("seq_key", "log_key", "dedupe_key", "queue_key", "task_outbox_key")
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = (
        "channel",
        "prefix",
        "suffix",
        "maxlen",
        "dedupe_ttl",
        "event_id",
        "trigger_message",
        "outbox_entry",
    )

    seq_key: str
    log_key: str
    dedupe_key: str
    queue_key: str
    task_outbox_key: str
    channel: str
    prefix: str
    suffix: str
    maxlen: int
    dedupe_ttl: int
    event_id: str
    trigger_message: str
    outbox_entry: str

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


@dataclass(slots=True)
class AcceptSend(Script[Started]):
    """A client's `send` and its run (streams/log.py): value is "SEQ EVENT_ID RUN_ID" (code
    1, or 0 for a duplicate), or the wait in ms when refused (-1 runs in flight, -2 queued)."""

    LUA = Lua("accept_send.lua")
    KEYS = (
        "seq_key",
        "log_key",
        "dedupe_key",
        "run_key",
        "deadlines_key",
        "queue_key",
        "inflight_key",
        "queued_key",
        "fair_queue_key",
        "fair_state_key",
        "tokens_day_key",
        "tokens_month_key",
    )
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = (
        "channel",
        "prefix",
        "suffix",
        "maxlen",
        "dedupe_ttl",
        "event_id",
        "run_id",
        "deadline",
        "run_ttl",
        "celery_message",
        "max_in_flight",
        "max_queued",
        "counted_until",
        "fair_tenant",
        "fair_weight",
        "daily_budget",
        "monthly_budget",
    )
    ARGV_TAIL = "run_fields"

    seq_key: str
    log_key: str
    dedupe_key: str
    run_key: str
    deadlines_key: str
    queue_key: str
    inflight_key: str
    queued_key: str
    fair_queue_key: str
    fair_state_key: str
    tokens_day_key: str
    tokens_month_key: str
    channel: str
    prefix: str
    suffix: str
    maxlen: int
    dedupe_ttl: int
    event_id: str
    run_id: str
    deadline: str
    run_ttl: int
    celery_message: str
    max_in_flight: int
    max_queued: int
    counted_until: str
    fair_tenant: str
    fair_weight: int
    daily_budget: int
    monthly_budget: int
    run_fields: Sequence[Arg]  # name, value, name, value, ...

    def result(self, raw: Any) -> Started:
        return _started(raw)


@dataclass(slots=True)
class RecordReceipt(Script[Coded]):
    """A client's receipt (streams/receipts.py): code 1 recorded, 0 not newer (value: the
    stored seq), -1 beyond the head (value: the head)."""

    LUA = Lua("record_receipt.lua")
    KEYS = ("seq_key", "receipts_key", "index_key")
    ARGV = ("client", "seq", "stream", "ttl")

    seq_key: str
    receipts_key: str
    index_key: str
    client: str
    seq: int
    stream: str
    ttl: int

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


# --- runs ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClaimStep(Script[dict[str, str]]):
    """A worker takes a run's step (streams/runs.py): the run hash, or {} when the run is
    gone, finished or past this step."""

    LUA = Lua("claim_step.lua")
    KEYS = ("run_key", "text_key", "leases_key")
    ARGV = ("owner", "step", "lease_s", "grace_s", "run_id", "worker", "retries")

    run_key: str
    text_key: str
    leases_key: str
    owner: str
    step: int
    lease_s: float
    grace_s: int
    run_id: str
    worker: str
    retries: int

    def result(self, raw: Any) -> dict[str, str]:
        return {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}


@dataclass(slots=True)
class AppendDelta(Script[Coded]):
    """One reply piece by the run's owner: code 1 (value: its seq), -1 finished, -2 fenced,
    -3 wrong offset (value: the stored offset)."""

    LUA = Lua("append_delta.lua")
    KEYS = ("seq_key", "log_key", "run_key", "text_key", "leases_key")
    ARGV = (
        "channel",
        "prefix",
        "suffix",
        "maxlen",
        "owner",
        "offset",
        "piece_chars",
        "piece_fragment",
        "lease_s",
        "grace_s",
        "run_id",
    )

    seq_key: str
    log_key: str
    run_key: str
    text_key: str
    leases_key: str
    channel: str
    prefix: str
    suffix: str
    maxlen: int
    owner: str
    offset: int
    piece_chars: int
    piece_fragment: str
    lease_s: float
    grace_s: int
    run_id: str

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


@dataclass(slots=True)
class AppendToolEvent(Script[Coded]):
    """A run's tool.call or tool.result by its owner: code 1 (value: its seq), -1 finished,
    -2 fenced, -3 not the run's next tool event (value: how many it has)."""

    LUA = Lua("append_tool_event.lua")
    KEYS = ("seq_key", "log_key", "run_key", "text_key", "leases_key")
    ARGV = (
        "channel",
        "prefix",
        "suffix",
        "maxlen",
        "owner",
        "count",
        "step",
        "tools_ran",
        "lease_s",
        "grace_s",
        "run_id",
    )

    seq_key: str
    log_key: str
    run_key: str
    text_key: str
    leases_key: str
    channel: str
    prefix: str
    suffix: str
    maxlen: int
    owner: str
    count: int
    step: int
    tools_ran: str
    lease_s: float
    grace_s: int
    run_id: str

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


@dataclass(slots=True)
class RestartReply(Script[Coded]):
    """Void a step's streamed text (reply.restart): code 1, -1 finished, -2 fenced."""

    LUA = Lua("restart_reply.lua")
    KEYS = ("seq_key", "log_key", "run_key", "text_key", "leases_key")
    ARGV = (
        "channel",
        "restart_prefix",
        "restart_suffix",
        "maxlen",
        "owner",
        "keep_chars",
        "keep_fragment",
        "delta_prefix",
        "delta_suffix",
        "lease_s",
        "grace_s",
        "run_id",
    )

    seq_key: str
    log_key: str
    run_key: str
    text_key: str
    leases_key: str
    channel: str
    restart_prefix: str
    restart_suffix: str
    maxlen: int
    owner: str
    keep_chars: int
    keep_fragment: str
    delta_prefix: str
    delta_suffix: str
    lease_s: float
    grace_s: int
    run_id: str

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


@dataclass(slots=True)
class FinalizeRun(Script[Coded]):
    """The run's one reply.done: code 1 (value: its seq), 0 already finished, -2 fenced,
    -1 no run."""

    LUA = Lua("finalize_run.lua")
    KEYS = (
        "seq_key",
        "log_key",
        "run_key",
        "text_key",
        "deadlines_key",
        "leases_key",
        "queue_key",
        "history_outbox_key",
        "history_dropped_key",
        "problems_key",
        "task_outbox_key",
    )
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = (
        "channel",
        "prefix",
        "text_prefix",
        "tail",
        "maxlen",
        "owner",
        "status",
        "run_id",
        "finished_ttl",
        "trigger_message",
        "history_head",
        "history_max",
        "problem_entry",
        "problems_max",
        "worker_stop_prefix",
        "outbox_entry",
    )

    seq_key: str
    log_key: str
    run_key: str
    text_key: str
    deadlines_key: str
    leases_key: str
    queue_key: str
    history_outbox_key: str
    history_dropped_key: str
    problems_key: str
    task_outbox_key: str
    channel: str
    prefix: str
    text_prefix: str
    tail: str
    maxlen: int
    owner: str
    status: str
    run_id: str
    finished_ttl: int
    trigger_message: str
    history_head: str
    history_max: int
    problem_entry: str
    problems_max: int
    worker_stop_prefix: str
    outbox_entry: str

    def result(self, raw: Any) -> Coded:
        return _coded(raw)


@dataclass(slots=True)
class SaveOutput(Script[bool]):
    """A finished step's output, by its owner: False when no longer the owner's."""

    LUA = Lua("save_output.lua")
    KEYS = ("run_key",)
    ARGV = ("owner", "field", "output", "fell_back")

    run_key: str
    owner: str
    field: str
    output: str
    fell_back: str

    def result(self, raw: Any) -> bool:
        return bool(raw)


@dataclass(slots=True)
class AddUsage(Script[tuple[int, int]]):
    """One model call's tokens on its run and its tenant's day and month counters: the
    counters' totals after it (streams/usage.py)."""

    LUA = Lua("add_usage.lua")
    KEYS = ("run_key", "day_key", "month_key")
    ARGV = (
        "prompt_tokens",
        "completion_tokens",
        "estimated",
        "day_expires_at",
        "month_expires_at",
    )

    run_key: str
    day_key: str
    month_key: str
    prompt_tokens: int
    completion_tokens: int
    estimated: int
    day_expires_at: int
    month_expires_at: int

    def result(self, raw: Any) -> tuple[int, int]:
        today, month = raw
        return int(today), int(month)


@dataclass(slots=True)
class RenewLease(Script[bool]):
    """The owner's heartbeat: False when it no longer owns a running step."""

    LUA = Lua("renew_lease.lua")
    KEYS = ("run_key", "text_key", "leases_key")
    ARGV = ("owner", "lease_s", "grace_s", "run_id")

    run_key: str
    text_key: str
    leases_key: str
    owner: str
    lease_s: float
    grace_s: int
    run_id: str

    def result(self, raw: Any) -> bool:
        return bool(raw)


@dataclass(slots=True)
class RenewLeases(Script[list[bool]]):
    """RenewLease for many (run_id, owner) pairs: per pair, whether it was renewed."""

    LUA = Lua("renew_leases.lua")
    KEYS = ("leases_key",)
    ARGV = ("lease_s", "grace_s", "run_prefix")
    ARGV_TAIL = "owners"

    leases_key: str
    lease_s: float
    grace_s: int
    run_prefix: str
    owners: Sequence[str]  # run_id, owner, run_id, owner, ...

    def result(self, raw: Any) -> list[bool]:
        return [bool(answer) for answer in raw]


class HandedOver(NamedTuple):
    """HAND_OVER's and REDELIVER_STEP's publish lease: set while the caller publishes the
    step's message to a broker other than the streams' Redis ("" = none)."""

    done: bool
    lease: str


@dataclass(slots=True)
class HandOver(Script[HandedOver]):
    """The owner gives the run up to a queued step: not done when no longer its owner."""

    LUA = Lua("hand_over.lua")
    KEYS = ("run_key", "leases_key", "queue_key")
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = ("owner", "run_id", "message", "publish_lease_s")

    run_key: str
    leases_key: str
    queue_key: str
    owner: str
    run_id: str
    message: str
    publish_lease_s: float

    def result(self, raw: Any) -> HandedOver:
        if isinstance(raw, int):
            return HandedOver(bool(raw), "")
        return HandedOver(True, _text(raw))


@dataclass(slots=True)
class RedeliverStep(Script[tuple[Coded, str]]):
    """A lost step queued again: code 1 (value: redeliveries so far; with the publish
    lease), 0 nothing to do (value: why), -2 none left (value: redeliveries)."""

    LUA = Lua("redeliver_step.lua")
    KEYS = ("run_key", "leases_key", "queue_key")
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = ("run_id", "step", "message", "max_redeliveries", "publish_lease_s")

    run_key: str
    leases_key: str
    queue_key: str
    run_id: str
    step: str
    message: str
    max_redeliveries: int
    publish_lease_s: float

    def result(self, raw: Any) -> tuple[Coded, str]:
        code, value, *rest = raw
        return Coded(int(code), _text(value)), _text(rest[0]) if rest else ""


@dataclass(slots=True)
class DropPublishLease(Script[bool]):
    """A step's message is out: drop its publish lease (False: the run moved on)."""

    LUA = Lua("drop_publish_lease.lua")
    KEYS = ("run_key", "leases_key")
    ARGV = ("run_id", "lease")

    run_key: str
    leases_key: str
    run_id: str
    lease: str

    def result(self, raw: Any) -> bool:
        return bool(raw)


@dataclass(slots=True)
class StartTriggeredRun(Script[Started]):
    """A run started by a subscription (orchestration/triggers.py): code 1 started, 0
    already started by this event (value: that run's id), -2 the tenant's queue is full."""

    LUA = Lua("start_triggered_run.lua")
    KEYS = (
        "dedupe_key",
        "run_key",
        "deadlines_key",
        "queue_key",
        "queued_key",
        "fair_queue_key",
        "fair_state_key",
    )
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = (
        "run_id",
        "deadline",
        "run_ttl",
        "dedupe_ttl",
        "celery_message",
        "max_queued",
        "counted_until",
        "fair_tenant",
        "fair_weight",
    )
    ARGV_TAIL = "run_fields"

    dedupe_key: str
    run_key: str
    deadlines_key: str
    queue_key: str
    queued_key: str
    fair_queue_key: str
    fair_state_key: str
    run_id: str
    deadline: str
    run_ttl: int
    dedupe_ttl: int
    celery_message: str
    max_queued: int
    counted_until: str
    fair_tenant: str
    fair_weight: int
    run_fields: Sequence[Arg]  # name, value, name, value, ...

    def result(self, raw: Any) -> Started:
        return _started(raw)


# --- fair queue and rate buckets -------------------------------------------------------------


@dataclass(slots=True)
class FairJoin(Script[bool]):
    """A tenant's queue went non-empty: it joins the ring (streams/fairness.py), with the
    ticket; True when it was not in the ring."""

    LUA = Lua("fair_join.lua")
    KEYS = ("ring", "epochs", "queue_key")
    SINGLE_REDIS_KEYS = frozenset({"queue_key"})
    ARGV = ("tenant", "epoch", "message")

    ring: str
    epochs: str
    queue_key: str
    tenant: str
    epoch: int
    message: str

    def result(self, raw: Any) -> bool:
        return bool(raw)


class Popped(NamedTuple):
    """FAIR_POP's answer: the run taken ("" = the queue was empty), whether it was live
    (and now holds the pick lease), runs left, the queue's epoch and the tenant's weight."""

    run_id: str
    live: bool
    left: int
    epoch: int
    weight: int


@dataclass(slots=True)
class FairPop(Script[Popped]):
    """The tenant's part of a fair pick: the oldest queued run, leased when live."""

    LUA = Lua("fair_pop.lua")
    KEYS = ("fair_queue_key", "fair_state_key", "leases_key")
    ARGV = ("run_prefix", "lease_s")

    fair_queue_key: str
    fair_state_key: str
    leases_key: str
    run_prefix: str
    lease_s: float

    def result(self, raw: Any) -> Popped:
        run_id, live, left, epoch, weight = raw
        return Popped(_text(run_id), bool(int(live)), int(left), int(epoch), int(weight))


@dataclass(slots=True)
class FairSettle(Script[bool]):
    """The ring's part of a fair pick: True when the tenant left the ring."""

    LUA = Lua("fair_settle.lua")
    KEYS = ("ring", "deficits", "epochs", "picked")
    ARGV = ("tenant", "live", "left", "epoch", "weight")

    ring: str
    deficits: str
    epochs: str
    picked: str
    tenant: str
    live: int
    left: int
    epoch: int
    weight: int

    def result(self, raw: Any) -> bool:
        return bool(raw)


@dataclass(slots=True)
class OldestQueued(Script[tuple[int, float | None]]):
    """A tenant's fair queue for the outbox sweep: (runs queued, the oldest's creation)."""

    LUA = Lua("oldest_queued.lua")
    KEYS = ("fair_queue_key",)
    ARGV = ("run_prefix",)

    fair_queue_key: str
    run_prefix: str

    def result(self, raw: Any) -> tuple[int, float | None]:
        count, created = raw
        text = _text(created)
        return int(count), float(text) if text else None


@dataclass(slots=True)
class TakeTokens(Script[int]):
    """Tokens from several buckets, all or none (streams/buckets.py): 0 paid, else the ms
    until all could pay (-1: never)."""

    LUA = Lua("take_tokens.lua")
    KEYS = ()
    KEYS_TAIL = "buckets"
    ARGV = ("cost",)
    ARGV_TAIL = "limits"

    buckets: Sequence[str]
    cost: float
    limits: Sequence[float]  # rate_per_s, burst for each bucket in order

    def result(self, raw: Any) -> int:
        return int(raw)


# --- gateway: presence and connection counts -------------------------------------------------

_PRESENCE_KEYS = ("members", "counts", "names", "index", "lingering")
_PRESENCE_ARGV = ("channel", "index_member", "stream_json", "id_prefix", "ts_json", "announce_max")


@dataclass(slots=True)
class PresenceStream:
    """What every per-stream presence script takes first (realtime/presence.py)."""

    members: str
    counts: str
    names: str
    index: str
    lingering: str
    channel: str
    index_member: str
    stream_json: str
    id_prefix: str
    ts_json: str
    announce_max: int


class _PresenceScript(Script[R]):
    """A per-stream presence script: its `stream` part, then its own arguments."""

    __slots__ = ()
    OWN_ARGV: ClassVar[tuple[str, ...]] = ()
    KEYS = _PRESENCE_KEYS
    stream: PresenceStream

    def keys(self) -> list[Any]:
        return [getattr(self.stream, name) for name in _PRESENCE_KEYS]

    def args(self) -> list[Any]:
        common = [getattr(self.stream, name) for name in _PRESENCE_ARGV]
        return common + [getattr(self, name) for name in self.OWN_ARGV]


@dataclass(slots=True)
class PresenceJoin(_PresenceScript[int]):
    """Add or extend this gateway's member: 1 when the client joined (announced)."""

    LUA = Lua("presence_join.lua")
    OWN_ARGV = ("gateway", "ttl_ms", "client", "name")
    ARGV = _PRESENCE_ARGV + OWN_ARGV

    stream: PresenceStream
    gateway: str
    ttl_ms: int
    client: str
    name: str

    def result(self, raw: Any) -> int:
        return int(raw)


@dataclass(slots=True)
class PresenceLeave(_PresenceScript[int]):
    """Remove this gateway's member: 1 when the client left (announced)."""

    LUA = Lua("presence_leave.lua")
    OWN_ARGV = ("gateway", "client")
    ARGV = _PRESENCE_ARGV + OWN_ARGV

    stream: PresenceStream
    gateway: str
    client: str

    def result(self, raw: Any) -> int:
        return int(raw)


@dataclass(slots=True)
class PresenceSweep(_PresenceScript[int]):
    """Remove up to `limit` expired members of the stream: how many went."""

    LUA = Lua("presence_sweep.lua")
    OWN_ARGV = ("limit",)
    ARGV = _PRESENCE_ARGV + OWN_ARGV

    stream: PresenceStream
    limit: int

    def result(self, raw: Any) -> int:
        return int(raw)


@dataclass(slots=True)
class PresenceQuery(_PresenceScript[list[str]]):
    """Who is present: [client, name, client, name, ...], expired members removed first."""

    LUA = Lua("presence_query.lua")
    ARGV = _PRESENCE_ARGV

    stream: PresenceStream

    def result(self, raw: Any) -> list[str]:
        return _texts(raw)


@dataclass(slots=True)
class PresenceRefresh(Script[list[list[str]]]):
    """Extend this gateway's members of many streams: per stream, its clients that had no
    member any more."""

    LUA = Lua("presence_refresh.lua")
    KEYS = ("index",)
    KEYS_TAIL = "stream_members"
    ARGV = ("gateway", "ttl_ms")
    ARGV_TAIL = "per_stream"

    index: str
    stream_members: Sequence[str]
    gateway: str
    ttl_ms: int
    per_stream: Sequence[Arg]  # per stream: index member, client count, the clients

    def result(self, raw: Any) -> list[list[str]]:
        return [_texts(absent) for absent in raw]


@dataclass(slots=True)
class PresenceLinger(Script[int]):
    """Keep this gateway's members of many streams for `grace_ms` more at most (a connection
    that ended without a goodbye): how many members are kept."""

    LUA = Lua("presence_linger.lua")
    KEYS = ("index",)
    KEYS_TAIL = "stream_keys"
    ARGV = ("gateway", "grace_ms")
    ARGV_TAIL = "per_stream"

    index: str
    stream_keys: Sequence[str]  # per stream: its members key, its lingering key
    gateway: str
    grace_ms: int
    per_stream: Sequence[Arg]  # per stream: index member, client count, the clients

    def result(self, raw: Any) -> int:
        return int(raw)


@dataclass(slots=True)
class PresenceDue(Script[list[str]]):
    """Up to `limit` of a tenant's streams whose earliest presence entry expired."""

    LUA = Lua("presence_due.lua")
    KEYS = ("index",)
    ARGV = ("limit",)

    index: str
    limit: int

    def result(self, raw: Any) -> list[str]:
        return _texts(raw)


@dataclass(slots=True)
class AdmitConnection(Script[tuple[int, list[str]]]):
    """Count an opening connection (realtime/admission.py): (refused: 0 admitted, 1 tenant
    full, 2 client full; the gateways with a count that are neither live nor dead in
    `known`)."""

    LUA = Lua("admit_connection.lua")
    KEYS = ("tenant_counts", "client_counts")
    ARGV = ("gateway", "tenant_max", "client_max", "live_count")
    ARGV_TAIL = "known"

    tenant_counts: str
    client_counts: str
    gateway: str
    tenant_max: int
    client_max: int
    live_count: int
    known: Sequence[str]  # live gateways' ids (live_count of them), then dead ones'

    def result(self, raw: Any) -> tuple[int, list[str]]:
        refused, *unknown = raw
        return int(refused), _texts(unknown)


@dataclass(slots=True)
class ReleaseConnection(Script[None]):
    """A closed connection stops counting."""

    LUA = Lua("release_connection.lua")
    KEYS = ("tenant_counts", "client_counts")
    ARGV = ("gateway",)

    tenant_counts: str
    client_counts: str
    gateway: str

    def result(self, raw: Any) -> None:
        return None


@dataclass(slots=True)
class SaveSessions(Script[int]):
    """Many sessions' positions of one tenant written at once: how many were written."""

    LUA = Lua("save_sessions.lua")
    KEYS = ()
    KEYS_TAIL = "session_keys"
    ARGV = ()
    ARGV_TAIL = "per_save"

    session_keys: Sequence[str]
    per_save: Sequence[Arg]  # per key: owner, ttl_s, changed, gone, (field, seq)*, field*

    def result(self, raw: Any) -> int:
        return int(raw)


class GatewayLeases(NamedTuple):
    """RENEW_GATEWAY_LEASE's answer."""

    lost: bool  # this gateway's lease had lapsed (it was left so: the id is dead)
    dead: list[str]  # gateways whose lease lapsed, their counts not all reaped yet
    live: list[str]  # gateways whose lease is current (this one included unless lost)


@dataclass(slots=True)
class RenewGatewayLease(Script[GatewayLeases]):
    """Renew this gateway's lease (create it for a new id) and read everyone's."""

    LUA = Lua("renew_gateway_lease.lua")
    KEYS = ("leases",)
    ARGV = ("gateway", "lease_ms", "create", "dead_max")

    leases: str
    gateway: str
    lease_ms: int
    create: int
    dead_max: int

    def result(self, raw: Any) -> GatewayLeases:
        lost, dead, live = raw
        return GatewayLeases(bool(int(lost)), _texts(dead), _texts(live))


# --- orchestration, history, load tools ------------------------------------------------------


@dataclass(slots=True)
class CountTickets(Script[tuple[int, int]]):
    """(tickets waiting, tickets reserved recently) against runs queued, counted before
    (orchestration/tickets.py). Every key is kombu's: single Redis only."""

    LUA = Lua("count_tickets.lua")
    KEYS = ("unacked", "unacked_index")
    KEYS_TAIL = "queue_lists"
    SINGLE_REDIS_KEYS = frozenset({"unacked", "unacked_index", "queue_lists"})
    ARGV = ("queued", "reserved_since", "chunk")
    ARGV_TAIL = "marks"

    unacked: str
    unacked_index: str
    queue_lists: Sequence[str]
    queued: int
    reserved_since: str
    chunk: int
    marks: Sequence[str]

    def result(self, raw: Any) -> tuple[int, int]:
        waiting, reserved = raw
        return int(waiting), int(reserved)


@dataclass(slots=True)
class TakeHistoryBatch(Script[list[bytes]]):
    """The oldest `count` outbox records, moved to the processing list (history/persist.py),
    oldest first, as stored."""

    LUA = Lua("take_history_batch.lua")
    KEYS = ("outbox", "processing")
    ARGV = ("count",)

    outbox: str
    processing: str
    count: int

    def result(self, raw: Any) -> list[bytes]:
        return list(raw)


@dataclass(slots=True)
class RenewRecording(Script[bool]):
    """Extend a traffic recording's switch while it is this recording's (loadtest/record.py)."""

    LUA = Lua("renew_recording.lua")
    KEYS = ("switch",)
    ARGV = ("recording", "lease_ms")

    switch: str
    recording: str
    lease_ms: int

    def result(self, raw: Any) -> bool:
        return bool(raw)


@dataclass(slots=True)
class ReleaseRecording(Script[bool]):
    """Turn a traffic recording's switch off while it is this recording's."""

    LUA = Lua("release_recording.lua")
    KEYS = ("switch",)
    ARGV = ("recording",)

    switch: str
    recording: str

    def result(self, raw: Any) -> bool:
        return bool(raw)


async def run_pipelined_async(
    client: aredis.Redis, calls: Sequence[Script[Any]]
) -> list[Any | BaseException]:
    """Each call's result, or the exception it raised, from one non-transactional pipeline
    (in a Redis Cluster, one per node, sent at once: each call is one slot). A call that
    found its script unknown to the server is made again on its own, which loads it. A lone
    call goes alone: a pipeline would only add client CPU."""
    if len(calls) == 1:
        try:
            return [await calls[0].run_async(client)]
        except Exception as error:  # noqa: BLE001 - handed to the caller like the others
            return [error]
    async with client.pipeline(transaction=False) as pipe:
        for call in calls:
            call.queue(client, pipe)
        answers = await pipe.execute(raise_on_error=False)
    results = []
    for call, answer in zip(calls, answers, strict=True):
        if isinstance(answer, redis.exceptions.NoScriptError):
            try:
                results.append(await call.run_async(client))
            except Exception as error:  # noqa: BLE001 - handed to the caller like the others
                results.append(error)
        elif isinstance(answer, BaseException):
            results.append(answer)
        else:
            results.append(call.result(answer))
    return results


def all_scripts() -> list[type[Script[Any]]]:
    """Every wrapper defined here (for the checks in tests/unit/test_lua_scripts.py)."""
    found = [
        value
        for value in globals().values()
        if isinstance(value, type) and issubclass(value, Script) and "LUA" in vars(value)
    ]
    return sorted(found, key=lambda cls: cls.__name__)
