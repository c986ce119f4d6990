"""Read-only HTTP API for tenants, authenticated with the same token as the WebSocket.

`GET /api/v1/receipts?stream=S[&client=C]` answers a stream's receipts. The stream is a
query parameter, not a path segment: stream names may hold `/` and `.`, and clients and
proxies normalise `..` and `//` in paths. Errors have the shape of the protocol's error
frame (`code`, `status`, `detail`), plus HTTP's own 401 and 405.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from streams.events import STREAM_NAME, dumps
from streams.receipts import receipt_store
from tenants.config import tenant_cache
from tenants.tokens import AuthError, authenticate

logger = logging.getLogger(__name__)

MAX_CLIENT_ID = 200


def _json(body: dict[str, Any], status: int = 200) -> HttpResponse:
    response = HttpResponse(dumps(body), status=status, content_type="application/json")
    # Tokens authorise these answers: no shared cache may keep one for someone else.
    response["Cache-Control"] = "no-store"
    return response


def _error(code: str, status: int, detail: str) -> HttpResponse:
    response = _json(
        {"type": "error", "id": None, "code": code, "status": status, "detail": detail}, status
    )
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="switchboard"'
    elif status == 405:
        response["Allow"] = "GET"
    return response


def _token(request: HttpRequest) -> str | None:
    # The same two places the WebSocket accepts it, in the same order.
    token = request.GET.get("token")
    if token:
        return token
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


# No cookie authorises anything here (the token does), so there is no CSRF to guard
# against, and a POST must get its 405 rather than a CSRF 403.
@csrf_exempt
async def stream_receipts(request: HttpRequest) -> HttpResponse:
    """The stream's head and every client's receipt (or one client's, with `client`)."""
    if request.method != "GET":
        return _error("method_not_allowed", 405, f"{request.method} is not allowed; use GET")
    try:
        identity, _ = await authenticate(_token(request), tenant_cache)
    except AuthError as error:
        return _error("unauthorized", 401, str(error))
    stream = request.GET.get("stream")
    if not stream:
        return _error("bad_request", 400, "the 'stream' query parameter is required")
    if not STREAM_NAME.match(stream):
        return _error(
            "bad_request",
            400,
            "'stream' must be 1 to 200 characters: letters, digits and _ . : @ / + = -,"
            " starting with a letter or digit (percent-encode it: '+' is %2B)",
        )
    client = request.GET.get("client")
    if client is not None and not 0 < len(client) <= MAX_CLIENT_ID:
        return _error("bad_request", 400, "'client' must be 1 to 200 characters")
    if not identity.may_use(stream):
        return _error("forbidden", 403, f"token does not allow stream {stream!r}")
    try:
        receipts = await receipt_store().read(identity.tenant, stream, client)
    except Exception:
        logger.exception("receipts read failed tenant=%s stream=%s", identity.tenant, stream)
        return _error("internal", 500, "internal error; try again")
    return _json(receipts.as_json())
