"""The browser side, served by the gateway itself: the JavaScript client and the demo page.

- `GET /client/switchboard.js` — the JavaScript client (one ES module, no build step).
  Always served: it is the library browser applications import.
- `GET /demo/` (and its `demo.js`, `demo.css`) — a page that chats with agents through
  that client. Only when `SWITCHBOARD_DEMO_TENANT` names a tenant (`bin/dev start` sets
  it to `demo`); otherwise 404.
- `POST /demo/token` — mints a short-lived token of that tenant for the demo page. Same
  condition.

Why a demo token endpoint is acceptable, and only in development: it hands a token of the
demo tenant, for any client id asked for, to whoever can reach the gateway's HTTP port.
That makes the demo tenant public to that audience, which is what a local demo wants and a
deployment must not have; so the setting is empty (off) by default and in the Procfile and
docker-compose.yml, and `bin/dev start`, whose gateway listens on 127.0.0.1 only, turns it
on. What still holds with it on:
- the tokens are signed with the demo tenant's own secret, so they open nothing of any
  other tenant (tenant isolation is the token's `tnt` claim, verified with that secret);
- they live `DEMO_TOKEN_TTL_S` (15 minutes); the page asks for a fresh one as it needs;
- another web site cannot obtain one through a visitor's browser: the answer carries no
  CORS header, so a cross-origin page cannot read it; no cookie is involved, so there is
  nothing to forge (hence no CSRF check); Django's ALLOWED_HOSTS refuses a foreign Host
  (DNS rebinding), and the gateway refuses WebSockets from origins not allowed.

Static files are read by a tiny view rather than django.contrib.staticfiles, which serves
nothing without DEBUG; they are small, so each is kept in memory and re-read only when
its file changes, with an ETag so a browser revalidates with a cheap 304.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotModified
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from agents import agent_names, get_agent, missing_configuration
from project.conf import conf
from tenants.config import tenant_cache
from tenants.tokens import issue_token

STATIC_DIR = Path(__file__).resolve().parent / "static" / "switchboard"
# Seconds a demo token is valid; the page fetches a new one before it runs out.
DEMO_TOKEN_TTL_S = 15 * 60
# Client ids the demo hands out: short and safe to show.
DEMO_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
DEMO_NAME_MAX = 60

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
# The demo page talks only to its own origin: its scripts, its styles, its WebSocket.
DEMO_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    etag: str
    stamp: tuple[int, int]


_assets: dict[str, _Asset] = {}


def _load(name: str) -> _Asset:
    path = STATIC_DIR / name
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise Http404(name) from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    asset = _assets.get(name)
    if asset is None or asset.stamp != stamp:
        body = path.read_bytes()
        asset = _Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', stamp)
        _assets[name] = asset
    return asset


def _serve(request: HttpRequest, name: str) -> HttpResponse:
    asset = _load(name)
    if request.headers.get("If-None-Match") == asset.etag:
        response: HttpResponse = HttpResponseNotModified()
    else:
        response = HttpResponse(asset.body, content_type=CONTENT_TYPES[Path(name).suffix])
    response["ETag"] = asset.etag
    # Cached, but checked with the server on every use: a changed file is seen at once,
    # an unchanged one costs a 304.
    response["Cache-Control"] = "no-cache"
    return response


def demo_tenant() -> str:
    return conf().demo_tenant


def _require_demo() -> str:
    tenant = demo_tenant()
    if not tenant:
        raise Http404("the demo is off (SWITCHBOARD_DEMO_TENANT is not set)")
    return tenant


@require_safe
def client_module(request: HttpRequest) -> HttpResponse:
    """The JavaScript client module."""
    return _serve(request, "switchboard.js")


DEMO_FILES = {"": "demo.html", "demo.js": "demo.js", "demo.css": "demo.css"}


@require_safe
def demo_asset(request: HttpRequest, name: str = "") -> HttpResponse:
    """The demo page and its script and styles."""
    _require_demo()
    try:
        filename = DEMO_FILES[name]
    except KeyError:
        raise Http404(name) from None
    response = _serve(request, filename)
    if filename.endswith(".html"):
        response["Content-Security-Policy"] = DEMO_CSP
    return response


def _json(body: dict[str, object], status: int = 200) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    # A token is in it: no cache may keep it.
    response["Cache-Control"] = "no-store"
    return response


def _error(code: str, status: int, detail: str) -> HttpResponse:
    return _json(
        {"type": "error", "id": None, "code": code, "status": status, "detail": detail}, status
    )


# No cookie authorises anything here (see the module's docstring): nothing to forge.
@csrf_exempt
async def demo_token(request: HttpRequest) -> HttpResponse:
    """Mint a token of the demo tenant: POST {"client": ID?, "name": NAME?} (JSON)."""
    slug = _require_demo()
    if request.method != "POST":
        response = _error("method_not_allowed", 405, f"{request.method} is not allowed; use POST")
        response["Allow"] = "POST"
        return response
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return _error("bad_request", 400, "the body must be JSON")
    if not isinstance(body, dict):
        return _error("bad_request", 400, "the body must be a JSON object")
    client = body.get("client") or f"guest-{secrets.token_hex(3)}"
    if not isinstance(client, str) or not DEMO_CLIENT_ID.fullmatch(client):
        return _error(
            "bad_request",
            400,
            "'client' must be 1 to 40 letters, digits and _ . -, starting with a letter or digit",
        )
    name = body.get("name") or client
    if not isinstance(name, str) or len(name) > DEMO_NAME_MAX:
        return _error("bad_request", 400, f"'name' must be at most {DEMO_NAME_MAX} characters")
    tenant = await tenant_cache.get(slug)
    if tenant is None or not tenant.enabled:
        return _error(
            "unavailable",
            503,
            f"the demo tenant {slug!r} does not exist or is disabled"
            f" (bin/dev start creates it; or: manage.py create_tenant {slug})",
        )
    token = issue_token(tenant.signing_secret, slug, client, DEMO_TOKEN_TTL_S, None, name)
    agents = [agent for agent in agent_names() if tenant.may_use(agent)]
    # echo first: it needs no model provider, so it is the demo's default.
    agents.sort(key=lambda agent: (agent != "echo", agent))
    # Agents whose runs could only answer with their fallback, and why: the menu says so.
    unavailable = {
        agent: reason
        for agent in agents
        if (reason := missing_configuration(get_agent(agent), tenant.agent_overrides(agent)))
    }
    return _json(
        {
            "token": token,
            "tenant": slug,
            "client": client,
            "name": name,
            "expires_at": int(time.time()) + DEMO_TOKEN_TTL_S,
            "agents": agents,
            "unavailable": unavailable,
        }
    )
