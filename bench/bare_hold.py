"""The floor bench.generations compares against: what a team would otherwise write to hold
model streams - one asyncio process, aiohttp, one task per call reading an OpenAI-compatible
SSE stream. No Redis, Celery or WebSockets, and none of their promises.

Opens calls at CALLS/MODEL_SECONDS per second for twice the model time (so CALLS are in
flight during the second half, which alone is measured) and prints one JSON line.

    python -m bench.bare_hold BASE_URL MODEL CALLS MODEL_SECONDS
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import aiohttp
import psutil


async def main(base_url: str, model: str, calls: int, model_s: float) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    me = psutil.Process()
    idle_rss = me.memory_info().rss
    peak_rss = idle_rss
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector)
    done_ms: list[float] = []
    first_ms: list[float] = []
    errors: dict[str, int] = {}
    rate = calls / model_s
    total = int(2 * model_s * rate)
    start = time.monotonic() + 0.1
    measured_from = start + model_s

    async def call(scheduled: float) -> None:
        sent = time.monotonic()
        first = None
        try:
            async with session.post(
                f"{base_url}/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                },
            ) as response:
                async for line in response.content:
                    if line.startswith(b"data:") and first is None and b"[DONE]" not in line:
                        first = time.monotonic()
        except Exception as error:  # counted, as a client would
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            return
        if scheduled >= measured_from:
            done_ms.append(1000 * (time.monotonic() - sent))
            if first is not None:
                first_ms.append(1000 * (first - sent))

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, me.memory_info().rss)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    cpu0 = sum(me.cpu_times()[:2])
    tasks = []
    for index in range(total):
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        tasks.append(asyncio.create_task(call(scheduled)))
    await asyncio.gather(*tasks)
    cpu = sum(me.cpu_times()[:2]) - cpu0
    sampler.cancel()
    await session.close()
    window_s = model_s
    return {
        "done_ms": done_ms,
        "first_ms": first_ms,
        "errors": errors,
        "achieved_per_s": round(len(done_ms) / window_s, 1),
        "cpu_ms_per_call": round(1000 * cpu / total, 3),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "rss_per_1000_mib": round((peak_rss - idle_rss) / 2**20 * 1000 / calls, 1),
    }


if __name__ == "__main__":
    base, model_name, count, seconds = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(base, model_name, int(count), float(seconds)))))
