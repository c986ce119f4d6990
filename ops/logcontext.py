"""Structured logs: the ids of what a log line is about, added to every record.

Code that knows who it works for binds the ids once (`bind`, or `bound` for a scope); a
`ContextFilter` on the log handler copies them onto each record, so a line logged deep in
a library still says which tenant, connection, client, run and event it belongs to. In
JSON (`LOG_FORMAT=json`, `json_formatter`) they are fields of their own; the plain format
shows them in brackets before the message.

Where ids are bound:
- the gateway binds connection, tenant and client in the connection's own asyncio task
  (realtime/consumer.py), which runs every frame of that connection;
- a Celery step binds run (orchestration/tasks.py) and, once the run is claimed, tenant and
  event (the client's message that started it); the trigger task binds run and event.

Ids are values of a contextvar, which asyncio copies into every task created under it. The
gateway starts its process-wide tasks (the hub's reader, the flusher, the sweeper, ...)
lazily, from whichever connection needs them first; they would carry that connection's ids
forever. So ids bound inside an asyncio task apply only to records logged by that very
task; a task started under them logs without them (and may bind its own). Threads start
with no ids (a new thread gets an empty context).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# Record attributes, JSON field names and plain-format labels, in the order shown.
FIELDS = ("tenant", "connection", "client", "run", "event")


@dataclass(frozen=True, slots=True)
class LogIds:
    tenant: str | None = None
    connection: str | None = None
    client: str | None = None
    run: str | None = None
    event: str | None = None
    # The asyncio task that bound them (None outside an event loop): see the module doc.
    owner: asyncio.Task[Any] | None = None
    scoped: bool = False  # bound by a `bound` block, which `update` may add to

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name in FIELDS if (value := getattr(self, name)) is not None]


_ids: ContextVar[LogIds | None] = ContextVar("switchboard_log_ids", default=None)
_EMPTY = LogIds()


def _running_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop: a worker, a thread
        return None


def current() -> LogIds:
    """The ids that apply to a record logged here and now."""
    ids = _ids.get()
    if ids is None or (ids.owner is not None and ids.owner is not _running_task()):
        return _EMPTY
    return ids


def bind(
    *,
    tenant: str | None = None,
    connection: str | None = None,
    client: str | None = None,
    run: str | None = None,
    event: str | None = None,
) -> Token[LogIds | None]:
    """Add ids to those bound here (None leaves one as it is), until the context ends or
    the returned token is reset."""
    return _set(current(), tenant, connection, client, run, event)


def _set(base: LogIds, *given: str | None, scoped: bool | None = None) -> Token[LogIds | None]:
    changes = {name: value for name, value in zip(FIELDS, given, strict=True) if value is not None}
    scope = base.scoped if scoped is None else scoped
    return _ids.set(replace(base, owner=_running_task(), scoped=scope, **changes))


@contextmanager
def bound(
    *,
    tenant: str | None = None,
    connection: str | None = None,
    client: str | None = None,
    run: str | None = None,
    event: str | None = None,
) -> Iterator[None]:
    """Bind ids for a block: on exit every id is as before, including those `update` added
    inside it (a pool process runs task after task in one context: nothing may leak)."""
    token = _set(current(), tenant, connection, client, run, event, scoped=True)
    try:
        yield
    finally:
        _ids.reset(token)


def update(
    *,
    tenant: str | None = None,
    connection: str | None = None,
    client: str | None = None,
    run: str | None = None,
    event: str | None = None,
) -> None:
    """Add ids learnt inside a `bound` block (a run's tenant once it is loaded, say) to it.
    Outside one it does nothing, so code called directly (tests, a shell) leaves no ids
    behind in the caller's context."""
    ids = current()
    if ids.scoped:
        _set(ids, tenant, connection, client, run, event)


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (as attributes named like FIELDS, only those
    set) and `log_context`, their plain-text form (" [tenant=acme run=r1]" or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        items = current().items()
        for name, value in items:
            if not hasattr(record, name):  # an explicit `extra=` wins
                setattr(record, name, value)
        record.log_context = (
            " [" + " ".join(f"{name}={value}" for name, value in items) + "]" if items else ""
        )
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per line: timestamp, level, logger, message, process, the bound ids
    (and any `extra=` fields), plus exc_info when there is a traceback."""
    return JsonFormatter(
        ["levelname", "name", "message", "process"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
        # The plain format's rendering of the ids: JSON has them as fields already.
        reserved_attrs=[*RESERVED_ATTRS, "log_context"],
    )
