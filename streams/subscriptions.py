"""Whether an event starts agents, as the streams' writers need to know it.

A client's `publish` and a run's `reply.done` that some agent subscribes to carry their
trigger task with them, written by the same script as the event (streams/log.py,
streams/runs.py). Which agents subscribe to what is the agents' registry's to say
(agents.subscribers); the registry sits above this package, so it is handed in once, when
Django loads the apps (orchestration/apps.py), and this package imports no agent code.
"""

from __future__ import annotations

from collections.abc import Callable

# (kind, from_agent, stream, status) -> whether any agent subscribes to such an event.
Lookup = Callable[[str, str, str, str | None], bool]

_lookup: Lookup | None = None


def answer_with(lookup: Lookup) -> None:
    """Install the registry's answer (once per process, at start)."""
    global _lookup
    _lookup = lookup


def subscribed(kind: str, from_agent: str, stream: str, status: str | None = None) -> bool:
    """Whether any agent subscribes to this event (`status`: a reply.done's)."""
    if _lookup is None:
        # Deciding "no" here would silently drop triggers: a process must load Django's
        # apps (django.setup) before it writes events.
        raise RuntimeError("no subscription lookup installed: Django's apps are not loaded")
    return _lookup(kind, from_agent, stream, status)
