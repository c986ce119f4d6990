"""`manage.py copy_data_plane --to URL`: the data plane copied to another Redis deployment,
for moving from one Redis to a Redis Cluster (or to a bigger Redis, or back) without
losing streams, sessions, runs or counters. docs/operations.md says when and how."""

from __future__ import annotations

from typing import Any

import redis
from django.core.management.base import BaseCommand, CommandError, CommandParser

from orchestration.tickets import run_messages_in_redis
from project.conf import conf
from streams.redis_copy import (
    DEFAULT_BATCH,
    CopyFailed,
    CopyReport,
    copy_keys,
    count_keys,
    describe,
    first_key,
    live_writers,
    open_data_plane,
)

MIB = 1024 * 1024


class Command(BaseCommand):
    help = (
        "Copy every key of the data plane (streams, sessions, runs, counters) to another "
        "Redis or Redis Cluster, with the gateways and workers stopped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--to",
            required=True,
            metavar="URL",
            help="the Redis (redis://host:port/db) or any node of the Redis Cluster to copy to",
        )
        parser.add_argument(
            "--from",
            dest="source",
            default=None,
            metavar="URL",
            help="the deployment to copy from (default: this one's, REDIS_CLUSTER_URL or "
            "REDIS_URL)",
        )
        parser.add_argument(
            "--batch", type=int, default=DEFAULT_BATCH, help="keys per round trip (1-10000)"
        )
        parser.add_argument(
            "--replace",
            action="store_true",
            help="copy although the target already holds keys under the prefix (theirs of "
            "the same name are replaced)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="copy although gateways, workers or run messages are still live at the source",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        source_url = options["source"] or conf().redis_cluster_url or conf().redis_url
        target_url: str = options["to"]
        batch: int = options["batch"]
        if not 1 <= batch <= 10_000:
            raise CommandError(f"--batch must be between 1 and 10000, not {batch}")
        if source_url == target_url:
            raise CommandError(f"--to is the source itself ({target_url})")
        prefix = conf().key_prefix
        source = _open("source", source_url)
        target = _open("target", target_url)
        self.stdout.write(f"from {describe(source)}")
        self.stdout.write(f"to   {describe(target)}")

        if first_key(source, prefix) is None:
            raise CommandError(
                f"the source holds no key under {prefix}: (is SWITCHBOARD_KEY_PREFIX, or "
                "the database number in the URL, the deployment's?)"
            )
        blockers = live_writers(source)
        if not isinstance(source, redis.RedisCluster):
            waiting = run_messages_in_redis(source)
            if waiting:
                blockers.append(
                    f"{waiting} message(s) of the runs queue in the source's Celery queues "
                    "(steps or triggers: let the workers take them before stopping them)"
                )
        if blockers:
            message = "the source is not still: " + "; ".join(blockers)
            if not options["force"]:
                raise CommandError(
                    message + ". Stop the gateways, then the workers once the runs queue is "
                    "empty, and run this again (or --force: what they write from now on, and "
                    "those messages, are not copied)"
                )
            self.stderr.write(f"{message}; copying anyway (--force)")
        existing = first_key(target, prefix)
        if existing is not None:
            if not options["replace"]:
                raise CommandError(
                    f"the target already holds keys under {prefix}: ({existing}, ...): another "
                    "deployment's, or an earlier copy's (--replace to copy over them)"
                )
            self.stderr.write(f"the target holds keys under {prefix}: already; replacing them")

        def progress(report: CopyReport) -> None:
            if report.keys and report.keys % (batch * 50) < batch:
                self.stdout.write(f"  {report.keys} keys so far")

        try:
            report = copy_keys(source, target, prefix, batch=batch, progress=progress)
        except CopyFailed as error:
            raise CommandError(
                f"{error}. A Redis older than the source cannot read its DUMP format: use "
                "a target of the source's version or later"
            ) from None
        except redis.RedisError as error:
            raise CommandError(f"the copy stopped: {error}. Running it again finishes it") from None
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(report.by_type.items()))
        self.stdout.write(
            f"copied {report.keys} keys ({report.bytes / MIB:.1f} MiB serialized) in "
            f"{report.seconds:.1f} s: {kinds or 'none'}"
        )
        if report.vanished:
            self.stdout.write(f"{report.vanished} keys expired before they were read")
        held = count_keys(target, prefix)
        # Fewer than copied only by keys whose time ran out meanwhile (buckets, dedupe).
        self.stdout.write(f"the target holds {held} keys under {prefix}:")


def _open(role: str, url: str) -> redis.Redis | redis.RedisCluster:
    try:
        client = open_data_plane(url)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as error:
        raise CommandError(f"cannot reach the {role} at {url}: {error}") from None
    return client
