"""ASGI entry point: HTTP to Django, WebSockets to the gateway (origin-checked).

The application is a plain callable that returns the handling coroutine rather than a
chain of middleware coroutines: every open WebSocket keeps its whole await chain alive for
as long as it is connected, and each coroutine frame in it costs memory per socket. The
gateway consumer checks the origin itself (realtime/consumer.py).
"""

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from channels.routing import URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from project.conf import conf  # noqa: E402
from realtime.consumer import GatewayConsumer  # noqa: E402
from realtime.daphne_tuning import (  # noqa: E402
    bound_http_requests,
    defer_debug_formatting,
    pace_accepts,
    pings_every,
    reap_on_change,
    spread_timeout_walk,
    time_loop_turns,
)
from realtime.node import gateway_node  # noqa: E402
from realtime.routing import GATEWAY_PATH  # noqa: E402
from realtime.security import BrowserOriginValidator  # noqa: E402
from realtime.transport import direct_pings  # noqa: E402

other_websockets: Any = None
if "bench" in settings.INSTALLED_APPS:
    from bench.routing import websocket_urlpatterns as bench_routes

    other_websockets = BrowserOriginValidator(
        URLRouter(bench_routes), conf().websocket_allowed_origins
    )


async def _not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.close"})  # refused before accept: the server says 403


def application(scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
    handler: Callable[..., Awaitable[None]]
    if scope["type"] == "websocket":
        if scope["path"] == GATEWAY_PATH:
            return GatewayConsumer()(scope, receive, send)
        handler = other_websockets or _not_found
        return handler(scope, receive, send)
    return django_asgi_app(scope, receive, send)


# A plain function would be taken for an ASGI 2 "double callable"; asgiref reads this hint.
application._asgi_single_callable = True  # type: ignore[attr-defined]


gateway_node().install_daphne_drain(conf().drain_s)
if "daphne.server" in sys.modules:
    defer_debug_formatting()
    bound_http_requests(conf().request_timeout_s)
    reap_on_change()
    spread_timeout_walk()
    pace_accepts(conf().accept_rate_per_s, conf().accept_burst)
    direct_pings()
    pings_every(conf().ws_ping_interval_s, conf().ws_ping_timeout_s)
    time_loop_turns()
