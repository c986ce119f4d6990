"""What every benchmark shares: the common options and the skeleton of a run
(run_benchmark), a fresh system per variant, the load generator, process sampling,
percentiles, the machine description and the results file.

The client side is a Node.js `ws` script (bench/loadgen.mjs) in one or more processes,
driven from here over stdin/stdout. A Python asyncio client spends most of a core at a few
thousand frames a second, and on a 2-core machine that CPU would be taken from the server
being measured; `ws` costs a small fraction of that and holds 15,000 sockets in one process.
`--client-procs` spreads the sockets over several Node processes when one is not enough;
their timestamps share CLOCK_MONOTONIC, so times taken in different processes compare.
`npm ci` installs the one dependency (ws, pinned in package-lock.json) on the first run.

Each variant (the gateway, or a baseline) gets its own freshly started processes, so peak
RSS and CPU are attributable, on a flushed Redis database (`--redis-url`, default
redis://127.0.0.1:6379/7; IT IS FLUSHED) and a fresh SQLite database for the tenant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
TENANT = "bench"
MIB = 1024 * 1024

Results = dict[str, dict[str, Any]]  # a benchmark's result per variant

if str(ROOT) not in sys.path:  # `python bench/NAME.py` as well as `python -m bench.NAME`
    sys.path.insert(0, str(ROOT))

from project.launcher import Cluster  # noqa: E402
from project.redis_cluster import RedisCluster  # noqa: E402

# --- the machine and the invocation --------------------------------------------------------


def loopback_redis_cluster(base_port: int, masters: int, replicas: int) -> RedisCluster:
    """A Redis Cluster on ports from `base_port` (the masters first), not yet started: use it
    as a context manager. Its failure detection is a deployment's usual 5 s, not the tests'
    1 s: a benchmark kills no node, and a busy machine must not look like a dead node."""
    ports = [base_port + i for i in range(masters * (1 + replicas))]
    return RedisCluster(masters=masters, replicas=replicas, ports=ports, node_timeout_ms=5000)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "node": _node_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def command_line() -> str:
    """The exact command this process was started with."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def print_header(title: str, params: dict[str, Any]) -> dict[str, Any]:
    machine = machine_info()
    print(f"== {title} ==")
    print(
        f"machine: {machine['logical_cores']} logical cores ({machine['physical_cores']} physical),"
        f" {machine['cpu_model']}, {machine['memory_gib']} GiB, {machine['platform']},"
        f" Python {machine['python']}, Node {machine['node']},"
        f" load average at start {machine['load_average_at_start']}"
    )
    print(f"command: {command_line()}")
    print("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    sys.stdout.flush()
    return machine


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; launched servers and load
    generators inherit it. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed + 1024)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < needed:
        print(
            f"warning: open-files limit is {limit}, below the {needed} this run needs;"
            " raise the hard limit (ulimit -Hn) first",
            file=sys.stderr,
        )
    return limit


def benchmark_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m bench.NAME`, described by its docstring's first paragraph."""
    return argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def subset_argument(
    parser: argparse.ArgumentParser, choices: tuple[str, ...], dest: str = "variants"
) -> None:
    """`--DEST a,b`: which of the variants to run, all by default (parse_benchmark_args
    checks and splits it)."""
    parser.add_argument(f"--{dest}", default=",".join(choices), help="comma-separated subset")


def parse_benchmark_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    choices: tuple[str, ...],
    dest: str = "variants",
    profile: bool = True,
    **defaults: Any,
) -> argparse.Namespace:
    """Add the options every benchmark takes (`defaults` overrides theirs), parse `argv`,
    and turn the `--DEST` of subset_argument into a list of known choices."""
    common_arguments(parser, profile)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in getattr(args, dest).split(",") if c.strip()]
    unknown = set(chosen) - set(choices)
    if unknown:
        parser.error(f"unknown {dest} {sorted(unknown)}; choose from {choices}")
    setattr(args, dest, chosen)
    return args


def common_arguments(parser: argparse.ArgumentParser, profile: bool = True) -> None:
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis database the run uses; it is FLUSHED before each variant"
        " ($BENCH_REDIS_URL overrides the default). An embedded Redis is started when"
        " none answers.",
    )
    parser.add_argument("--client-procs", type=int, default=1, help="Node load-generator processes")
    if profile:
        parser.add_argument(
            "--profile",
            action="store_true",
            help="sample the server processes with py-spy during the measured window",
        )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="LOG_LEVEL of the servers (per-run INFO lines cost CPU)",
    )


# --- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": ordered[0] if ordered else None,
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "p99.9": percentile(ordered, 99.9),
        "max": ordered[-1] if ordered else None,
        "mean": sum(ordered) / len(ordered) if ordered else None,
    }


def sum_counts(tables: Iterable[dict[str, int]]) -> dict[str, int]:
    """Per-key sums of counts (errors by reason, close codes) from several replies."""
    total: dict[str, int] = {}
    for table in tables:
        for key, count in table.items():
            total[key] = total.get(key, 0) + count
    return total


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def describe_latency(label: str, stats: dict[str, Any]) -> str:
    return (
        f"{label}: p50 {fmt_ms(stats['p50'])} ms, p99 {fmt_ms(stats['p99'])} ms,"
        f" p99.9 {fmt_ms(stats['p99.9'])} ms, max {fmt_ms(stats['max'])} ms"
        f" (n={stats['count']})"
    )


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    # Two significant digits however small: 0.012x, not 0.01x.
    return f"{value:.2g}x" if value < 1 else f"{value:.2f}x"


# --- server processes ----------------------------------------------------------------------


class ProcessSampler:
    """Samples RSS (peak) and CPU time of server processes, Celery pool children included."""

    def __init__(self, procs: dict[str, int], interval_s: float = 0.1) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.peak_rss = dict.fromkeys(procs, 0)
        self.peak_tree_rss = dict.fromkeys(procs, 0)
        self.children: dict[str, set[int]] = {name: set() for name in procs}
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._owner: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._elapsed = 0.0

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def sample(self, baseline: bool = False) -> None:
        for name, pid in self.procs.items():
            try:
                main = psutil.Process(pid)
                members = [main, *main.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            tree = 0
            for process in members:
                try:
                    rss = process.memory_info().rss
                    cpu = self._cpu(process)
                except psutil.NoSuchProcess:
                    continue
                tree += rss
                if process.pid == pid:
                    self.peak_rss[name] = max(self.peak_rss[name], rss)
                else:
                    self.children[name].add(process.pid)
                self._owner[process.pid] = name
                if process.pid not in self._cpu_start:
                    # First seen after the window opened: it was born inside it.
                    self._cpu_start[process.pid] = cpu if baseline else 0.0
                self._cpu_last[process.pid] = cpu
            self.peak_tree_rss[name] = max(self.peak_tree_rss[name], tree)

    def rss(self, name: str) -> int:
        return psutil.Process(self.procs[name]).memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> ProcessSampler:
        self.sample(baseline=True)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self._elapsed = time.monotonic() - self._started
        return self.report()

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for name, pid in self.procs.items():
            cpu = sum(
                self._cpu_last[p] - self._cpu_start.get(p, 0.0)
                for p, owner in self._owner.items()
                if owner == name and p in self._cpu_last
            )
            own_cpu = self._cpu_last.get(pid, 0.0) - self._cpu_start.get(pid, 0.0)
            report[name] = {
                "pid": pid,
                "peak_rss_mib": round(self.peak_rss[name] / MIB, 1),
                "peak_rss_with_children_mib": round(self.peak_tree_rss[name] / MIB, 1),
                "children": len(self.children[name]),
                "cpu_s": round(cpu, 2),
                "cpu_pct": round(100 * cpu / self._elapsed, 1) if self._elapsed else None,
                # The process alone, without pool children: a Celery worker's dispatcher.
                "own_cpu_pct": round(100 * own_cpu / self._elapsed, 1) if self._elapsed else None,
            }
        report["window_s"] = round(self._elapsed, 2)
        return report


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time so far of these processes (for short windows)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def describe_processes(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, info in report.items():
        if not isinstance(info, dict):
            continue
        line = f"  {name} (pid {info['pid']}): peak RSS {info['peak_rss_mib']} MiB"
        if info["children"]:
            line += (
                f" ({info['peak_rss_with_children_mib']} MiB with its"
                f" {info['children']} pool processes)"
            )
        line += f", CPU {info['cpu_s']} s = {info['cpu_pct']}% of a core"
        if info["children"]:
            line += f" ({info['own_cpu_pct']}% in the main process)"
        lines.append(line)
    return lines


def print_server_report(result: dict[str, Any], *more: str) -> None:
    """The end of every variant's report: sockets the server closed, each server process's
    memory and CPU, the lines `more`, then the profile summary when there is one."""
    if result["close_codes_after_open"]:
        print(f"  sockets closed by the server: {result['close_codes_after_open']}")
    for line in [*describe_processes(result["server_processes"]), *more]:
        print(line)
    if result.get("profile"):
        for line in describe_profile(result["profile"]):
            print(line)
    sys.stdout.flush()


# --- where the time goes -------------------------------------------------------------------


class Profiler:
    """py-spy on server processes for the measured window (`--profile`).

    Each process's samples are kept as collapsed stacks (bench/results/...-logs/VARIANT/
    profile-NAME.txt; speedscope.app opens them) and summarized as the functions with the
    most samples on top of the stack. Celery workers are sampled with their pool children.
    """

    def __init__(self, procs: dict[str, int], out_dir: Path, rate: int = 100) -> None:
        self.procs = procs
        self.out_dir = out_dir
        self.rate = rate
        self._spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    @staticmethod
    def available() -> str | None:
        return shutil.which("py-spy") or (
            str(Path(sys.executable).with_name("py-spy"))
            if Path(sys.executable).with_name("py-spy").exists()
            else None
        )

    def start(self) -> Profiler:
        spy = self.available()
        if spy is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.procs.items():
            if name == "redis":
                continue
            out = self.out_dir / f"profile-{name}.txt"
            argv = [spy, "record", "-p", str(pid), "-r", str(self.rate), "-f", "raw"]
            # Non-blocking: the sampled process is never paused, so latency is not distorted.
            argv += ["-o", str(out), "--nonblocking", "--function"]
            if name.startswith("worker"):
                argv.append("--subprocesses")
            self._spies[name] = (
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                out,
            )
        return self

    def stop(self, top: int = 12) -> dict[str, Any]:
        for spy, _ in self._spies.values():
            spy.send_signal(signal.SIGINT)
        summary: dict[str, Any] = {}
        for name, (spy, out) in self._spies.items():
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            summary[name] = summarize_collapsed(out, top)
        return summary


def summarize_collapsed(path: Path, top: int) -> dict[str, Any]:
    """Samples per leaf function ('self') and per function anywhere on the stack ('total')."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"file": relative(path), "samples": 0, "self": [], "total": [], "project_total": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            frame
            for frame in stack.split(";")
            if not frame.startswith(("process ", "thread ")) and frame
        ]
        if not frames:
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[list[Any]]:
        best = sorted(table.items(), key=lambda item: -item[1])[:top]
        return [[frame, round(100 * count / samples, 1)] for frame, count in best]

    ours = {
        frame: count
        for frame, count in total.items()
        if frame.rpartition("(")[2].startswith(PROJECT_PACKAGES)
    }
    return {
        "file": relative(path),
        "samples": samples,
        # Percentages are of samples taken; waits py-spy does not recognise as idle
        # (select, socket reads) are among them, so read CPU use from the process report.
        "self": ranked(own),
        "total": ranked(total),
        "project_total": ranked(ours),
    }


PROJECT_PACKAGES = ("realtime/", "orchestration/", "workers/", "project/", "bench/")


class MeasuredWindow:
    """The measured window of a variant: its server processes sampled from now on, and with
    `profile` (--profile) also under py-spy, its output in the variant's log directory."""

    def __init__(self, env: BenchEnv, cluster: Cluster, variant: str, profile: bool) -> None:
        procs = server_processes(cluster)
        self.sampler = ProcessSampler(procs).start()
        self.profiler = Profiler(procs, env.log_root / variant).start() if profile else None

    def stop(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(process report, profile summary or None)."""
        profile = self.profiler.stop() if self.profiler else None
        return self.sampler.stop(), profile


def describe_profile(summary: dict[str, Any], top: int = 8) -> list[str]:
    lines = []
    for name, info in summary.items():
        lines.append(f"  profile {name}: {info['samples']} samples ({info['file']})")
        for frame, pct in info["self"][:top]:
            lines.append(f"    self  {pct:5.1f}%  {frame}")
        for frame, pct in info.get("project_total", [])[: top // 2]:
            lines.append(f"    total {pct:5.1f}%  {frame}")
    return lines


# --- a fresh system per variant ------------------------------------------------------------


class BenchEnv:
    """One benchmark invocation: a fresh SQLite database with the bench tenant, token
    issuing, and `cluster()` to start a freshly flushed system per variant."""

    def __init__(self, name: str, redis_url: str, log_level: str = "WARNING") -> None:
        self.name = name
        self.redis_url = redis_url
        self.log_level = log_level
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.log_root = RESULTS_DIR / f"{name}-{self.stamp}-logs"
        self._db_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-db-"))
        self.database_url = f"sqlite:///{self._db_dir / 'bench.sqlite3'}"
        self.secret = ""
        self._prepared = False
        self._tokens: dict[str, list[str]] = {}

    def base_env(self) -> dict[str, str]:
        return {
            "SWITCHBOARD_BENCH": "1",
            "DATABASE_URL": self.database_url,
            "LOG_LEVEL": self.log_level,
        }

    def prepare(self) -> None:
        """Migrate the fresh database and create the tenant, once per invocation."""
        if self._prepared:
            return
        # Only its environment is used here: migrate and manage start no server.
        setup = Cluster(redis_url=self.redis_url, env=self.base_env(), log_dir=self.log_root)
        try:
            setup.migrate()
            setup.manage("create_tenant", TENANT)
        finally:
            setup.stop()
        os.environ["DATABASE_URL"] = self.database_url
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
        import django

        django.setup()
        from tenants.models import Tenant

        self.secret = Tenant.objects.get(slug=TENANT).signing_secret
        self._prepared = True

    def tokens(self, count: int, prefix: str = "c", ttl_s: int = 6 * 3600) -> list[str]:
        """Tokens of clients prefix0, prefix1, ... (the same list on every call)."""
        self.prepare()
        from tenants.tokens import issue_token

        cached = self._tokens.setdefault(prefix, [])
        cached += [
            issue_token(self.secret, TENANT, f"{prefix}{i}", ttl_s)
            for i in range(len(cached), count)
        ]
        return cached[:count]

    @contextlib.contextmanager
    def cluster(
        self,
        variant: str,
        gateways: int = 1,
        workers: int = 0,
        worker_concurrency: int = 2,
        env: dict[str, str] | None = None,
    ) -> Iterator[Cluster]:
        import redis

        log_dir = self.log_root / variant
        log_dir.mkdir(parents=True, exist_ok=True)
        running = Cluster(
            redis_url=self.redis_url,
            gateways=gateways,
            workers=workers,
            worker_concurrency=worker_concurrency,
            env={**self.base_env(), **(env or {})},
            log_dir=log_dir,
        )
        pool_children: set[int] = set()
        try:
            url = running.ensure_redis()
            if url != self.redis_url:
                print(f"  (no Redis answered at {self.redis_url}; using embedded Redis {url})")
            redis.Redis.from_url(url).flushdb()
            self.prepare()
            running.start()
            for name, proc in running.processes.items():
                if name.startswith("worker"):
                    pool_children |= {p.pid for p in psutil.Process(proc.pid).children(True)}
            yield running
        except BaseException:
            for proc in running.processes.values():
                if not proc.alive() and proc.name != "redis":
                    print(f"--- {proc.name} exited; log tail:\n{proc.log_tail()}", file=sys.stderr)
            raise
        finally:
            running.stop()
            # A worker killed after its stop timeout can leave pool processes behind.
            for pid in pool_children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            with contextlib.suppress(Exception):
                redis.Redis.from_url(running.redis_url).flushdb()

    def cleanup(self) -> None:
        shutil.rmtree(self._db_dir, ignore_errors=True)


# Log lines (WARNING and up, which benchmarks keep) that explain a latency tail: each is a
# run that waited for something other than its model.
INCIDENTS = {
    "lease lapsed, step redelivered": "step redelivered after its lease ran out",
    "runtime full, message handed back": "reject requeue=True: model-call runtime full",
    "queued run without a ticket": "queued runs without a ticket",
    "loop wedged, worker exited": "its event loop has not run for",
}


def count_incidents(log_dir: Path) -> dict[str, int]:
    """How often the servers' logs in `log_dir` report each of INCIDENTS (absent: 0)."""
    counts = dict.fromkeys(INCIDENTS, 0)
    for path in log_dir.glob("*.log"):
        with open(path, encoding="utf-8", errors="replace") as log:
            for line in log:
                for label, needle in INCIDENTS.items():
                    if needle in line:
                        counts[label] += 1
    return {label: count for label, count in counts.items() if count}


def server_processes(cluster: Cluster) -> dict[str, int]:
    """The processes whose memory and CPU a benchmark reports (an embedded Redis included)."""
    return {name: proc.pid for name, proc in cluster.processes.items()}


def gateway_base(cluster: Cluster, index: int) -> str:
    return f"ws://127.0.0.1:{cluster.gateway_ports[index]}"


def authenticated_endpoint(variant: str) -> tuple[str, str]:
    """(path, what proves the token was accepted) for the gateway or the plain baseline:
    the gateway accepts every handshake and says `welcome` only to a valid token; the plain
    consumer accepts only a valid token."""
    return ("/ws/v1/", "welcome") if variant == "switchboard" else ("/bench/plain/", "open")


def closest(items: list[dict[str, Any]], key: str, value: float | None) -> dict[str, Any]:
    """The item whose `key` is nearest `value` (the round a median came from)."""
    return min(items, key=lambda item: abs((item[key] or 0) - (value or 0)))


# --- the load generator --------------------------------------------------------------------


def ensure_node_dependencies() -> str:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("the benchmarks need Node.js >= 18 (node) for the load generator")
    if not (BENCH_DIR / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("the benchmarks need npm to install the load generator's ws package")
        print("installing the load generator's dependency (npm ci in bench/) ...", flush=True)
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH_DIR, check=True
        )
    return node


@dataclass
class LoadClient:
    """Several Node load-generator processes; commands go to one or to all at once."""

    procs: int = 1
    log_dir: Path | None = None
    _children: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self) -> LoadClient:
        node = ensure_node_dependencies()
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="switchboard-loadgen-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.procs):
            log = open(log_dir / f"loadgen-{index}.log", "ab")  # noqa: SIM115 - child owns it
            self._children.append(
                subprocess.Popen(
                    [node, str(BENCH_DIR / "loadgen.mjs")],
                    cwd=BENCH_DIR,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    bufsize=1,
                )
            )
            log.close()
        return self

    def _send(self, index: int, cmd: str, params: dict[str, Any]) -> None:
        child = self._children[index]
        assert child.stdin is not None
        child.stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
        child.stdin.flush()

    def _receive(self, index: int, cmd: str) -> Any:
        child = self._children[index]
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator {index} exited during {cmd}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"load generator {index} failed {cmd}: {reply['error']}")
        return reply["result"]

    def call(self, index: int, cmd: str, **params: Any) -> Any:
        self._send(index, cmd, params)
        return self._receive(index, cmd)

    def all(self, cmd: str, per_proc: list[dict[str, Any]] | None = None, **params: Any) -> list:
        """Send `cmd` to every process at once (each with its own extra params), then
        gather the replies: the processes work in parallel."""
        for index in range(self.procs):
            self._send(index, cmd, {**params, **(per_proc[index] if per_proc else {})})
        return [self._receive(index, cmd) for index in range(self.procs)]

    def open_spread(
        self,
        group: str,
        urls: list[str],
        expect: str,
        concurrency: int = 200,
        timeout_ms: int = 30_000,
    ) -> dict[str, Any]:
        """Open `urls` spread evenly over the processes (socket i is named str(i));
        returns the merged handshake figures."""
        shards = [list(range(index, len(urls), self.procs)) for index in range(self.procs)]
        per_proc = [
            {"urls": [urls[i] for i in shard], "names": [str(i) for i in shard]} for shard in shards
        ]
        replies = self.all(
            "open",
            per_proc,
            group=group,
            expect=expect,
            concurrency=max(1, concurrency // self.procs),
            timeout_ms=timeout_ms,
        )
        latencies: list[float] = []
        for reply in replies:
            latencies += reply["latencies_ms"]
        starts = [r["first_start"] for r in replies if r["first_start"] is not None]
        ends = [r["last_done"] for r in replies if r["last_done"] is not None]
        span_ms = (max(ends) - min(starts)) if starts and ends else None
        return {
            "opened": sum(r["opened"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": sum_counts(r["errors"] for r in replies),
            "latencies_ms": latencies,
            "span_ms": span_ms,
            "client_cpu_s": round(sum(r["cpu_s"] for r in replies), 2),
        }

    def subscribe(self, group: str, **params: Any) -> None:
        """Subscribe every socket of `group` (see loadgen.mjs for `params`); errors are
        printed, not raised."""
        for reply in self.all("subscribe", group=group, **params):
            if reply["errors"]:
                print(f"  subscribe errors: {reply['errors']}")

    def open_warm(self, urls: list[str], expect: str) -> None:
        """Open the warm-up connections (group "warm", from the first process), so that
        one-time costs of a server's first connections fall outside what is measured."""
        warm = self.call(0, "open", group="warm", urls=urls, expect=expect)
        if warm["failed"]:
            raise RuntimeError(f"warm-up connections failed: {warm['errors']}")

    def stop(self) -> None:
        for index, child in enumerate(self._children):
            if child.poll() is None:
                with contextlib.suppress(Exception):
                    self._send(index, "exit", {})
        for child in self._children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        self._children.clear()

    def __enter__(self) -> LoadClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- results -------------------------------------------------------------------------------


def run_benchmark(
    name: str,
    title: str,
    args: argparse.Namespace,
    run_variant: Callable[[BenchEnv, LoadClient, str, argparse.Namespace], dict[str, Any]],
    print_variant: Callable[[dict[str, Any]], None],
    conclude: Callable[[Results, argparse.Namespace], tuple[dict[str, Any], dict[str, Any]]],
    sockets: int,
    variants: Sequence[str] | None = None,
    announce: bool = True,
) -> int:
    """What every benchmark's main() does around its own measuring.

    Prints the header, raises the open-files limit for `sockets` sockets in one process,
    and runs each of `variants` (default `args.variants`) with `run_variant` on its own
    fresh system, all with the same load generators, printing each result with
    `print_variant` (after a "-- VARIANT --" line when `announce`). `conclude(results,
    args)` then prints the ratios and the verdict and returns them as (ratios, target) for
    the results file, which is written last.
    """
    params = dict(vars(args))
    machine = print_header(f"bench.{name}: {title}", params)
    raise_open_files_limit(sockets + 1024)
    env = BenchEnv(name, args.redis_url, args.log_level)
    results: Results = {}
    try:
        with LoadClient(args.client_procs, env.log_root / "loadgen") as client:
            for variant in args.variants if variants is None else variants:
                if announce:
                    print(f"-- {variant} --")
                results[variant] = run_variant(env, client, variant, args)
                print_variant(results[variant])
    finally:
        env.cleanup()
    ratios, target = conclude(results, args)
    path = write_results(
        name,
        env.stamp,
        {
            "benchmark": name,
            "command": command_line(),
            "machine": machine,
            "parameters": params,
            "results": results,
            "ratios": ratios,
            "target": target,
            "logs": relative(env.log_root),
        },
    )
    print(f"results: {relative(path)}  (server logs: {relative(env.log_root)})")
    return 0


def write_results(name: str, stamp: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def verdict_text(met: bool | None) -> str:
    """MET / NOT MET, or why the run cannot say (it was smaller than the target's)."""
    return {True: "MET", False: "NOT MET", None: "not checked at this size"}[met]


def print_ratio(label: str, value: float | None) -> None:
    """The headline ratio of Switchboard to its baseline."""
    print(f"-- ratio: {label}: {fmt_ratio(value)} --")


def print_target(goal: str, met: bool | None, measured: str) -> None:
    """The verdict on the performance target, with the figure it was judged by."""
    print(f"target ({goal}): {verdict_text(met)} ({measured})")
