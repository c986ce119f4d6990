"""The model-call runtime: one asyncio event loop per worker process that holds thousands of
streaming model calls at once.

A real model streams for seconds, so what sizes a deployment is how many generations run
concurrently, not how many processes it has. Celery stays the orchestrator (queues, acks,
fairness, redelivery); its tasks are dispatchers (orchestration/tasks.py) that hand a step to
this runtime and return as soon as the step is *admitted* — claimed in Redis, from when on
its lease protects it — so a Celery pool thread is busy for a Redis round trip per step, not
for a model call. A call waiting on its model is a suspended coroutine and a socket.

Bounds and their replacements for Celery's per-task machinery:
- `max_calls` calls in flight: `submit` blocks its pool thread while the runtime is full,
  so the worker stops prefetching and new work waits in the broker (visible, bounded, and
  refused at admission) instead of in this process's memory.
- Soft limits and deadlines are asyncio timeouts; a stop is a task cancellation.
- Blocking code (Python steps, backends with only a blocking interface) runs in the loop's
  default executor, a pool of `threads` threads, never on the loop.
- The old hard time limit killed a process that a task wedged. Here nothing may block the
  loop; should something do so anyway, the watchdog sees the loop stalled for `stall_s`,
  logs where it is stuck and exits the process, whose steps are then redelivered by the
  sweeper when their leases lapse (as for any worker that dies).
- Shutdown drains like a web server: `begin_drain` refuses new steps, `drain` waits for the
  calls in flight up to a bound, then asks the steps still running to hand themselves over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from project.conf import conf

logger = logging.getLogger(__name__)

# The process exit status when the watchdog finds the loop wedged (EX_SOFTWARE).
WEDGED_EXIT_STATUS = 70


class RuntimeClosed(Exception):
    """The runtime is draining or stopped: it takes no new calls."""


class RuntimeBusy(RuntimeClosed):
    """Every slot stayed taken for as long as the caller would wait."""


Admit = Callable[[Any], None]
CallFactory = Callable[[Admit], Awaitable[Any]]


class ModelCallRuntime:
    def __init__(self, max_calls: int, threads: int, stall_s: float) -> None:
        if max_calls < 1 or threads < 1:
            raise ValueError("a runtime needs at least one call and one thread")
        self.max_calls = max_calls
        self.threads = threads
        self.stall_s = stall_s
        self._slots = threading.BoundedSemaphore(max_calls)
        self._draining = threading.Event()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._services: list[Callable[[], Awaitable[None]]] = []
        self._service_tasks: list[asyncio.Task[None]] = []
        self._beat = time.monotonic()
        self._stopped = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        self.start()
        assert self._loop is not None
        return self._loop

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def add_service(self, service: Callable[[], Awaitable[None]]) -> None:
        """A coroutine that runs as long as the loop does (lease renewal, stop listener)."""
        self._services.append(service)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_service, service)

    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(started,), name="model-call-runtime", daemon=True
            )
            self._thread.start()
            started.wait()
            threading.Thread(target=self._watch, name="runtime-watchdog", daemon=True).start()
            logger.info(
                "model-call runtime started max_calls=%s threads=%s", self.max_calls, self.threads
            )

    def _run_loop(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="step-thread")
        )
        asyncio.set_event_loop(loop)
        self._loop = loop
        for service in self._services:
            self._start_service(service)
        loop.call_soon(self._heartbeat)
        started.set()
        loop.run_forever()

    def _start_service(self, service: Callable[[], Awaitable[None]]) -> None:
        async def guarded() -> None:
            while True:
                try:
                    await service()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("runtime service failed; restarting it")
                    await asyncio.sleep(1)

        assert self._loop is not None
        self._service_tasks.append(self._loop.create_task(guarded()))

    # --- calls -----------------------------------------------------------------------------

    def submit(self, make_call: CallFactory, wait_s: float | None = None) -> Any:
        """From a Celery pool thread: wait for a free slot, start the call on the loop, and
        wait until it admits itself (`admit(value)`: from then on it no longer needs the
        Celery message); returns that value. An exception before admission is raised here.
        Raises RuntimeClosed instead of starting anything once the runtime drains, and
        RuntimeBusy when no slot came free within `wait_s`."""
        loop = self.loop
        give_up_at = None if wait_s is None else time.monotonic() + wait_s
        while not self._slots.acquire(timeout=0.2):
            if self._draining.is_set():
                raise RuntimeClosed()
            if give_up_at is not None and time.monotonic() >= give_up_at:
                raise RuntimeBusy()
        if self._draining.is_set():
            self._slots.release()
            raise RuntimeClosed()
        admitted: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def admit(value: Any) -> None:
            if not admitted.done():
                admitted.set_result(value)

        def begin() -> None:
            task = loop.create_task(self._call(make_call, admit, admitted))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            loop.call_soon_threadsafe(begin)
        except RuntimeError:
            self._slots.release()
            raise RuntimeClosed() from None
        return admitted.result()

    async def _call(
        self, make_call: CallFactory, admit: Admit, admitted: concurrent.futures.Future[Any]
    ) -> None:
        try:
            await make_call(admit)
        except asyncio.CancelledError:
            if not admitted.done():
                admitted.set_exception(RuntimeClosed())
        except BaseException as error:
            if not admitted.done():
                admitted.set_exception(error)
            else:
                logger.exception("model call failed after admission")
        finally:
            admit(None)
            self._slots.release()

    def call_soon(self, coroutine: Callable[[], Awaitable[Any]]) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the loop from another thread (not counted as a call)."""

        async def run() -> Any:
            return await coroutine()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    # --- shutdown --------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Take no new calls; those in flight go on."""
        if not self._draining.is_set():
            self._draining.set()
            logger.info("model-call runtime draining in_flight=%s", self.in_flight)

    def drain(
        self,
        timeout_s: float,
        hand_over: Callable[[], Awaitable[int]] | None = None,
        hand_over_s: float = 5.0,
    ) -> int:
        """Wait up to `timeout_s` for the calls in flight to finish; then `hand_over` the
        rest (it stops them so they give their runs to other workers) and wait up to
        `hand_over_s` for that. Returns how many calls were still running at the bound."""
        self.begin_drain()
        if self._loop is None:
            return 0
        left = self._wait_idle(timeout_s)
        if left and hand_over is not None:
            handed = self.call_soon(hand_over).result(timeout=hand_over_s)
            logger.warning(
                "drain bound reached: handing over the calls still in flight in_flight=%s "
                "handed=%s",
                left,
                handed,
            )
            self._wait_idle(hand_over_s)
        return left

    def _wait_idle(self, timeout_s: float) -> int:
        until = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < until:
            time.sleep(0.02)
        return self.in_flight

    def stop(self) -> None:
        # First, so the watchdog never takes a loop that was stopped on purpose for wedged.
        self._stopped.set()
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def cancel_everything() -> None:
            for task in [*self._tasks, *self._service_tasks]:
                task.cancel()
            await asyncio.gather(*self._tasks, *self._service_tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_everything(), loop).result(timeout=5)
        except Exception:
            logger.warning("runtime tasks did not all stop", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)

    # --- watchdog --------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        assert self._loop is not None
        self._loop.call_later(0.5, self._heartbeat)

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            stalled = time.monotonic() - self._beat
            if stalled > self.stall_s:
                thread = self._thread
                logger.critical(
                    "model-call runtime wedged: its event loop has not run for %.1fs; exiting "
                    "so the steps it holds are redelivered elsewhere",
                    stalled,
                )
                if thread is not None and thread.ident is not None:
                    frame = sys._current_frames().get(thread.ident)
                    if frame is not None:
                        import traceback

                        logger.critical(
                            "the loop is stuck in:\n%s", "".join(traceback.format_stack(frame))
                        )
                faulthandler.dump_traceback(all_threads=True)
                os._exit(WEDGED_EXIT_STATUS)


_runtime: ModelCallRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> ModelCallRuntime:
    """This process's runtime, sized by settings (built on first use, after any fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            config = conf()
            _runtime = ModelCallRuntime(
                max_calls=config.worker_max_calls,
                threads=config.worker_threads,
                stall_s=config.worker_loop_stall_s,
            )
        return _runtime


def reset_after_fork() -> None:
    """A forked process builds its own runtime: threads and loops do not survive a fork."""
    global _runtime
    _runtime = None
