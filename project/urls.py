from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from ops.metrics import metrics_view
from realtime.api import stream_receipts
from realtime.pages import client_module, demo_asset, demo_token


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [
    # Before the admin: its catch-all would answer the tenants' former addresses with 404.
    path("", include("console.urls")),
    path("admin/", admin.site.urls),
    path("healthz", healthz),
    path("api/v1/receipts", stream_receipts, name="stream-receipts"),
    # The JavaScript client, and the demo page when SWITCHBOARD_DEMO_TENANT is set.
    path("client/switchboard.js", client_module, name="client-module"),
    path("demo/token", demo_token, name="demo-token"),
    path("demo/", demo_asset, name="demo"),
    path("demo/<str:name>", demo_asset, name="demo-asset"),
    # django-prometheus' metrics and ours, summed over the host's processes, with the
    # cluster's queue and run gauges (ops/metrics.py).
    path("metrics", metrics_view, name="prometheus-django-metrics"),
]
