"""The Celery application: configuration comes from Django settings (CELERY_ prefix)."""

import os

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("switchboard")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Every queue the project uses is declared here, so a worker started with no -Q serves all.
app.conf.task_queues = (
    Queue("switchboard.runs", routing_key="switchboard.runs"),
    Queue("switchboard.maintenance", routing_key="switchboard.maintenance"),
)
app.conf.task_routes = {
    "switchboard.runs.sweep": {"queue": "switchboard.maintenance"},
    "switchboard.history.persist": {"queue": "switchboard.maintenance"},
    "switchboard.history.purge": {"queue": "switchboard.maintenance"},
}
app.autodiscover_tasks()


@worker_ready.connect
def _announce_ready(**kwargs: object) -> None:
    """Launchers (tests, benchmarks, bin/dev) wait for this file instead of sleeping."""
    path = os.environ.get("SWITCHBOARD_READY_FILE")
    if path:
        with open(path, "w") as ready:
            ready.write(str(os.getpid()))


@worker_process_init.connect
def _fresh_redis_clients(**kwargs: object) -> None:
    """A pool process starts with its own Redis connections, never its parent's."""
    from realtime.redis_clients import reset_after_fork

    reset_after_fork()


@worker_process_shutdown.connect
def _metrics_process_dead(**kwargs: object) -> None:
    """A pool process's gauges leave the host's sums when it stops (realtime/metrics.py);
    pool processes exit without running atexit handlers."""
    from realtime.metrics import mark_process_dead

    mark_process_dead()


@worker_ready.connect
def _serve_worker_metrics(**kwargs: object) -> None:
    """SWITCHBOARD_WORKER_METRICS_PORT: the host's metrics from the worker's main process."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from realtime.metrics import start_worker_exporter

        start_worker_exporter(settings.WORKER_METRICS_PORT)
