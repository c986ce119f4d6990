"""Baseline endpoints, served next to /ws/v1/ by the same daphne when SWITCHBOARD_BENCH=1."""

from django.urls import path

from bench.consumers import EchoConsumer, GroupConsumer, NaiveConsumer, PlainConsumer

websocket_urlpatterns = [
    path("bench/echo/", EchoConsumer.as_asgi()),
    path("bench/naive/", NaiveConsumer.as_asgi()),
    path("bench/plain/", PlainConsumer.as_asgi()),
    path("bench/group/", GroupConsumer.as_asgi()),
]
