"""Client tokens: HS256 JWTs signed with the tenant's secret (PyJWT does the cryptography)."""

from __future__ import annotations

import base64
import fnmatch
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from realtime.tenants import TenantCache

TOKEN_ALGORITHM = "HS256"


class AuthError(Exception):
    """The token does not admit the connection; str(error) is the close reason."""


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    client: str
    name: str | None
    stream_patterns: tuple[str, ...] | None  # None: every stream of the tenant
    expires_at: int

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
    unverified = _unverified_claims(token)
    if unverified is None:
        raise AuthError("malformed token")
    slug = unverified.get("tnt")
    if not isinstance(slug, str) or not slug:
        raise AuthError("token has no tenant")
    tenant = await tenants.get(slug)
    if tenant is None:
        raise AuthError("unknown tenant")
    if not tenant.enabled:
        raise AuthError("tenant disabled")
    try:
        claims = jwt.decode(
            token,
            tenant.signing_secret,
            algorithms=[TOKEN_ALGORITHM],
            options={"require": ["exp", "sub", "tnt"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad signature") from None
    except jwt.PyJWTError as error:
        raise AuthError(f"invalid token: {error}") from None
    client = claims["sub"]
    if not isinstance(client, str) or not client or len(client) > 200:
        raise AuthError("invalid client id")
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
        expires_at=int(claims["exp"]),
    )
    return identity, tenant
