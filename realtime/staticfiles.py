"""Static files (the admin's CSS and JavaScript) served by the gateway itself, with
WhiteNoise, from what `manage.py collectstatic` wrote to STATIC_ROOT.

daphne serves no files, and a deployment should not need a second server just for the
admin. WhiteNoise is the usual choice for Django behind an application server: it indexes
STATIC_ROOT once at start-up, answers with the compressed variant a browser accepts, and
sends names carrying a content hash (the manifest storage writes them) with a year-long
`immutable` cache lifetime, the others with a short one.

Its middleware is synchronous only. Under ASGI one synchronous middleware makes Django run
the whole chain of every HTTP request, async views included, through a thread hop on its
one shared thread; this subclass keeps the chain asynchronous and reads the (small) file in
a worker thread instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import markcoroutinefunction
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware

logger = logging.getLogger(__name__)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> None:
        super().__init__(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:  # type: ignore[override]
        if self.autorefresh:
            static_file = self.find_file(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is None:
            return await self.get_response(request)
        return await asyncio.to_thread(self._read, static_file, request)

    def add_files(self, root: str, prefix: str | None = None) -> None:
        if os.path.isdir(root):
            super().add_files(root, prefix)
        else:
            # Said once at start-up, in the log rather than as a Python warning.
            logger.warning(
                "no static files at %s: the admin has no CSS or JavaScript until"
                " `manage.py collectstatic` fills it",
                root,
            )

    @staticmethod
    def _read(static_file: Any, request: HttpRequest) -> HttpResponse:
        """WhiteNoise's answer (status, headers, maybe a byte range) with the body read
        whole: a plain response, where a file response would make Django iterate a
        synchronous file under ASGI (a thread per chunk and a warning per file)."""
        answer = static_file.get_response(request.method, request.META)
        body = b""
        if answer.file is not None:
            with answer.file:
                body = answer.file.read()
        response = HttpResponse(body, status=int(answer.status))
        del response["Content-Type"]
        for key, value in answer.headers:
            response[key] = value
        return response
