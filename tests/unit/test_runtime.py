"""The model-call runtime (workers/runtime.py) on its own: slots, admission, drain, watchdog."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from workers.runtime import (
    WEDGED_EXIT_STATUS,
    Admit,
    ModelCallRuntime,
    RuntimeBusy,
    RuntimeClosed,
)


@pytest.fixture
def runtime() -> Iterator[ModelCallRuntime]:
    engine = ModelCallRuntime(max_calls=3, threads=2, stall_s=30)
    yield engine
    engine.stop()


def wait_for(check: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_submit_returns_what_the_call_admits_while_the_call_goes_on(
    runtime: ModelCallRuntime,
) -> None:
    release = threading.Event()

    async def call(admit: Admit) -> None:
        admit("claimed")
        await asyncio.get_running_loop().run_in_executor(None, release.wait)

    assert runtime.submit(call) == "claimed"
    assert runtime.in_flight == 1
    release.set()
    wait_for(lambda: runtime.in_flight == 0, "the call to end")


def test_an_error_before_admission_is_raised_to_the_submitter(runtime: ModelCallRuntime) -> None:
    async def call(admit: Admit) -> None:
        raise ConnectionError("redis is down")

    with pytest.raises(ConnectionError):
        runtime.submit(call)
    wait_for(lambda: runtime.in_flight == 0, "the slot back")


def test_at_its_bound_submit_waits_and_gives_up_instead_of_buffering(
    runtime: ModelCallRuntime,
) -> None:
    release = asyncio.Event()
    loop = runtime.loop

    async def call(admit: Admit) -> None:
        admit(True)
        await release.wait()

    for _ in range(3):
        runtime.submit(call)
    with pytest.raises(RuntimeBusy):
        runtime.submit(call, wait_s=0.3)
    assert runtime.in_flight == 3
    loop.call_soon_threadsafe(release.set)
    wait_for(lambda: runtime.in_flight == 0, "the calls to end")
    assert runtime.submit(call) is True  # a slot again


def test_draining_refuses_new_calls_and_hands_over_those_past_the_bound(
    runtime: ModelCallRuntime,
) -> None:
    stopped: list[str] = []
    tasks: list[asyncio.Task[object]] = []

    async def quick(admit: Admit) -> None:
        admit(True)
        await asyncio.sleep(0.05)

    async def endless(admit: Admit) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        admit(True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append("handed over")

    runtime.submit(quick)
    runtime.submit(endless)

    async def hand_over() -> int:
        for task in tasks:
            task.cancel()
        return len(tasks)

    left = runtime.drain(0.5, hand_over)
    assert left == 1  # the quick call finished within the bound; the endless one did not
    assert stopped == ["handed over"]
    assert runtime.in_flight == 0
    with pytest.raises(RuntimeClosed):
        runtime.submit(quick)


WEDGED = """
import time
from workers.runtime import ModelCallRuntime

engine = ModelCallRuntime(max_calls=1, threads=1, stall_s=1.0)

async def call(admit):
    admit(True)
    time.sleep(60)  # blocking code on the loop: a backend that forgot to await

engine.submit(call)
time.sleep(60)
"""


def test_a_wedged_loop_ends_the_process_so_its_steps_go_elsewhere() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WEDGED], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == WEDGED_EXIT_STATUS
    assert "wedged" in proc.stderr
    assert "line 9 in call" in proc.stderr  # where the loop was stuck: the blocking call
