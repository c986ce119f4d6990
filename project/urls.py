from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from realtime.views import stream_receipts


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz),
    path("api/v1/receipts", stream_receipts, name="stream-receipts"),
    path("", include("django_prometheus.urls")),
]
