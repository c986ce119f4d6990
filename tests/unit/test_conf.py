"""project/conf.py: one typed object for the settings, following every settings change."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from pytest_django.fixtures import Settings

import project.conf as conf_module
from project.conf import Conf, conf
from streams import keys


def test_every_switchboard_setting_has_a_typed_field() -> None:
    # A setting added to project/settings.py without a field would be readable only by key.
    names = {option.upper() for option in Conf.__dataclass_fields__}
    assert set(django_settings.SWITCHBOARD) <= names


def test_a_settings_change_is_seen_by_the_next_read(settings: Settings) -> None:
    before = conf()
    assert conf() is before  # built once, not per read
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "RUN_LEASE_S": 7}
    assert conf().run_lease_s == 7.0 and isinstance(conf().run_lease_s, float)
    settings.SWEEP_INTERVAL_S = 0.5
    assert conf().sweep_interval_s == 0.5


def test_an_unrelated_setting_keeps_the_built_object(settings: Settings) -> None:
    before = conf()
    settings.TIME_ZONE = "Europe/Paris"
    assert conf() is before


def test_key_names_follow_the_prefix_and_database() -> None:
    with override_settings(
        REDIS_URL="redis://127.0.0.1:6379/7",
        SWITCHBOARD={**django_settings.SWITCHBOARD, "KEY_PREFIX": "other"},
    ):
        assert keys.FAIR_RING == "other:{fq}:ring"
        assert keys.stream_channel("acme", "room") == "other:7:e:{acme}:room"
        run_id = "r" + "0" * 32 + ".acme"
        assert keys.run(run_id) == "other:run:{acme}:" + run_id
        assert keys.run_leases("acme") == "other:runs:{acme}:leases"
    assert keys.FAIR_RING == f"{django_settings.SWITCHBOARD['KEY_PREFIX']}:{{fq}}:ring"
    with pytest.raises(AttributeError):
        keys.NO_SUCH_NAME  # noqa: B018


def test_the_broker_in_the_streams_redis_is_derived(settings: Settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:6379/3"
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/3/"
    assert conf().broker_in_streams_redis and conf().redis_database == 3
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    assert not conf().broker_in_streams_redis


def test_a_redis_cluster_is_never_the_broker(settings: Settings) -> None:
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    assert conf().broker_in_streams_redis and not conf().redis_cluster
    settings.REDIS_CLUSTER_URL = "redis://127.0.0.1:7000"
    assert conf().redis_cluster and not conf().broker_in_streams_redis


def test_a_redis_cluster_without_a_broker_stops_at_start() -> None:
    env = {**os.environ, "REDIS_CLUSTER_URL": "redis://127.0.0.1:7000"}
    env.pop("CELERY_BROKER_URL", None)
    answer = subprocess.run(
        [sys.executable, "-c", "import project.settings"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
    )
    assert answer.returncode != 0
    assert "CELERY_BROKER_URL must be" in answer.stderr


def test_a_value_of_the_wrong_type_is_refused(settings: Settings) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "HEARTBEAT_S": "25"}
    with pytest.raises(ImproperlyConfigured, match="HEARTBEAT_S"):
        conf()


def test_a_missing_setting_is_named(settings: Settings) -> None:
    incomplete = dict(settings.SWITCHBOARD)
    del incomplete["FAIR_QUEUE"]
    settings.SWITCHBOARD = incomplete
    with pytest.raises(ImproperlyConfigured, match="FAIR_QUEUE"):
        conf()


def test_conf_imports_nothing_of_switchboard() -> None:
    # Every package imports project.conf, so it must sit below all of them.
    source = Path(conf_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    standard = {"__future__", "collections", "dataclasses", "threading", "typing"}
    assert imported <= standard | {"django", "redis"}, imported


def test_importing_the_project_reads_no_settings() -> None:
    # Benchmarks and tests set DATABASE_URL (and the rest) after importing the launcher and
    # the Celery app; settings read at import would keep the defaults instead.
    probe = (
        "import project.celery, project.launcher\n"
        "from django.conf import settings\n"
        "print(settings.configured)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    found = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
        cwd=Path(conf_module.__file__).resolve().parents[1],
    )
    assert found.stdout.strip() == "False", found.stderr
