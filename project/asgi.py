"""ASGI entry point: HTTP to Django, WebSockets to the gateway behind an origin check."""

import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from realtime.daphne_tuning import defer_debug_formatting  # noqa: E402
from realtime.lifecycle import install_daphne_drain  # noqa: E402
from realtime.routing import websocket_urlpatterns  # noqa: E402
from realtime.security import BrowserOriginValidator  # noqa: E402

routes = list(websocket_urlpatterns)
if "bench" in settings.INSTALLED_APPS:
    from bench.routing import websocket_urlpatterns as bench_routes

    routes += bench_routes

install_daphne_drain(settings.SWITCHBOARD["DRAIN_S"])
if "daphne.server" in sys.modules:
    defer_debug_formatting()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": BrowserOriginValidator(URLRouter(routes), settings.WEBSOCKET_ALLOWED_ORIGINS),
    }
)
