"""Two per-connection costs of autobahn (daphne's WebSocket library), paid once per process.

Both were measured on the handshake path and in idle memory (docs/performance.md):

1. Every new protocol copies about forty options from its factory into its own
   `__dict__` (autobahn's `_connectionMade` copies each one the instance does not already
   have). Setting them once on daphne's protocol class makes every later instance find
   them there and keep a small `__dict__`: the values are the factory's, which daphne
   fixes before it accepts the first connection.
2. Every handshake formats two debug lines with `pprint.pformat` (the option list and the
   transport details) even when debug logging is off. autobahn's module-level `pformat`
   is replaced by one that defers the formatting until a log line is really written.

Both apply to the protocol class and module autobahn ships with daphne; each is checked
before it is applied, so an autobahn that changes these internals just runs untuned.
"""

from __future__ import annotations

import inspect
import logging
import pprint
from typing import Any

logger = logging.getLogger(__name__)

_class_tuned = False


class _DeferredPformat:
    """Formats like pprint.pformat, but only when a log line is actually rendered."""

    __slots__ = ("value",)

    def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def defer_debug_formatting() -> None:
    try:
        from autobahn.websocket import protocol as autobahn_protocol
    except ImportError:  # pragma: no cover - autobahn comes with daphne
        return
    if getattr(autobahn_protocol, "pformat", None) is not pprint.pformat:
        return
    autobahn_protocol.pformat = _DeferredPformat
    timings = getattr(autobahn_protocol, "Timings", None)
    if timings is not None:
        # Timings.__str__ must still return a real string.
        timings.__str__ = lambda self: pprint.pformat(self._timings)


def share_factory_options(protocol: Any) -> None:
    """Make the factory's options class attributes of this protocol's class (once)."""
    global _class_tuned
    if _class_tuned:
        return
    _class_tuned = True
    cls = type(protocol)
    factory = getattr(protocol, "factory", None)
    names = getattr(cls, "CONFIG_ATTRS", None)
    if factory is None or not names:
        return
    for name in names:
        # An option the class already has (anywhere in its bases) is not copied by autobahn
        # either: leave it as it is.
        if hasattr(cls, name) or not hasattr(factory, name):
            continue
        value = getattr(factory, name)
        # A plain function on a class would turn into a method and get `self` as its first
        # argument (perMessageCompressionAccept is one): keep it a plain callable.
        setattr(cls, name, staticmethod(value) if inspect.isfunction(value) else value)
    logger.debug("autobahn options shared on %s: %s", cls.__name__, len(names))
