"""Fixtures any test may use. Suite-specific ones live in each suite's own conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings


@pytest.fixture(autouse=True, scope="session")
def _static_files_without_collectstatic() -> Iterator[None]:
    """Pages rendered in-process (Django's test client) name static files as they are: the
    manifest storage needs `collectstatic`'s output, which only the browser tests' and
    `bin/dev start`'s gateways are given."""
    from django.test.utils import override_settings

    plain = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
    with override_settings(STORAGES={**settings.STORAGES, "staticfiles": plain}):
        yield


@pytest.fixture(autouse=True, scope="session")
def _check_script_slots() -> Iterator[None]:
    """Every Lua script call's keys must hash to one slot, as a Redis Cluster demands: the
    single-Redis suites check it on every call (streams/scripts.py)."""
    from django.test.utils import override_settings

    checked = {**settings.SWITCHBOARD, "CHECK_SCRIPT_SLOTS": True}
    with override_settings(SWITCHBOARD=checked):
        yield


# Tests get their own Redis database, flushed before use: never a deployment's.
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def test_redis_url() -> str:
    """The Redis URL tests may flush and fill (SWITCHBOARD_TEST_REDIS_URL overrides)."""
    return os.environ.get("SWITCHBOARD_TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL


def neighbour_database(url: str, offset: int) -> str:
    """The same Redis, another database: suites that flush must not flush each other.

    Offsets from SWITCHBOARD_TEST_REDIS_URL's database, one per suite: integration 0,
    store -1 (tests/store/conftest.py), browser +1 (-2 or +2 instead of database 0,
    tests/browser/conftest.py), gateway -3 (+3 instead of database 0,
    tests/gateway/conftest.py), third-party servers -4 (tests/thirdparty/conftest.py)."""
    base, _, database = url.rpartition("/")
    number = int(database) if database.isdigit() else 0
    return f"{base}/{(number + offset) % 16}"


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Make names no other test uses: `unique("room")` -> "room-3f2a9c1d"."""

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    return make
