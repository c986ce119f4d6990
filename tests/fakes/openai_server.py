"""A local OpenAI-compatible chat-completions server for tests: real HTTP/1.1 over a real
socket (ThreadingHTTPServer on a free port of 127.0.0.1), no internet.

What it does is chosen per request by the model name, read as a query string:

    "stream?pieces=4&delay_ms=20"  stream the prompt in 4 pieces, 20 ms apart (the default)
    "stream?text=Hello"            stream this text instead of the prompt
    "stall?after=1"                stream 1 piece, then send nothing until the client leaves
    "status=429&retry_after=7"     answer 429 with Retry-After: 7 (any status works)
    "disconnect?after=2"           stream 2 pieces, then drop the connection mid-body
    "stream?done=0"                end the body cleanly but without `data: [DONE]`

    "tools?call=NAME&args=JSON"    answer with a call of tool NAME (arguments streamed in
                                   fragments), then, once the request holds its result,
                                   "answer:" and the results so far joined by "|"

Tool calls (kind "tools"): `rounds=N` asks for N rounds of calls before answering (99: as
long as it may); `say=T` streams T before each round's call; `stubborn=1` asks for a call
even when told not to (`tool_choice` none). `args` is sent as given, so `args={bad` is a
malformed call. The same server speaks Anthropic's Messages API on `/v1/messages` (text
and tool calls, `tool_use` blocks with `input_json_delta` fragments) for the "anthropic"
backend; `/v1/chat/completions` is OpenAI's dialect.

A request that asks for `stream_options: {"include_usage": true}` gets, as OpenAI sends it,
a last chunk before `[DONE]` with no choices and the call's `usage`: prompt_tokens (by
default the prompt's words + 10, so never the characters/4 estimate) and completion_tokens
(by default the pieces sent). "stream?prompt_tokens=7&completion_tokens=3" chooses them;
"stream?usage=0" sends none, as servers that do not support it. Tool-call turns of the
chat-completions dialect send none (their calls are estimated).

`fail_first=N` makes a failure (a status, a stall, a disconnect) happen only to the first N
calls with the same model and prompt; later ones stream as "stream" would, with the same
pieces, delay and text: "status=429&retry_after=1&fail_first=1" answers 429 once, then
streams. `retry_text=T` makes those later calls stream T instead, as a model that answers
differently when asked again. Parameters the fake does not know are ignored, so a test can
make a model name its own ("stream?tag=mine").

Every request is recorded (`server.calls`) with when it started, the pieces sent and how
it ended: "completed", "client_closed" (the client went away before the end),
"disconnected" (the server dropped it on purpose) or "error" (a status reply).
`wait_for_outcome` lets a test wait until the server has seen the end of a call, and
`wait_for_calls` until it has seen calls that match.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from workers.backends import split_evenly

MAX_WAIT_S = 30.0  # the longest a stall (or a delay) lasts, whatever the test does


@dataclass
class Call:
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    peer: tuple[str, int] = ("", 0)  # the client's address: the same for a reused connection
    path: str = ""
    pieces_sent: int = 0
    outcome: str | None = None
    ended_at: float | None = None
    # time.monotonic() when the request was read (ended_at uses the same clock).
    started_at: float = 0.0
    # The pieces of content streamed, in order.
    sent: list[str] = field(default_factory=list)
    # 1 for the first call with this model and prompt, 2 for the next, ...
    nth: int = 1

    @property
    def prompt(self) -> str:
        """The content of the last message: what the backend asked."""
        messages = self.body.get("messages") or [{}]
        return str(messages[-1].get("content", ""))

    @property
    def text(self) -> str:
        """What was streamed back."""
        return "".join(self.sent)

    def header(self, name: str) -> str | None:
        """A request header by name, whatever its case."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


@dataclass
class Behaviour:
    kind: str = "stream"
    pieces: int = 4
    delay_s: float = 0.0
    text: str | None = None
    after: int = 0
    status: int = 200
    retry_after: str | None = None
    done: bool = True
    fail_first: int | None = None
    # What calls past `fail_first` answer instead of the prompt: a model that answers
    # differently when asked again, as a real one does.
    retry_text: str | None = None
    # Every parameter as given (the tool-call kind reads its own).
    params: dict[str, str] = field(default_factory=dict)
    usage: bool = True
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @classmethod
    def parse(cls, model: str) -> Behaviour:
        kind, _, query = model.partition("?")
        if "=" in kind:  # "status=429&retry_after=7": no kind, only parameters
            kind, query = "status", model
        params = {name: values[-1] for name, values in parse_qs(query).items()}
        return cls(
            kind=kind or "stream",
            pieces=int(params.get("pieces", 4)),
            delay_s=float(params.get("delay_ms", 0)) / 1000,
            text=params.get("text"),
            after=int(params.get("after", 0)),
            status=int(params.get("status", 200)),
            retry_after=params.get("retry_after"),
            done=params.get("done", "1") != "0",
            fail_first=int(params["fail_first"]) if "fail_first" in params else None,
            retry_text=params.get("retry_text"),
            params=params,
            usage=params.get("usage", "1") != "0",
            prompt_tokens=int(params["prompt_tokens"]) if "prompt_tokens" in params else None,
            completion_tokens=(
                int(params["completion_tokens"]) if "completion_tokens" in params else None
            ),
        )

    def for_call(self, nth: int) -> Behaviour:
        """What the `nth` call with the same model and prompt gets: past `fail_first`
        calls, a plain stream."""
        if self.fail_first is None or nth <= self.fail_first:
            return self
        text = self.retry_text if self.retry_text is not None else self.text
        return replace(self, kind="stream", status=200, retry_after=None, text=text)


class ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        anthropic = self.path.rstrip("/").endswith("/messages")
        if self.path.rstrip("/").rsplit("/", 2)[-2:] != ["chat", "completions"] and not anthropic:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        model = str(body.get("model", ""))
        call = Call(
            model=model,
            body=body,
            headers=dict(self.headers.items()),
            peer=tuple(self.client_address[:2]),
            path=self.path,
        )
        self.server.record(call)
        behaviour = Behaviour.parse(model).for_call(call.nth)
        try:
            if behaviour.kind == "status" or behaviour.status != 200:
                self._error(behaviour)
                self.server.end(call, "error")
                return
            if behaviour.kind == "tools" or anthropic:
                self._turn(call, behaviour, body, anthropic)
                return
            self._stream(call, behaviour, body)
        except ClientGone:
            self.close_connection = True
            self.server.end(call, "client_closed")
        except OSError:
            self.close_connection = True
            self.server.end(call, "client_closed")

    def _error(self, behaviour: Behaviour) -> None:
        kinds = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}
        payload = {
            "error": {
                "message": f"fake error {behaviour.status}",
                "type": kinds.get(behaviour.status, "server_error"),
                "param": None,
                "code": "rate_limit_exceeded" if behaviour.status == 429 else None,
            }
        }
        extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
        self._json(behaviour.status, payload, extra)

    def _json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, call: Call, behaviour: Behaviour, body: dict[str, Any]) -> None:
        text = behaviour.text
        if text is None:
            messages = body.get("messages") or [{}]
            text = str(messages[-1].get("content", ""))
        pieces = split_evenly(text, behaviour.pieces)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._event(call.model, {"role": "assistant", "content": ""}, None)
        limit = behaviour.after if behaviour.kind in ("stall", "disconnect") else len(pieces)
        for index, piece in enumerate(pieces[:limit]):
            if index and behaviour.delay_s:
                self._wait(behaviour.delay_s)
            self._event(call.model, {"content": piece}, None)
            call.sent.append(piece)
            call.pieces_sent += 1
        if behaviour.kind == "stall":
            self._wait(MAX_WAIT_S)
            raise ClientGone()  # only a test that forgot to leave gets here
        if behaviour.kind == "disconnect":
            # Without the closing chunk: the body is cut off, as when a proxy or the
            # provider drops the connection.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            self.server.end(call, "disconnected")
            return
        self._event(call.model, {}, "stop")
        if behaviour.usage and (body.get("stream_options") or {}).get("include_usage"):
            self._usage(call, behaviour)
        if behaviour.done:
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")
        self.server.end(call, "completed")

    def _turn(
        self, call: Call, behaviour: Behaviour, body: dict[str, Any], anthropic: bool
    ) -> None:
        """A tool-calling model's turn, in either dialect: a call of the tool while fewer
        rounds than asked have results, else the answer made of the results."""
        params = behaviour.params
        results = tool_results(body, anthropic)
        choice = body.get("tool_choice")
        forbidden = choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")
        wants_call = (
            behaviour.kind == "tools"
            and len(results) < int(params.get("rounds", 1))
            and (not forbidden or params.get("stubborn") == "1")
        )
        if wants_call:
            text = params.get("say", "")
            arguments = params.get("args", "{}")
            tool_call = (f"call_{len(results)}", params.get("call", "tool"), arguments)
        else:
            text = behaviour.text if behaviour.text is not None else "answer:" + "|".join(results)
            if behaviour.kind != "tools" and behaviour.text is None:
                text = last_text(body)
            tool_call = None
        pieces = split_evenly(text, behaviour.pieces) if text else []
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        emit = self._anthropic_turn if anthropic else self._openai_turn
        emit(call, behaviour, pieces, tool_call)
        self._chunk(b"")
        self.server.end(call, "completed")

    def _openai_turn(
        self,
        call: Call,
        behaviour: Behaviour,
        pieces: list[str],
        tool_call: tuple[str, str, str] | None,
    ) -> None:
        self._event(call.model, {"role": "assistant", "content": ""}, None)
        self._pieces(
            call, behaviour, pieces, lambda p: self._event(call.model, {"content": p}, None)
        )
        if tool_call is not None:
            call_id, name, arguments = tool_call
            head = {"index": 0, "id": call_id, "type": "function"}
            self._event(
                call.model,
                {"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]},
                None,
            )
            for fragment in split_evenly(arguments, 3):
                self._event(
                    call.model,
                    {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]},
                    None,
                )
        self._event(call.model, {}, "tool_calls" if tool_call else "stop")
        self._chunk(b"data: [DONE]\n\n")

    def _anthropic_turn(
        self,
        call: Call,
        behaviour: Behaviour,
        pieces: list[str],
        tool_call: tuple[str, str, str] | None,
    ) -> None:
        def sse(name: str, payload: dict[str, Any]) -> None:
            self._chunk(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())

        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": call.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
        sse("message_start", {"type": "message_start", "message": message})
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        self._pieces(
            call,
            behaviour,
            pieces,
            lambda p: sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": p},
                },
            ),
        )
        sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        if tool_call is not None:
            call_id, name, arguments = tool_call
            block = {"type": "tool_use", "id": "toolu_" + call_id, "name": name, "input": {}}
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": 1, "content_block": block},
            )
            for fragment in split_evenly(arguments, 3):
                delta = {"type": "input_json_delta", "partial_json": fragment}
                sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 1, "delta": delta},
                )
            sse("content_block_stop", {"type": "content_block_stop", "index": 1})
        stop = "tool_use" if tool_call else "end_turn"
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 1},
            },
        )
        sse("message_stop", {"type": "message_stop"})

    def _pieces(
        self, call: Call, behaviour: Behaviour, pieces: list[str], send: Callable[[str], None]
    ) -> None:
        for index, piece in enumerate(pieces):
            if index and behaviour.delay_s:
                self._wait(behaviour.delay_s)
            send(piece)
            call.sent.append(piece)
            call.pieces_sent += 1

    def _event(self, model: str, delta: dict[str, Any], finish: str | None) -> None:
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def _usage(self, call: Call, behaviour: Behaviour) -> None:
        prompt = behaviour.prompt_tokens
        if prompt is None:
            prompt = len(call.prompt.split()) + 10
        completion = behaviour.completion_tokens
        if completion is None:
            completion = call.pieces_sent
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self._check_client()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _wait(self, seconds: float) -> None:
        """Sleep, but notice at once a client that closes its end (or a server stop)."""
        until = time.monotonic() + min(seconds, MAX_WAIT_S)
        while (left := until - time.monotonic()) > 0 and not self.server.stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                self._check_client()
        self._check_client()

    def _check_client(self) -> None:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if readable:
            try:
                gone = self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                gone = True
            if gone:
                raise ClientGone()


def tool_results(body: dict[str, Any], anthropic: bool) -> list[str]:
    """The tool results a request feeds back, in order, in either dialect."""
    found = []
    for message in body.get("messages") or ():
        if not anthropic and message.get("role") == "tool":
            found.append(str(message.get("content", "")))
        content = message.get("content")
        if anthropic and isinstance(content, list):
            found += [
                str(block.get("content", ""))
                for block in content
                if isinstance(block, dict) and block.get("type") == "tool_result"
            ]
    return found


def last_text(body: dict[str, Any]) -> str:
    """The text of the request's last message (a string, or text blocks)."""
    content = (body.get("messages") or [{}])[-1].get("content", "")
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


class FakeOpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[Call] = []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client closing an idle keep-alive connection is normal, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def record(self, call: Call) -> None:
        with self.changed:
            call.started_at = time.monotonic()
            call.nth = 1 + sum(
                1 for seen in self.calls if seen.model == call.model and seen.prompt == call.prompt
            )
            self.calls.append(call)
            self.changed.notify_all()

    def end(self, call: Call, outcome: str) -> None:
        with self.changed:
            call.outcome = outcome
            call.ended_at = time.monotonic()
            self.changed.notify_all()

    def wait_for_outcome(self, model: str, timeout: float = 5.0) -> Call:
        """The last call for `model`, once the server has seen how it ended."""

        def ended() -> Call | None:
            found = [call for call in self.calls if call.model == model]
            return found[-1] if found and found[-1].outcome else None

        with self.changed:
            if not self.changed.wait_for(ended, timeout):
                raise TimeoutError(f"no ended call for {model!r} within {timeout}s")
            return ended()  # type: ignore[return-value]

    def calls_where(self, predicate: Callable[[Call], bool]) -> list[Call]:
        """The calls so far that match, in the order they came."""
        with self.changed:
            return [call for call in self.calls if predicate(call)]

    def wait_for_calls(
        self,
        predicate: Callable[[Call], bool],
        count: int = 1,
        timeout: float = 5.0,
        ended: bool = False,
    ) -> list[Call]:
        """The matching calls once there are at least `count` (all ended, if `ended`)."""

        def enough() -> list[Call] | None:
            found = [call for call in self.calls if predicate(call)]
            if len(found) < count or (ended and any(c.outcome is None for c in found)):
                return None
            return found

        with self.changed:
            if not self.changed.wait_for(enough, timeout):
                raise TimeoutError(f"fewer than {count} matching calls within {timeout}s")
            return enough()  # type: ignore[return-value]
