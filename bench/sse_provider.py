"""A local OpenAI-compatible chat-completions server that holds many slow streams at once,
for bench.generations: aiohttp in its own process, so the model's side costs the worker
being measured nothing.

The model name says how to stream, as a query string: "gen?pieces=6&seconds=60" sends 6
pieces spread evenly over 60 s (the first after seconds/pieces), then `data: [DONE]`.

`GET /stats` answers when each stream whose prompt starts with "tag:NAME " saw its client
go away (epoch seconds by NAME), for bench/cancel.py.

    python -m bench.sse_provider PORT
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from urllib.parse import parse_qs

from aiohttp import web

CLOSED_AT: dict[str, float] = {}


def _tag(body: dict) -> str:
    messages = body.get("messages") or [{}]
    prompt = str(messages[-1].get("content", ""))
    return prompt.split(" ", 1)[0][4:] if prompt.startswith("tag:") else ""


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"closed_at": CLOSED_AT})


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    tag = _tag(body)
    _, _, query = str(body.get("model", "")).partition("?")
    params = {name: values[-1] for name, values in parse_qs(query).items()}
    pieces = max(1, int(params.get("pieces", 6)))
    seconds = max(0.0, float(params.get("seconds", 60)))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    started = time.monotonic()
    try:
        for index in range(pieces):
            await asyncio.sleep(
                max(0.0, started + seconds * (index + 1) / pieces - time.monotonic())
            )
            chunk = {"choices": [{"index": 0, "delta": {"content": f"piece {index} "}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        # aiohttp cancels the handler when its client closes the connection.
        if tag:
            CLOSED_AT[tag] = time.time()
        raise
    return response


def main() -> None:
    port = int(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/stats", stats)
    # handler_cancellation: a client that goes away is seen at once, not at the next write.
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        backlog=4096,
        print=None,
        access_log=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
