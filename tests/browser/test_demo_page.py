"""The demo page in headless Chromium against a real cluster: streamed replies, two people
seeing each other, recovery after a dropped connection and after a gateway restart (no gap,
no duplicate), and 429s while flooding. What a test checks beyond the DOM it reads from
window.__switchboardDebug, where the page records every event it was handed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from client.connection import since_last_restart
from tests.browser.conftest import WAIT_MS, DemoCluster, OpenPage, save_screenshot


def debug(page: Any, expression: str) -> Any:
    """Evaluate `expression` with `d` = the page's window.__switchboardDebug."""
    return page.evaluate(f"() => {{ const d = window.__switchboardDebug; return {expression}; }}")


def events(page: Any, stream: str) -> list[dict[str, Any]]:
    return debug(page, f"d.events[{stream!r}] || []")


def assert_each_seq_once_in_order(page: Any, stream: str) -> list[int]:
    seqs = debug(page, f"d.seqs[{stream!r}] || []")
    assert seqs == list(range(1, len(seqs) + 1)), f"seqs must be 1..n, each once: {seqs}"
    return seqs


def run_events(
    page: Any, stream: str, text: str, done_text: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The reply.delta events (since the run's last reply.restart) and the reply.done of the
    reply to the message `text` (echo's: `done_text` is `text`)."""
    seen = events(page, stream)
    message = next(e for e in seen if e["kind"] == "message" and e["data"]["text"] == text)
    done = next(
        e
        for e in seen
        if e["kind"] == "reply.done"
        and e["seq"] > message["seq"]
        and e["data"]["text"] == (text if done_text is None else done_text)
    )
    run = done["data"]["run"]
    mine = [e for e in seen if isinstance(e["data"], dict) and e["data"].get("run") == run]
    return since_last_restart(mine), done


def assert_assembled(deltas: list[dict[str, Any]], done: dict[str, Any], text: str) -> None:
    offset = 0
    for delta in deltas:
        assert delta["data"]["offset"] == offset, "delta offsets must be contiguous"
        offset += len(delta["data"]["text"])
    assert "".join(d["data"]["text"] for d in deltas) == text
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"] == text


def send(page: Any, text: str, chunks: int = 6, delay_ms: int = 80) -> None:
    page.fill("#chunks", str(chunks))
    page.fill("#delay", str(delay_ms))
    page.fill("#text", text)
    page.click("#send")


def reply_item(page: Any, text: str) -> Any:
    return page.locator("li.reply", has_text=text)


def wait_done(page: Any, text: str) -> None:
    page.wait_for_selector(f"li.reply[data-status='ok'] .bubble:text-is({text!r})", timeout=WAIT_MS)


def test_send_and_receive_a_streamed_reply(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    stream = unique("chat")
    page = open_page(stream, client=unique("ann"))
    text = "a reply that streams in pieces"
    send(page, text, chunks=6, delay_ms=80)
    wait_done(page, text)

    deltas, done = run_events(page, stream, text)
    # Pieces 80 ms apart are not coalesced (SWITCHBOARD_DELTA_FLUSH_MS is 50): it streamed.
    assert len(deltas) >= 2, deltas
    assert_assembled(deltas, done, text)
    assert page.locator("li.msg.mine .bubble").inner_text() == text
    assert reply_item(page, text).locator(".bubble").inner_text() == text
    assert_each_seq_once_in_order(page, stream)
    assert "none missed or repeated" in page.inner_text("#seq-check")


def test_two_pages_see_each_others_messages_and_presence(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    stream = unique("room")
    ann, bob = unique("ann"), unique("bob")
    first = open_page(stream, client=ann, name="Ann")
    second = open_page(stream, client=bob, name="Bob")

    # Each sees the other: the first by the join event, the second by its snapshot.
    first.wait_for_selector(f"#presence li[data-client='{bob}']", timeout=WAIT_MS)
    second.wait_for_selector(f"#presence li[data-client='{ann}']", timeout=WAIT_MS)
    assert first.inner_text("#presence-count") == "2"
    assert second.inner_text("#presence-count") == "2"

    send(first, "hello from Ann", chunks=3, delay_ms=60)
    wait_done(second, "hello from Ann")
    send(second, "and hello from Bob", chunks=3, delay_ms=60)
    wait_done(first, "and hello from Bob")
    wait_done(second, "and hello from Bob")
    wait_done(first, "hello from Ann")

    # Both pages were handed the same events, in the same order, each once.
    assert_each_seq_once_in_order(first, stream)
    assert_each_seq_once_in_order(second, stream)
    assert [e["id"] for e in events(first, stream)] == [e["id"] for e in events(second, stream)]
    theirs = first.locator("li.msg:not(.mine) .bubble")
    assert theirs.all_inner_texts() == ["and hello from Bob"]

    path = save_screenshot(first, "demo-page.png")
    print(f"\nscreenshot of the demo page: {path}")

    # Bob closes his page: Ann sees him leave.
    second.context.close()
    first.wait_for_selector(f"#presence li[data-client='{bob}']", state="detached", timeout=WAIT_MS)
    assert first.inner_text("#presence-count") == "1"


def test_dropped_connection_resumes_mid_reply_without_gap_or_duplicate(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    stream = unique("drop")
    page = open_page(stream, client=unique("dee"))
    text = "this reply keeps streaming while the socket is dropped"
    send(page, text, chunks=12, delay_ms=120)
    page.wait_for_selector("li.reply[data-status='streaming']", timeout=WAIT_MS)

    page.click("#drop")
    page.wait_for_function(
        "() => window.__switchboardDebug.reconnects >= 1"
        " && window.__switchboardDebug.state === 'open'",
        timeout=WAIT_MS,
    )
    wait_done(page, text)

    states = [change["state"] for change in debug(page, "d.states")]
    assert states[:2] == ["connecting", "open"], states
    assert "reconnecting" in states[2:] and states[-1] == "open", states
    # The session outlived the socket: the new connection continued it.
    assert debug(page, "d.states[d.states.length - 1].resumed") is True
    assert int(page.inner_text("#reconnects")) >= 1

    deltas, done = run_events(page, stream, text)
    assert_assembled(deltas, done, text)
    assert_each_seq_once_in_order(page, stream)


def test_gateway_restart_resumes_mid_reply_without_gap_or_duplicate(
    open_page: OpenPage, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    stream = unique("restart")
    # While the gateway is down the client's reconnect attempts are refused, and Chromium
    # logs each one.
    open_page.allow(r"WebSocket connection to .* failed")
    page = open_page(stream, client=unique("gus"))
    text = "the gateway restarts while this reply is streaming to the page"
    send(page, text, chunks=14, delay_ms=200)
    page.wait_for_selector("li.reply[data-status='streaming']", timeout=WAIT_MS)

    demo_cluster.restart_gateway()  # SIGTERM, drain, 1012; a new process on the same port
    page.wait_for_function(
        "() => window.__switchboardDebug.reconnects >= 1"
        " && window.__switchboardDebug.state === 'open'",
        timeout=WAIT_MS,
    )
    wait_done(page, text)

    close_codes = debug(page, "d.client.closeCodes")
    assert close_codes and close_codes[0] in (1012, 1006), close_codes
    # Sessions live in Redis: the new gateway process resumed it.
    assert debug(page, "d.states[d.states.length - 1].resumed") is True
    deltas, done = run_events(page, stream, text)
    assert_assembled(deltas, done, text)

    # The new gateway serves new messages too.
    send(page, "after the restart", chunks=2, delay_ms=60)
    wait_done(page, "after the restart")
    assert_each_seq_once_in_order(page, stream)


def test_flood_gets_429s_and_every_message_lands_once(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    stream = unique("flood")
    page = open_page(stream, client=unique("fay"))
    page.click("#flood")
    page.wait_for_function("() => window.__switchboardDebug.flood.done", timeout=WAIT_MS)

    flood = debug(page, "d.flood")
    assert flood["acked"] == flood["sent"] == 60 and flood["failed"] == 0, flood
    # 60 at once is past the default burst of 40: some were refused and retried after
    # the retry_after_ms the server gave.
    assert debug(page, "d.rateLimited") > 0
    assert all(ms >= 1 for ms in debug(page, "d.retryAfterMs"))
    page.wait_for_function(
        f"() => (window.__switchboardDebug.seqs[{stream!r}] || []).length >= 60", timeout=WAIT_MS
    )
    published = [e["data"]["text"] for e in events(page, stream) if e["kind"] == "published"]
    assert sorted(published) == sorted(f"flood {i}/60" for i in range(1, 61))
    assert_each_seq_once_in_order(page, stream)
    assert "× 429" in page.inner_text("#flood-status")


def test_a_restarted_reply_is_cleared_and_assembled_again(
    browser: Any, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    """A `reply.restart` (a retried model call answered differently): the page empties the
    partial reply, marks it restarted and shows only the new attempt, never a splice. The
    page and its token come from the real cluster; its socket is played by the test, which
    is how a restart can be sent at a chosen moment."""
    stream = unique("restart")
    sockets: list[Any] = []
    errors: list[str] = []

    def play_gateway(ws: Any) -> None:
        sockets.append(ws)
        ws.send(json.dumps(scripted_welcome()))

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            kind = frame["type"]
            if kind == "subscribe":
                ws.send(
                    json.dumps(
                        {
                            "type": "subscribed",
                            "stream": frame["stream"],
                            "head": 0,
                            "recovered": True,
                        }
                    )
                )
            elif kind == "presence":
                ws.send(json.dumps({"type": "presence", "stream": frame["stream"], "clients": []}))
            elif kind == "ping":
                ws.send(json.dumps({"type": "pong"}))
            elif kind == "send":
                ws.send(
                    json.dumps(
                        {
                            "type": "ack",
                            "id": frame["id"],
                            "event_id": "e1",
                            "seq": 1,
                            "duplicate": False,
                        }
                    )
                )
                for event in scripted_run(stream, frame["id"], frame["text"])[:3]:
                    ws.send(json.dumps(event))

        ws.on_message(on_message)

    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route_web_socket(lambda url: "/ws/v1/" in url, play_gateway)
        page.goto(f"{demo_cluster.base_url}/demo/?{urlencode({'stream': stream})}")
        page.wait_for_selector("body[data-subscribed='true']", timeout=WAIT_MS)
        [ws] = sockets

        send(page, "hi")
        bubble = page.locator("li.reply .bubble")
        page.wait_for_selector("li.reply .bubble:text-is('lorem lo')", timeout=WAIT_MS)
        assert page.locator("li.reply .restart-tag").is_hidden()

        *_, restart, first_piece, second_piece, done = scripted_run(stream, "m", "hi")
        ws.send(json.dumps(restart))
        page.wait_for_selector("li.reply[data-restarts='1']", timeout=WAIT_MS)
        assert bubble.inner_text() == "", "the void answer is cleared at once"
        assert page.locator("li.reply .restart-tag").inner_text() == "↻ restarted"

        ws.send(json.dumps(first_piece))
        page.wait_for_selector("li.reply .bubble:text-is('ipsum ')", timeout=WAIT_MS)
        ws.send(json.dumps(second_piece))
        ws.send(json.dumps(done))
        page.wait_for_selector("li.reply[data-status='ok']", timeout=WAIT_MS)
        assert bubble.inner_text() == "ipsum dolor"
        assert_each_seq_once_in_order(page, stream)
        deltas, final = run_events(page, stream, "hi", done_text="ipsum dolor")
        assert [d["data"]["text"] for d in deltas] == ["ipsum ", "dolor"]
        assert final["data"]["text"] == "ipsum dolor"
        save_screenshot(page, "demo-restarted-reply.png")
        assert errors == []
    finally:
        context.close()


def scripted_welcome() -> dict[str, Any]:
    return {
        "type": "welcome",
        "client": "ann",
        "tenant": "demo",
        "session": "s1",
        "heartbeat_s": 25,
        "limits": {},
    }


def scripted_run(stream: str, message_id: str, text: str) -> list[dict[str, Any]]:
    """The message and its run's events: "lorem lo", a restart, then "ipsum dolor"."""
    cause = {"client": "ann", "message": message_id, "prev": "e1"}

    def event(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "event",
            "stream": stream,
            "seq": seq,
            "id": f"e{seq}",
            "kind": kind,
            "from": "agent:echo" if kind != "message" else "client:ann",
            "cause": cause if kind != "message" else {**cause, "prev": None},
            "ts": "2026-01-01T00:00:00Z",
            "data": {"run": "r1", **data} if kind != "message" else data,
        }

    return [
        event(1, "message", {"text": text, "agent": "echo"}),
        event(2, "reply.delta", {"offset": 0, "text": "lorem "}),
        event(3, "reply.delta", {"offset": 6, "text": "lo"}),
        event(4, "reply.restart", {"attempt": 2, "reason": "model_error"}),
        event(5, "reply.delta", {"offset": 0, "text": "ipsum "}),
        event(6, "reply.delta", {"offset": 6, "text": "dolor"}),
        event(7, "reply.done", {"status": "ok", "text": "ipsum dolor", "detail": None}),
    ]


def test_agents_without_a_model_are_marked_and_their_degraded_reply_says_why(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    stream = unique("degraded")
    page = open_page(stream, client=unique("deb"))
    # The browser cluster configures no model: the example agents cannot answer.
    option = page.locator("#agent option[value='assistant']")
    assert option.get_attribute("data-unavailable") == "model not configured"
    assert option.inner_text() == "assistant — model not configured"
    assert page.locator("#agent option[value='echo']").inner_text() == "echo"

    page.select_option("#agent", "assistant")
    page.fill("#text", "is anyone there?")
    page.click("#send")
    reply = page.locator("li.reply[data-status='degraded']")
    reply.wait_for(timeout=WAIT_MS)
    assert reply.locator(".reason").inner_text() == "model not configured"
    assert "unavailable" in reply.locator(".bubble").inner_text()
    done = next(e for e in events(page, stream) if e["kind"] == "reply.done")
    assert done["data"]["detail"] == {"reason": "model_error", "message": "model not configured"}
    save_screenshot(page, "demo-degraded.png")


def test_a_bad_stream_name_is_refused_by_the_browser_itself(
    open_page: OpenPage, unique: Callable[[str], str]
) -> None:
    page = open_page(unique("names"), client=unique("nia"))
    field = page.locator("#stream-name")
    # The pattern compiles (under the `v` flag): the browser validates the field.
    field.fill("no spaces/here")
    assert field.evaluate("input => input.validity.patternMismatch") is True
    field.fill("support:room/42+a=b@c-d_e.f")
    assert field.evaluate("input => input.validity.valid") is True


def test_a_reply_in_progress_is_shown_from_its_snapshot_then_its_live_pieces(
    browser: Any, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    """The page subscribes with `compact: true`: joining while a reply streams, it gets the
    reply so far as one `reply.snapshot` and shows it, then appends the live pieces. The
    socket is played by the test, which is how the snapshot comes at a chosen moment."""
    stream = unique("hydrate")
    sockets: list[Any] = []
    subscribes: list[dict[str, Any]] = []
    errors: list[str] = []
    message, _, _, _, _, _, done = scripted_run(stream, "m1", "hi")
    done = {**done, "seq": 6, "id": "e6", "data": {**done["data"], "text": "lorem ipsum dolor"}}
    snapshot = {
        **done,
        "seq": 4,
        "id": "snapshot:e4",
        "kind": "reply.snapshot",
        "data": {"run": "r1", "offset": 0, "text": "lorem ipsum "},
    }
    live = {
        **snapshot,
        "seq": 5,
        "id": "e5",
        "kind": "reply.delta",
        "data": {"run": "r1", "offset": 12, "text": "dolor"},
    }

    def play_gateway(ws: Any) -> None:
        sockets.append(ws)
        ws.send(json.dumps(scripted_welcome()))

        def on_message(raw: str | bytes) -> None:
            frame = json.loads(raw)
            if frame["type"] == "subscribe":
                subscribes.append(frame)
                answer = {"type": "subscribed", "stream": stream, "head": 4, "recovered": True}
                ws.send(json.dumps(answer))
                ws.send(json.dumps(message))
                ws.send(json.dumps(snapshot))  # seqs 2..4 were the reply's deltas
            elif frame["type"] == "presence":
                ws.send(json.dumps({"type": "presence", "stream": stream, "clients": []}))
            elif frame["type"] == "ping":
                ws.send(json.dumps({"type": "pong"}))

        ws.on_message(on_message)

    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route_web_socket(lambda url: "/ws/v1/" in url, play_gateway)
        page.goto(f"{demo_cluster.base_url}/demo/?{urlencode({'stream': stream})}")
        page.wait_for_selector("body[data-subscribed='true']", timeout=WAIT_MS)
        [ws] = sockets
        assert subscribes[0]["since"] == 0 and subscribes[0]["compact"] is True
        page.wait_for_selector(
            "li.reply[data-hydrated='true'] .bubble:text-is('lorem ipsum ')", timeout=WAIT_MS
        )
        ws.send(json.dumps(live))
        ws.send(json.dumps(done))
        page.wait_for_selector("li.reply[data-status='ok']", timeout=WAIT_MS)
        assert page.locator("li.reply .bubble").inner_text() == "lorem ipsum dolor"
        assert debug(page, f"d.seqs[{stream!r}]") == [1, 5, 6]
        assert "in order" in page.inner_text("#seq-check")
        assert errors == []
    finally:
        context.close()


def scripted_tool_run(stream: str, message_id: str, text: str) -> list[dict[str, Any]]:
    """The message and a run that calls two tools (one fails) before it answers."""
    *_, done = scripted_run(stream, message_id, text)

    def like(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        return {**done, "seq": seq, "id": f"e{seq}", "kind": kind, "data": {"run": "r1", **data}}

    call = {"name": "weather", "step": 0}
    return [
        scripted_run(stream, message_id, text)[0],
        like(2, "reply.delta", {"offset": 0, "text": "Let me check. "}),
        like(3, "tool.call", {**call, "call": "c1", "arguments": {"city": "Oslo"}}),
        like(4, "tool.result", {**call, "call": "c1", "ok": True, "text": "4°C, rain"}),
        like(5, "tool.call", {**call, "call": "c2", "arguments": None}),
        like(
            6,
            "tool.result",
            {
                **call,
                "call": "c2",
                "ok": False,
                "error": "bad_arguments",
                "text": "<b>not JSON</b>",
            },
        ),
        like(7, "reply.delta", {"offset": 14, "text": "Rain in Oslo."}),
        like(
            8,
            "reply.done",
            {
                "status": "ok",
                "text": "Let me check. Rain in Oslo.",
                "detail": {"tools": ["weather"]},
            },
        ),
    ]


def test_tool_calls_and_their_results_are_shown_in_the_reply(
    browser: Any, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    """tool.call/tool.result events render as a list in the reply, each call with its
    arguments and result (as text, never markup), a failed one marked; the reply's text is
    the deltas' alone. The socket is played by the test, as for the restart above."""
    stream = unique("tools")
    errors: list[str] = []
    sockets: list[Any] = []

    def play_gateway(ws: Any) -> None:
        sockets.append(ws)
        ws.send(json.dumps(scripted_welcome()))

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            kind = frame["type"]
            if kind == "subscribe":
                answer = {"type": "subscribed", "stream": frame["stream"], "head": 0}
                ws.send(json.dumps({**answer, "recovered": True}))
            elif kind == "presence":
                ws.send(json.dumps({"type": "presence", "stream": frame["stream"], "clients": []}))
            elif kind == "ping":
                ws.send(json.dumps({"type": "pong"}))
            elif kind == "send":
                ack = {"type": "ack", "id": frame["id"], "event_id": "e1", "seq": 1}
                ws.send(json.dumps({**ack, "duplicate": False}))
                for event in scripted_tool_run(stream, frame["id"], frame["text"]):
                    ws.send(json.dumps(event))

        ws.on_message(on_message)

    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route_web_socket(lambda url: "/ws/v1/" in url, play_gateway)
        page.goto(f"{demo_cluster.base_url}/demo/?{urlencode({'stream': stream})}")
        page.wait_for_selector("body[data-subscribed='true']", timeout=WAIT_MS)
        send(page, "weather?")
        page.wait_for_selector("li.reply[data-status='ok']", timeout=WAIT_MS)
        tools = page.locator("li.reply li.tool")
        assert tools.count() == 2
        assert [tools.nth(i).get_attribute("data-state") for i in range(2)] == ["ok", "error"]
        assert tools.nth(0).inner_text() == 'tool weather({"city":"Oslo"}) → 4°C, rain'
        assert "bad_arguments: <b>not JSON</b>" in tools.nth(1).inner_text()
        assert page.locator("li.reply li.tool b").count() == 0, "results are text, not markup"
        assert page.locator("li.reply .bubble").inner_text() == "Let me check. Rain in Oslo."
        assert_each_seq_once_in_order(page, stream)
        save_screenshot(page, "demo-tool-calls.png")
        assert errors == []
    finally:
        context.close()
