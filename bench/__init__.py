"""Benchmarks: one script per performance target, each run beside its baseline.

Scripts (run from the repository root, e.g. `python -m bench.e2e --help`):

- `bench.e2e`          send -> ack -> reply.done through gateway, Celery and worker;
                       baselines: the naive Celery path and a bare Channels echo.
- `bench.fanout`       one published event to K subscribers of one stream;
                       baseline: `group_send` to a K-member Channels group.
- `bench.idle`         gateway RSS per idle authenticated connection;
                       baseline: a stock Channels consumer.
- `bench.connect_rate` new authenticated connections per second per gateway;
                       baseline: a stock Channels consumer.

The app itself (this package, added to INSTALLED_APPS when SWITCHBOARD_BENCH=1) holds the
baseline consumers (`bench.consumers`), their routes (`bench.routing`) and the naive path's
Celery task (`bench.tasks`). It is never installed in production.
"""
