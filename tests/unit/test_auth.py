"""Client tokens (tenants/tokens.py) against real Tenant rows in the test database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from tenants.config import TenantCache, TenantConfig
from tenants.models import Tenant
from tenants.tokens import MAX_TOKEN_CHARS, AuthError, Identity, authenticate, issue_token


# transactional_db, not db: TenantCache.get loads tenants on a worker thread
# (sync_to_async, thread_sensitive=False), and SQLite locks that thread out of rows the
# db fixture's still-open transaction wrote.
@pytest.fixture
def tenant(transactional_db: None) -> Tenant:
    return Tenant.objects.create(slug="acme", max_frame_bytes=1234, stream_retention=77)


@pytest.fixture
def tenants(transactional_db: None) -> TenantCache:
    return TenantCache(ttl_s=60)


def auth(token: str | None, tenants: TenantCache) -> tuple[Identity, Any]:
    return asyncio.run(authenticate(token, tenants))


def refusal(token: str | None, tenants: TenantCache) -> str:
    with pytest.raises(AuthError) as caught:
        auth(token, tenants)
    return str(caught.value)


def signed(claims: dict[str, Any], secret: str, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def good_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "alice", "tnt": "acme", "exp": int(time.time()) + 600}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def test_good_token_is_accepted(tenant: Tenant, tenants: TenantCache) -> None:
    token = issue_token(tenant.signing_secret, "acme", "alice", ttl_s=600, name="Alice")
    identity, config = auth(token, tenants)
    assert identity.tenant == "acme"
    assert identity.client == "alice"
    assert identity.name == "Alice"
    assert identity.stream_patterns is None
    assert time.time() < identity.expires_at <= time.time() + 601
    assert isinstance(config, TenantConfig)
    assert (config.slug, config.max_frame_bytes, config.stream_retention) == ("acme", 1234, 77)
    limits = config.public_limits()
    assert (limits["max_frame_bytes"], limits["stream_retention"]) == (1234, 77)
    assert limits == tenant.limits()  # every limit the tenant has, as the database holds it


def test_token_with_stream_patterns(tenant: Tenant, tenants: TenantCache) -> None:
    token = issue_token(tenant.signing_secret, "acme", "bob", streams=["room-*", "lobby"])
    identity, _ = auth(token, tenants)
    assert identity.stream_patterns == ("room-*", "lobby")
    assert identity.name is None
    assert jwt.decode(token, options={"verify_signature": False})["streams"] == [
        "room-*",
        "lobby",
    ]


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None, tenants: TenantCache) -> None:
    assert refusal(token, tenants) == "missing token"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "e30.e30", "Bearer x.y.z", "...."])
def test_malformed_token(token: str, tenant: Tenant, tenants: TenantCache) -> None:
    assert refusal(token, tenants) == "malformed token"


def test_bad_signature(tenant: Tenant, tenants: TenantCache) -> None:
    assert refusal(signed(good_claims(), "not-the-secret-" + "x" * 32), tenants) == "bad signature"


def test_signed_by_another_tenant(tenant: Tenant, tenants: TenantCache) -> None:
    other = Tenant.objects.create(slug="globex")
    # A globex secret cannot vouch for an acme claim.
    assert refusal(issue_token(other.signing_secret, "acme", "eve"), tenants) == "bad signature"


def test_tampered_claims(tenant: Tenant, tenants: TenantCache) -> None:
    token = issue_token(tenant.signing_secret, "acme", "alice")
    header, _, signature = token.split(".")
    forged = jwt.encode(good_claims(sub="admin"), "y" * 32).split(".")[1]
    assert refusal(f"{header}.{forged}.{signature}", tenants) == "bad signature"


def test_unsigned_token_is_refused(tenant: Tenant, tenants: TenantCache) -> None:
    token = jwt.encode(good_claims(), None, algorithm="none")
    assert refusal(token, tenants).startswith("invalid token")


# The tenant's secret is sized for HS256; PyJWT warns when it signs HS512 with it.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_other_algorithm_is_refused(tenant: Tenant, tenants: TenantCache) -> None:
    token = signed(good_claims(), tenant.signing_secret, algorithm="HS512")
    assert refusal(token, tenants).startswith("invalid token")


def test_expired_token(tenant: Tenant, tenants: TenantCache) -> None:
    token = issue_token(tenant.signing_secret, "acme", "alice", ttl_s=-5)
    assert refusal(token, tenants) == "token expired"


def test_unknown_tenant(tenant: Tenant, tenants: TenantCache) -> None:
    token = issue_token(tenant.signing_secret, "initech", "alice")
    assert refusal(token, tenants) == "unknown tenant"


def test_disabled_tenant(tenant: Tenant, tenants: TenantCache) -> None:
    Tenant.objects.filter(slug="acme").update(enabled=False)
    token = issue_token(tenant.signing_secret, "acme", "alice")
    assert refusal(token, tenants) == "tenant disabled"


@pytest.mark.parametrize("tnt", [None, "", 5, ["acme"]])
def test_missing_or_bad_tenant_claim(tnt: Any, tenant: Tenant, tenants: TenantCache) -> None:
    claims = good_claims()
    claims.pop("tnt")
    if tnt is not None:
        claims["tnt"] = tnt
    assert refusal(signed(claims, tenant.signing_secret), tenants) == "token has no tenant"


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_missing_required_claim(claim: str, tenant: Tenant, tenants: TenantCache) -> None:
    claims = good_claims()
    claims.pop(claim)
    reason = refusal(signed(claims, tenant.signing_secret), tenants)
    assert reason.startswith("invalid token")
    assert claim in reason


@pytest.mark.parametrize("sub", [5, "", "x" * 201, ["alice"]])
def test_bad_client_id(sub: Any, tenant: Tenant, tenants: TenantCache) -> None:
    reason = refusal(signed(good_claims(sub=sub), tenant.signing_secret), tenants)
    assert reason == "invalid client id" or reason.startswith("invalid token")


@pytest.mark.parametrize("streams", ["room-*", {"room": 1}, [1, 2], ["ok", None], 7, True])
def test_bad_streams_claim(streams: Any, tenant: Tenant, tenants: TenantCache) -> None:
    token = signed(good_claims(streams=streams), tenant.signing_secret)
    assert refusal(token, tenants) == "invalid streams claim"


def test_empty_streams_claim_allows_nothing(tenant: Tenant, tenants: TenantCache) -> None:
    identity, _ = auth(signed(good_claims(streams=[]), tenant.signing_secret), tenants)
    assert identity.stream_patterns == ()
    assert not identity.may_use("anything")


def test_non_string_name_is_ignored(tenant: Tenant, tenants: TenantCache) -> None:
    identity, _ = auth(signed(good_claims(name=42), tenant.signing_secret), tenants)
    assert identity.name is None


def test_tenant_cache_remembers_misses_until_they_expire(db: None) -> None:
    cache = TenantCache(ttl_s=3600)
    assert cache.get_sync("later") is None
    Tenant.objects.create(slug="later")
    assert cache.get_sync("later") is None  # a flood of bad tokens does not hit the database
    assert TenantCache(ttl_s=0).get_sync("later") is not None


def test_tenant_cache_bounds_misses_apart_from_tenants(tenant: Tenant) -> None:
    """A flood of made-up slugs costs at most max_misses entries, and never evicts a real
    tenant: misses have their own table."""
    cache = TenantCache(ttl_s=3600, max_tenants=5, max_misses=10)
    assert cache.get_sync("acme") is not None
    for n in range(200):
        assert cache.get_sync(f"made-up-{n}") is None
    assert cache.sizes() == (1, 10)
    assert cache.cached("acme") is not None
    for n in range(7):
        Tenant.objects.create(slug=f"real-{n}")
        assert cache.get_sync(f"real-{n}") is not None
    assert cache.sizes() == (5, 10)


def test_tenant_cache_reads_an_unknown_slug_once_per_interval(
    transactional_db: None, django_assert_num_queries: Any
) -> None:
    cache = TenantCache(ttl_s=3600)
    with django_assert_num_queries(1):
        for _ in range(20):
            assert cache.get_sync("nobody") is None

    async def many() -> None:
        await asyncio.gather(*(cache.get("someone") for _ in range(20)))
        await asyncio.gather(*(cache.get("someone") for _ in range(20)))

    asyncio.run(many())
    assert cache.sizes() == (0, 2)


@pytest.mark.parametrize("tnt", ["x" * 4000, "x" * 64, "Acme", "ac me", "acme\n", "-acme", "é"])
def test_a_tenant_claim_not_shaped_like_a_slug_is_never_looked_up(
    tnt: str, tenant: Tenant, tenants: TenantCache
) -> None:
    # Signed or not, the claim is refused before any lookup: nothing is cached for it.
    assert refusal(signed(good_claims(tnt=tnt), "any-secret-" + "x" * 32), tenants) == (
        "unknown tenant"
    )
    assert tenants.sizes() == (0, 0)


def test_an_over_long_token_is_refused_before_it_is_read(
    tenant: Tenant, tenants: TenantCache
) -> None:
    token = signed(good_claims(name="n" * MAX_TOKEN_CHARS), tenant.signing_secret)
    assert refusal(token, tenants) == f"token longer than {MAX_TOKEN_CHARS} characters"
    assert tenants.sizes() == (0, 0)


@pytest.mark.parametrize("exp_in_s", [10**30, 31 * 24 * 3600])
def test_a_token_valid_for_longer_than_the_tenant_allows_is_refused(
    exp_in_s: int, tenant: Tenant, tenants: TenantCache
) -> None:
    token = signed(good_claims(exp=int(time.time()) + exp_in_s), tenant.signing_secret)
    assert refusal(token, tenants).startswith("token lifetime exceeds the tenant's maximum")


def test_the_token_lifetime_cap_is_per_tenant(tenant: Tenant, tenants: TenantCache) -> None:
    Tenant.objects.filter(slug="acme").update(max_token_lifetime_s=60)
    assert refusal(issue_token(tenant.signing_secret, "acme", "alice", ttl_s=600), tenants) == (
        "token lifetime exceeds the tenant's maximum of 60 s"
    )
    auth(issue_token(tenant.signing_secret, "acme", "alice", ttl_s=50), tenants)


@pytest.mark.parametrize("sub", ["alice\nINFO forged line", "a\rb", "a\x00b", "a\x1bb", "a\x85b"])
def test_a_client_id_with_control_characters_is_refused(
    sub: str, tenant: Tenant, tenants: TenantCache
) -> None:
    assert refusal(signed(good_claims(sub=sub), tenant.signing_secret), tenants) == (
        "invalid client id"
    )


def identity(patterns: tuple[str, ...] | None) -> Identity:
    return Identity("acme", "alice", None, patterns, 0)


@pytest.mark.parametrize(
    ("patterns", "stream", "allowed"),
    [
        (None, "anything/at:all", True),
        (("room-*",), "room-1", True),
        (("room-*",), "room-", True),
        (("room-*",), "room", False),
        (("room-*",), "Room-1", False),  # case matters
        (("room-*",), "lobby", False),
        (("team/*",), "team/a/b", True),  # * crosses "/": patterns are not paths
        (("room-?",), "room-1", True),
        (("room-?",), "room-12", False),
        (("room-[ab]",), "room-a", True),
        (("room-[ab]",), "room-c", False),
        (("room-[!ab]",), "room-c", True),
        (("lobby", "room-*"), "lobby", True),
        (("lobby", "room-*"), "lobby2", False),
        ((), "room-1", False),
    ],
)
def test_may_use_globs(patterns: tuple[str, ...] | None, stream: str, allowed: bool) -> None:
    assert identity(patterns).may_use(stream) is allowed
