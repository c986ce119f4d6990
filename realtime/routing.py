"""Where the gateway listens (project/asgi.py routes it without a URLRouter)."""

GATEWAY_PATH = "/ws/v1/"
