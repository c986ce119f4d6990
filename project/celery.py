"""The Celery application: configuration comes from Django settings (CELERY_ prefix)."""

import os

from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from kombu import Queue

from streams.enqueue import (
    HISTORY_PERSIST_TASK,
    HISTORY_PURGE_TASK,
    MAINTENANCE_QUEUE,
    RUNS_QUEUE,
    SWEEP_TASK,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("switchboard")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Every queue the project uses is declared here, so a worker started with no -Q serves all.
# Durable (kombu's default): on RabbitMQ they and their persistent messages outlive a broker
# restart. A quorum queue (CELERY_TASK_DEFAULT_QUEUE_TYPE) is also replicated across a
# RabbitMQ cluster; the Redis transport ignores queue arguments.


def _queues(arguments: dict[str, str] | None) -> tuple[Queue, ...]:
    return tuple(
        Queue(name, routing_key=name, durable=True, queue_arguments=arguments)
        for name in (RUNS_QUEUE, MAINTENANCE_QUEUE)
    )


app.conf.task_queues = _queues(None)


@app.on_after_configure.connect
def _quorum_queues(sender: Celery, **kwargs: object) -> None:
    """Decided once the settings are read, not at import: importing the project must not
    load Django's settings (a benchmark or test sets DATABASE_URL first)."""
    if sender.conf.task_default_queue_type == "quorum":
        sender.conf.task_queues = _queues({"x-queue-type": "quorum"})


app.conf.task_routes = {
    SWEEP_TASK: {"queue": MAINTENANCE_QUEUE},
    HISTORY_PERSIST_TASK: {"queue": MAINTENANCE_QUEUE},
    HISTORY_PURGE_TASK: {"queue": MAINTENANCE_QUEUE},
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
    """A pool process starts with its own Redis connections and runtime, never its parent's."""
    from streams.redis_clients import reset_after_fork
    from workers.runtime import reset_after_fork as reset_runtime

    reset_after_fork()
    reset_runtime()


@worker_init.connect
def _room_for_many_calls(**kwargs: object) -> None:
    """Each model call in flight holds a socket: lift the soft open-files limit to the hard
    one, as servers do, so WORKER_MAX_CALLS calls fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


@worker_shutting_down.connect
def _stop_taking_steps(**kwargs: object) -> None:
    """Warm shutdown begins: the model-call runtime takes no new steps."""
    from orchestration.dispatch import begin_drain

    begin_drain()


@worker_shutdown.connect
def _drain_model_calls(**kwargs: object) -> None:
    """After Celery stopped consuming: let calls in flight finish within WORKER_DRAIN_S and
    hand the rest to other workers (orchestration/dispatch.py)."""
    from orchestration.dispatch import drain
    from streams.enqueue import DRAIN_FLUSH_S, publisher

    drain()
    # With another broker than the streams' Redis, the steps just handed over are queued in
    # Redis and their messages still with the publishing thread: let them go out.
    if publisher().started:
        publisher().flush(DRAIN_FLUSH_S)


@worker_process_shutdown.connect
def _metrics_process_dead(**kwargs: object) -> None:
    """A pool process's gauges leave the host's sums when it stops (ops/metrics.py);
    pool processes exit without running atexit handlers."""
    from ops.metrics import mark_process_dead

    mark_process_dead()


@worker_ready.connect
def _serve_worker_metrics(**kwargs: object) -> None:
    """SWITCHBOARD_WORKER_METRICS_PORT: the host's metrics from the worker's main process."""
    from project.conf import conf

    if conf().worker_metrics_port:
        from ops.metrics import start_worker_exporter

        start_worker_exporter(conf().worker_metrics_port)
