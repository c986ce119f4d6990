"""Client tokens: HS256 JWTs signed with the tenant's secret (PyJWT does the cryptography)."""

from __future__ import annotations

import base64
import fnmatch
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson

from tenants.config import TenantCache, valid_slug

TOKEN_ALGORITHM = "HS256"
# Why a token signed with the tenant's previous secret is refused once the rotation's grace
# is over; also the 4001 reason that closes an open connection whose token's secret is no
# longer accepted (realtime/control.py).
SECRET_ROTATED = "signing secret rotated"
# Longest token read at all: refused before it is decoded (a legitimate token with a long
# list of stream patterns is still far shorter). Longer request lines than daphne's 16 KiB
# are answered 414 before they reach the gateway (realtime/daphne_tuning.py).
MAX_TOKEN_CHARS = 8192
MAX_CLIENT_ID = 200
# A client id goes into log lines and Redis keys: no control characters or line separators
# (a newline would forge a log line).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class AuthError(Exception):
    """The token does not admit the connection; str(error) is the close reason."""


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    client: str
    name: str | None
    stream_patterns: tuple[str, ...] | None  # None: every stream of the tenant
    expires_at: int
    # The secret that verified the token (the tenant's current or previous one): the gateway
    # closes the connection once the tenant stops accepting it (realtime/control.py).
    secret: str = field(default="", repr=False, compare=False)

    def may_use(self, stream: str) -> bool:
        if self.stream_patterns is None:
            return True
        return any(fnmatch.fnmatchcase(stream, pattern) for pattern in self.stream_patterns)


def issue_token(
    secret: str,
    tenant: str,
    client: str,
    ttl_s: int = 3600,
    streams: list[str] | None = None,
    name: str | None = None,
) -> str:
    claims: dict[str, object] = {"sub": client, "tnt": tenant, "exp": int(time.time()) + ttl_s}
    if streams is not None:  # an empty list allows no stream at all
        claims["streams"] = list(streams)
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM)


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """Read the claims only to learn whose secret verifies them; PyJWT then checks it all.

    A full unverified PyJWT decode here would parse the token twice per handshake."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


async def authenticate(token: str | None, tenants: TenantCache) -> tuple[Identity, object]:
    """Return the identity and tenant config a token proves, or raise AuthError."""
    if not token:
        raise AuthError("missing token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(f"token longer than {MAX_TOKEN_CHARS} characters")
    unverified = _unverified_claims(token)
    if unverified is None:
        raise AuthError("malformed token")
    slug = unverified.get("tnt")
    if not isinstance(slug, str) or not slug:
        raise AuthError("token has no tenant")
    if not valid_slug(slug):
        # Never looked up, so never cached: the claim is not yet known to be signed.
        raise AuthError("unknown tenant")
    tenant = await tenants.get(slug)
    if tenant is None:
        raise AuthError("unknown tenant")
    if not tenant.enabled:
        raise AuthError("tenant disabled")
    secret = tenant.signing_secret
    try:
        claims = _decode(token, secret)
    except jwt.InvalidSignatureError:
        # Not the current secret: the previous one, during the grace after a rotation.
        secret = tenant.previous_signing_secret
        if not secret:
            raise AuthError("bad signature") from None
        try:
            claims = _decode(token, secret)
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        if time.time() >= tenant.previous_secret_until:
            raise AuthError(SECRET_ROTATED) from None
    client = claims["sub"]
    if (
        not isinstance(client, str)
        or not client
        or len(client) > MAX_CLIENT_ID
        or _CONTROL_CHARACTERS.search(client)
    ):
        raise AuthError("invalid client id")
    expires_at = int(claims["exp"])
    if expires_at - time.time() > tenant.max_token_lifetime_s:
        raise AuthError(
            f"token lifetime exceeds the tenant's maximum of {tenant.max_token_lifetime_s} s"
        )
    patterns = claims.get("streams")
    if patterns is not None and (
        not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns)
    ):
        raise AuthError("invalid streams claim")
    name = claims.get("name")
    identity = Identity(
        tenant=slug,
        client=client,
        name=name if isinstance(name, str) else None,
        stream_patterns=tuple(patterns) if patterns is not None else None,
        expires_at=expires_at,
        secret=secret,
    )
    return identity, tenant


def _decode(token: str, secret: str) -> dict[str, Any]:
    """The verified claims; AuthError for anything but a signature made with another secret
    (PyJWT checks the signature before the claims, so "expired" means the secret matched)."""
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=[TOKEN_ALGORITHM],
            options={"require": ["exp", "sub", "tnt"]},
        )
    except jwt.InvalidSignatureError:
        raise
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.PyJWTError as error:
        raise AuthError(f"invalid token: {error}") from None
