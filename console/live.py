"""What the admin's live page shows, read from Redis and Celery as they are now.

- `snapshot` (the admin, sync): Celery queue depths, the fair queues, runs not finished
  with their step and age, recent failed and degraded runs, connections, presence and
  tokens used today and this month (against its budgets) per tenant, the refusal counts
  of the last minutes (realtime/throttles.py), and what each worker runs. Every list is
  bounded, so the page costs Redis the same whatever a deployment holds; Redis and Celery
  failures become messages in `errors`, never an exception.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.exceptions import RedisError

from ops.amqp_queues import is_amqp, read_amqp_queues
from project.conf import conf
from streams import keys
from streams.registry import tenants
from streams.tokens import tokens_used

logger = logging.getLogger(__name__)

# Refusal reasons, as counted by the gateway (realtime/consumer.py).
THROTTLE_REASONS = {
    "messages": "message rate (rate_limited)",
    "runs_in_flight": "runs in flight per connection (rate_limited)",
    "queued_runs": "queued runs of the tenant (overloaded)",
    "connections": "connections (close 4029)",
    "subscriptions": "subscriptions per connection (rate_limited)",
    "receipts": "receipt rate (rate_limited)",
    "token_budget": "token budget spent (budget_exhausted)",
    "redis_pool": "gateway's Redis connections all busy (overloaded)",
}
# The gateways keep their per-minute refusal counts (realtime/throttles.py) for
# THROTTLE_KEEP_S; the page shows the last THROTTLE_MINUTES_SHOWN minutes of them.
THROTTLE_MINUTES_SHOWN = 5

# The page is a look, not an export: bounded whatever Redis holds.
RUNS_SHOWN = 200
TENANTS_SHOWN = 500
PRESENCE_STREAMS_READ = 2000
PROBLEMS_SHOWN = 50
FAIR_TENANTS_SHOWN = 200
# Workers are asked once per refresh; one broadcast waits this long for their answers.
INSPECT_TIMEOUT_S = 1.0
RUN_FIELDS = (
    "tenant",
    "agent",
    "stream",
    "status",
    "step",
    "created",
    "attempt",
    "worker",
    "lease",
    "redeliveries",
    "deadline",
)


# --- reading (the admin) ---------------------------------------------------------------


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _number(value: bytes | str | None) -> float | None:
    try:
        return float(_text(value)) if value not in (None, b"", "") else None
    except ValueError:
        return None


def redis_now(client: redis.Redis) -> float:
    """Epoch seconds by the Redis clock, the clock leases and connection expiries use."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def queue_names() -> list[str]:
    # The project's Celery app (project/celery.py), found the way Celery finds it.
    from celery import current_app

    return [queue.name for queue in current_app.conf.task_queues or ()]


def read_celery_queues(broker: redis.Redis) -> dict[str, Any]:
    """Depth of every declared queue (the Redis transport's lists) and the messages
    delivered to a worker and not yet acknowledged (its `unacked` hash)."""
    names = queue_names()
    with broker.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(keys.celery_queue(name))
        pipe.hlen(keys.celery_queue("unacked"))
        results = pipe.execute()
    return {
        "queues": [
            {"queue": name, "depth": int(depth)}
            for name, depth in zip(names, results[:-1], strict=True)
        ],
        "unacked": int(results[-1]),
    }


def read_amqp_celery_queues(url: str, errors: list[str]) -> dict[str, Any] | None:
    """Messages ready in every declared queue of an AMQP broker (RabbitMQ); the messages
    delivered and not yet acknowledged are unknown there (None: RabbitMQ's management UI
    shows them). None, with the error said, when the broker does not answer."""
    try:
        queues = read_amqp_queues(url, queue_names())
    except Exception as error:  # noqa: BLE001 - any failure of the broker: say it, go on
        logger.warning("live page: AMQP broker not read: %s", error)
        errors.append(f"Celery's broker (AMQP) could not be read: {error}")
        return None
    return {
        "queues": [{"queue": queue.name, "depth": queue.ready} for queue in queues],
        "unacked": None,
    }


def read_fair_queues(client: redis.Redis) -> list[dict[str, Any]]:
    """The tenants with runs in their fair queue, in the ring's order (next pick first)."""
    ring = [_text(slug) for slug in client.lrange(keys.FAIR_RING, 0, FAIR_TENANTS_SHOWN - 1)]
    if not ring:
        return []
    with client.pipeline(transaction=False) as pipe:
        for slug in ring:
            pipe.llen(keys.fair_queue(slug))
        for slug in ring:
            pipe.hget(keys.fair_state(slug), "weight")
        pipe.hmget(keys.FAIR_DEFICITS, ring)
        *found, deficits = pipe.execute()
    lengths, weights = found[: len(ring)], found[len(ring) :]
    return [
        {
            "tenant": slug,
            "queued": int(length),
            "deficit": _number(deficit),
            "weight": _number(weight),
        }
        for slug, length, deficit, weight in zip(ring, lengths, deficits, weights, strict=True)
    ]


def read_runs(client: redis.Redis, now: float) -> dict[str, Any]:
    """Runs accepted and not finished (the deadline set holds each exactly that long),
    earliest deadline first: tenant, agent, status, step, age, lease left, worker."""
    slugs = tenants(client)
    with client.pipeline(transaction=False) as pipe:
        # Each tenant's deadlines are indexed in its own slot: the earliest of each, merged.
        for slug in slugs:
            pipe.zcard(keys.run_deadlines(slug))
            pipe.zrange(keys.run_deadlines(slug), 0, RUNS_SHOWN - 1, withscores=True)
        answers = pipe.execute() if slugs else []
    total = sum(int(count) for count in answers[0::2])
    earliest = sorted((score, _text(run_id)) for page in answers[1::2] for run_id, score in page)[
        :RUNS_SHOWN
    ]
    ids = [run_id for _, run_id in earliest]
    with client.pipeline(transaction=False) as pipe:
        for run_id in ids:
            pipe.hmget(keys.run(run_id), RUN_FIELDS)
        records = pipe.execute()
    runs = []
    for run_id, values in zip(ids, records, strict=True):
        fields = dict(zip(RUN_FIELDS, values, strict=True))
        if fields["tenant"] is None:
            continue  # finished and expired meanwhile
        created = _number(fields["created"])
        lease = _number(fields["lease"])
        deadline = _number(fields["deadline"])
        runs.append(
            {
                "run": run_id,
                "tenant": _text(fields["tenant"]),
                "agent": _text(fields["agent"]),
                "stream": _text(fields["stream"]),
                "status": _text(fields["status"]),
                "step": int(_number(fields["step"]) or 0),
                "attempt": int(_number(fields["attempt"]) or 0),
                "redeliveries": int(_number(fields["redeliveries"]) or 0),
                "age_s": round(now - created, 1) if created is not None else None,
                "lease_left_s": round(lease - now, 1) if lease is not None else None,
                "deadline_in_s": round(deadline - now, 1) if deadline is not None else None,
                "worker": _text(fields["worker"]),
            }
        )
    return {"total": int(total), "shown": runs}


def read_tenants(client: redis.Redis, slugs: list[str], now: float) -> dict[str, dict[str, int]]:
    """Per tenant: open connections (counts of gateways whose lease is current) and runs
    queued."""
    now_ms = int(now * 1000)
    with client.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.GATEWAY_LEASES, now_ms, "+inf")
        for slug in slugs:
            pipe.hgetall(keys.connections_tenant(slug))
            pipe.zcount(keys.runs_queued(slug), now, "+inf")
        results = pipe.execute()
    alive = set(results[0])
    return {
        slug: {
            "connections": sum(
                int(count) for gateway, count in results[1 + 2 * i].items() if gateway in alive
            ),
            "queued": int(results[2 + 2 * i]),
        }
        for i, slug in enumerate(slugs)
    }


def read_presence(client: redis.Redis) -> dict[str, dict[str, int]]:
    """Per tenant: streams with someone present, and clients present summed over them (a
    client on two streams counts twice). From the tenants' presence indexes: no SCAN."""
    slugs = tenants(client)
    with client.pipeline(transaction=False) as pipe:
        # Each tenant's index is in its own slot.
        for slug in slugs:
            pipe.zrange(keys.presence_due(slug), 0, PRESENCE_STREAMS_READ - 1)
        indexes = pipe.execute() if slugs else []
    pairs: list[tuple[str, str]] = []
    for slug, streams in zip(slugs, indexes, strict=True):
        pairs.extend((slug, _text(stream)) for stream in streams)
    pairs = pairs[:PRESENCE_STREAMS_READ]
    with client.pipeline(transaction=False) as pipe:
        for tenant, stream in pairs:
            pipe.hlen(keys.presence_counts(tenant, stream))
        counts = pipe.execute() if pairs else []
    result: dict[str, dict[str, int]] = {}
    for (tenant, _), present in zip(pairs, counts, strict=True):
        if not present:
            continue
        entry = result.setdefault(tenant, {"streams": 0, "present": 0})
        entry["streams"] += 1
        entry["present"] += int(present)
    return result


def read_problems(client: redis.Redis) -> list[dict[str, Any]]:
    """Failed and degraded runs, newest first, as FINALIZE_RUN recorded them (the list may
    not exist: then there is none recently). Entries that do not parse are skipped."""
    slugs = tenants(client)
    with client.pipeline(transaction=False) as pipe:
        # Each tenant's list is in its own slot: the newest of each, merged by time.
        for slug in slugs:
            pipe.lrange(keys.recent_problems(slug), 0, PROBLEMS_SHOWN - 1)
        pages = pipe.execute() if slugs else []
    problems = []
    for raw in (raw for page in pages for raw in page):
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            problems.append(
                {
                    name: entry.get(name)
                    for name in ("run", "tenant", "stream", "agent", "status", "reason", "at")
                }
            )
    problems.sort(key=lambda entry: str(entry.get("at") or ""), reverse=True)
    return problems[:PROBLEMS_SHOWN]


def read_history_outbox(client: redis.Redis) -> dict[str, int]:
    """Finished runs waiting to be written to the conversation history, and how many the
    outbox's cap dropped since it began (the persister fell behind or was down)."""
    from history.persist import outbox_status

    status = outbox_status(client)
    return {"waiting": status.waiting, "processing": status.processing, "dropped": status.dropped}


def read_throttles(client: redis.Redis, now: float) -> dict[str, Any]:
    """Refusals per tenant and reason in each of the last minutes (oldest first)."""
    current = int(now // 60)
    minutes = list(range(current - THROTTLE_MINUTES_SHOWN + 1, current + 1))
    with client.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(keys.throttled(minute))
        hashes = pipe.execute()
    rows: dict[tuple[str, str], list[int]] = {}
    for index, counts in enumerate(hashes):
        for field, value in counts.items():
            tenant, _, reason = _text(field).partition(":")
            row = rows.setdefault((tenant, reason), [0] * len(minutes))
            row[index] = int(value)
    return {
        "minutes": [time.strftime("%H:%M", time.gmtime(minute * 60)) for minute in minutes],
        "rows": [
            {
                "tenant": tenant,
                "reason": reason,
                "label": THROTTLE_REASONS.get(reason, reason),
                "counts": counts,
                "total": sum(counts),
            }
            for (tenant, reason), counts in sorted(rows.items())
        ],
    }


# One thread asks the workers: an inquiry stuck on an unreachable broker is never joined by
# a second one, however often the page refreshes.
_inspector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin-inspect")
_inquiry: Future[Any] | None = None


def _ask_workers() -> dict[str, Any] | None:
    from celery import current_app

    # `active` alone: every worker that answers is online (with [] when idle), so a second
    # broadcast (`ping`) would only double the wait.
    return current_app.control.inspect(timeout=INSPECT_TIMEOUT_S).active()


def read_workers(ask: Callable[[], dict[str, Any] | None] = _ask_workers) -> dict[str, Any]:
    """What each worker that answers within INSPECT_TIMEOUT_S is running. `answered` is
    False when no worker answered (none online, or the broker is unreachable)."""
    global _inquiry
    if _inquiry is not None and not _inquiry.done():
        return {"answered": False, "workers": [], "note": "the previous inquiry is still waiting"}
    _inquiry = _inspector.submit(ask)
    try:
        replies = _inquiry.result(timeout=INSPECT_TIMEOUT_S + 2.0)
    except FutureTimeout:
        return {"answered": False, "workers": [], "note": "no answer in time"}
    if not replies:
        return {"answered": False, "workers": [], "note": "no worker answered"}
    workers = []
    for name, tasks in sorted(replies.items()):
        workers.append(
            {
                "name": name,
                "host": name.partition("@")[2] or name,
                "tasks": [
                    {
                        "id": task.get("id"),
                        "task": task.get("name") or task.get("type"),
                        "args": task.get("args"),
                        "pid": task.get("worker_pid"),
                        "started": task.get("time_start"),
                    }
                    for task in tasks or ()
                ],
            }
        )
    return {"answered": True, "workers": workers, "note": ""}


def attach_runs(workers: list[dict[str, Any]], runs: Iterable[dict[str, Any]], now: float) -> None:
    """Name the run each worker task is executing: a run records the host:pid of the process
    that claimed it, and a task reports its pool process (a fair ticket names no run)."""
    by_process = {run["worker"]: run for run in runs if run.get("worker")}
    for worker in workers:
        for task in worker["tasks"]:
            run = by_process.get(f"{worker['host']}:{task['pid']}")
            task["run"] = run["run"] if run else None
            task["tenant"] = run["tenant"] if run else None
            task["agent"] = run["agent"] if run else None
            task["step"] = run["step"] if run else None
            started = task.get("started")
            task["running_s"] = round(now - started, 1) if isinstance(started, float) else None


def broker_client(client: redis.Redis) -> redis.Redis | None:
    """The Redis holding Celery's queues: this one, another Redis, or None (not Redis)."""
    broker_url = conf().broker_url
    if conf().broker_in_streams_redis:
        return client
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    return None


def snapshot(
    client: redis.Redis,
    tenants: list[dict[str, Any]],
    tenants_total: int,
    ask_workers: Callable[[], dict[str, Any] | None] = _ask_workers,
) -> dict[str, Any]:
    """Everything the live page shows. `tenants`: the database's rows (slug, enabled,
    weight), at most TENANTS_SHOWN; the tenants found only in Redis are added."""
    errors: list[str] = []
    data: dict[str, Any] = {
        "at": time.time(),
        "errors": errors,
        "celery": None,
        "fair": [],
        "runs": {"total": 0, "shown": []},
        "tenants": [],
        "tenants_total": tenants_total,
        "problems": [],
        "history": None,
        "throttles": {"minutes": [], "rows": []},
        "workers": {"answered": False, "workers": [], "note": "not asked"},
        "limits": {"runs": RUNS_SHOWN, "tenants": TENANTS_SHOWN, "problems": PROBLEMS_SHOWN},
    }
    redis_ok = True
    try:
        now = redis_now(client)
        data["at"] = now
        broker = broker_client(client)
        if broker is None and is_amqp(conf().broker_url):
            data["celery"] = read_amqp_celery_queues(conf().broker_url, errors)
        elif broker is None:
            errors.append("Celery's broker is neither Redis nor AMQP: queue depths are not shown")
        else:
            try:
                data["celery"] = read_celery_queues(broker)
            finally:
                if broker is not client:
                    broker.close()
        data["fair"] = read_fair_queues(client)
        data["runs"] = read_runs(client, now)
        data["problems"] = read_problems(client)
        data["history"] = read_history_outbox(client)
        data["throttles"] = read_throttles(client, now)
        data["tenants"] = _tenant_rows(client, tenants, data, now)
    except RedisError as error:
        redis_ok = False
        logger.warning("live page: Redis not read: %s", error)
        errors.append(f"Redis could not be read: {error}")
    if redis_ok or not conf().broker_in_streams_redis:
        try:
            workers = read_workers(ask_workers)
        except Exception as error:  # noqa: BLE001 - any failure of the broadcast: say it
            logger.warning("live page: workers not asked: %s", error)
            errors.append(f"Celery workers could not be asked: {error}")
        else:
            attach_runs(workers["workers"], data["runs"]["shown"], data["at"])
            data["workers"] = workers
    else:
        data["workers"]["note"] = "not asked: the broker is this Redis, which did not answer"
    return data


def _tenant_rows(
    client: redis.Redis, tenants: list[dict[str, Any]], data: dict[str, Any], now: float
) -> list[dict[str, Any]]:
    rows = {row["slug"]: dict(row) for row in tenants}
    # Tenants that Redis knows and the database does not (deleted, or beyond the bound).
    seen = {run["tenant"] for run in data["runs"]["shown"]}
    seen |= {entry["tenant"] for entry in data["fair"]}
    seen |= {row["tenant"] for row in data["throttles"]["rows"]}
    presence = read_presence(client)
    seen |= set(presence)
    for slug in sorted(seen - set(rows)):
        rows[slug] = {"slug": slug, "enabled": None, "weight": None}
    counts = read_tenants(client, list(rows), now)
    # The budgets' UTC day and month by the Redis clock (the workers count by theirs).
    tokens = tokens_used(client, list(rows), datetime.fromtimestamp(now, UTC))
    fair = {entry["tenant"]: entry["queued"] for entry in data["fair"]}
    running: Counter[str] = Counter()
    for run in data["runs"]["shown"]:
        running[run["tenant"]] += 1
    throttled: Counter[str] = Counter()
    for row in data["throttles"]["rows"]:
        throttled[row["tenant"]] += row["total"]
    result = []
    for slug, row in rows.items():
        present = presence.get(slug, {"streams": 0, "present": 0})
        result.append(
            {
                **row,
                **counts[slug],
                "fair_queue": fair.get(slug, 0),
                "unfinished": running[slug],
                "presence_streams": present["streams"],
                "present": present["present"],
                "throttled": throttled[slug],
                "tokens_today": tokens[slug][0],
                "tokens_month": tokens[slug][1],
            }
        )
    return result
