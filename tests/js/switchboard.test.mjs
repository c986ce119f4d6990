// Unit tests of the JavaScript client's logic (realtime/static/switchboard/switchboard.js)
// against a scripted fake WebSocket: run with `node --test tests/js/*.test.mjs` (tests/unit/
// test_js_client.py does, so `bin/dev test` runs them). The browser tests
// (tests/browser/) drive the same module in Chromium against a real gateway.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

// Imported from its source as a data: URL, so Node needs no package.json "type": "module".
const source = readFileSync(new URL("../../realtime/static/switchboard/switchboard.js", import.meta.url));
const sb = await import(`data:text/javascript;base64,${source.toString("base64")}`);
const { SwitchboardClient, ReplyAssembler, applyReplyEvent, backoffDelay, withQuery, encodePositions, ClientStopped, SwitchboardError } = sb;

/** The positions a resume URL carries, decoded (null: none). */
function positionsOf(socket) {
  const raw = socket.url.searchParams.get("positions");
  if (raw === null) return null;
  assert.match(raw, /^[A-Za-z0-9_-]*$/, "base64url without padding");
  return JSON.parse(Buffer.from(raw, "base64url").toString("utf8"));
}

/** A WebSocket whose server side the test plays. */
class FakeSocket {
  static sockets = [];
  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.closed = false;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeSocket.sockets.push(this);
  }
  send(text) {
    if (this.closed) return;
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.serverClose(code, reason);
  }
  // --- the server's side ---
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code, reason = "") {
    if (this.closed) return;
    this.closed = true;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
  sentOf(type) {
    return this.sent.filter((frame) => frame.type === type);
  }
}

/** Wait for a condition by letting the event loop turn; fails after `turns` turns. */
async function until(predicate, what, turns = 2000) {
  for (let i = 0; i < turns; i += 1) {
    const value = predicate();
    if (value) return value;
    await new Promise((resolve) => setImmediate(resolve));
  }
  throw new Error(`never happened: ${what}`);
}

function welcome(socket, { session = "s1", resumed = false, client = "alice", heartbeat = 0 } = {}) {
  socket.push({ type: "welcome", client, tenant: "demo", session, resumed, heartbeat_s: heartbeat, limits: {} });
}

function event(stream, seq, kind = "published", extra = {}) {
  return {
    type: "event",
    stream,
    seq,
    id: `e${seq}`,
    kind,
    from: "client:bob",
    cause: { client: "bob", message: `m${seq}`, prev: null },
    ts: "2026-01-01T00:00:00Z",
    data: { n: seq },
    ...extra,
  };
}

/** A client connected to the fake, with no jitter (backoff 0) and no heartbeat. */
async function connected(options = {}) {
  FakeSocket.sockets = [];
  const client = new SwitchboardClient("ws://gateway/ws/v1/", "TOKEN", { WebSocket: FakeSocket, random: () => 0, ...options });
  const started = client.start();
  const socket = await until(() => FakeSocket.sockets[0], "a socket");
  welcome(socket);
  await started;
  return { client, socket };
}

async function subscribed(client, socket, stream, head = 0, handler = null, since = undefined) {
  const events = [];
  const answer = client.subscribe(stream, handler ?? ((e) => events.push(e)), { since });
  const frame = await until(() => socket.sentOf("subscribe").find((f) => f.stream === stream), "subscribe");
  socket.push({ type: "subscribed", stream, head, recovered: frame.since !== undefined && frame.since <= head });
  await answer;
  return events;
}

test("backoff is full jitter below an exponential cap", () => {
  assert.equal(backoffDelay(0, 50, 5000, () => 1), 50);
  assert.equal(backoffDelay(3, 50, 5000, () => 1), 400);
  assert.equal(backoffDelay(20, 50, 5000, () => 1), 5000);
  assert.equal(backoffDelay(5, 50, 5000, () => 0), 0);
});

test("withQuery adds parameters, leaving out null ones", () => {
  assert.equal(withQuery("ws://h/ws/v1/", { token: "a.b", session: null }), "ws://h/ws/v1/?token=a.b");
  assert.equal(withQuery("ws://h/ws/v1/?x=1", { token: "t", session: "s/+" }), "ws://h/ws/v1/?x=1&token=t&session=s%2F%2B");
});

test("positions are base64url without padding of the JSON object", () => {
  const encoded = encodePositions({ room: 7, "a/b+c": 12 });
  assert.match(encoded, /^[A-Za-z0-9_-]+$/);
  assert.deepEqual(JSON.parse(Buffer.from(encoded, "base64url").toString("utf8")), { room: 7, "a/b+c": 12 });
  assert.equal(encodePositions({}), "e30");
});

test("a resume sends the last seq delivered on each stream the session holds", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  await subscribed(client, socket, "quiet", 4);
  assert.equal(positionsOf(socket), null, "a first connection has nothing to resume");
  socket.push(event("room", 1));
  socket.push(event("room", 2));
  // Never answered: the session may not hold it, so it is not named.
  client.subscribe("pending", () => {}).catch(() => {});
  await until(() => socket.sentOf("subscribe").find((f) => f.stream === "pending"), "subscribe");
  socket.serverClose(1006);
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  assert.equal(second.url.searchParams.get("session"), "s1");
  assert.deepEqual(positionsOf(second), { room: 2, quiet: 4 });
  welcome(second, { resumed: true });
  // The gateway goes on from the client's positions: seq 3 next, nothing repeated.
  second.push({ type: "subscribed", stream: "room", head: 3, recovered: true });
  second.push({ type: "subscribed", stream: "quiet", head: 4, recovered: true });
  second.push(event("room", 3));
  await until(() => second.sentOf("ping")[0], "the resume's ping");
  second.push({ type: "pong" });
  await until(() => events.length === 3, "seq 3");
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3]);
  assert.equal(client.duplicatesDropped, 0);
  await client.close();
});

test("refused positions are dropped with the session, and streams subscribed from their last seq", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  socket.push(event("room", 1));
  socket.serverClose(1006);
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  assert.deepEqual(positionsOf(second), { room: 1 });
  second.push({ type: "error", id: null, code: "bad_request", status: 400, detail: "beyond its head", session: "s1", stream: "room", head: 0 });
  second.serverClose(4003, "beyond its head");
  const third = await until(() => FakeSocket.sockets[2], "a reconnect without the session");
  assert.equal(third.url.searchParams.get("session"), null);
  assert.equal(positionsOf(third), null);
  welcome(third, { session: "s2" });
  const again = await until(() => third.sentOf("subscribe")[0], "a subscribe");
  assert.deepEqual(again, { type: "subscribe", stream: "room", since: 1 });
  third.push({ type: "subscribed", stream: "room", head: 1, recovered: true });
  third.serverClose(1006);
  const fourth = await until(() => FakeSocket.sockets[3], "a reconnect with the new session");
  assert.equal(fourth.url.searchParams.get("session"), "s2");
  assert.deepEqual(positionsOf(fourth), { room: 1 });
  assert.equal(events.length, 1);
  await client.close();
});

test("replies are assembled by offset: repeats ignored, missed pieces flagged, done wins", () => {
  const assembler = new ReplyAssembler();
  const piece = (offset, text) => ({ kind: "reply.delta", from: "agent:echo", cause: {}, data: { run: "r1", offset, text } });
  assembler.add(piece(0, "Hel"));
  assembler.add(piece(0, "Hel"));
  const reply = assembler.add(piece(3, "lo"));
  assert.equal(reply.text, "Hello");
  assert.equal(reply.deltas.length, 2);
  assert.equal(reply.agent, "echo");
  assembler.add({ kind: "reply.done", from: "agent:echo", cause: {}, data: { run: "r1", status: "ok", text: "Hello" } });
  assert.equal(reply.status, "ok");
  assert.equal(applyReplyEvent(reply, piece(5, "!")), false, "nothing after done");

  const late = new ReplyAssembler().add(piece(4, "o"));
  assert.equal(late.gap, true);
});

test("events are delivered once and in order; repeats after a resume are dropped", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  socket.push(event("room", 1));
  socket.push(event("room", 2));
  socket.serverClose(1012, "restart");
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  assert.equal(second.url.searchParams.get("session"), "s1");
  assert.equal(second.url.searchParams.get("token"), "TOKEN");
  welcome(second, { resumed: true });
  // The gateway crashed with a lagging checkpoint: it restores from seq 1.
  second.push({ type: "subscribed", stream: "room", head: 3, recovered: true });
  second.push(event("room", 1));
  second.push(event("room", 2));
  second.push(event("room", 3));
  const ping = await until(() => second.sentOf("ping")[0], "the resume's ping");
  assert.ok(ping);
  second.push({ type: "pong" });
  await until(() => client.state === "open" && client.reconnects === 1, "open again");
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3]);
  assert.equal(client.duplicatesDropped, 2);
  assert.equal(second.sentOf("subscribe").length, 0, "a restored stream is not subscribed again");
  await client.close();
});

test("a gap seen while resuming resubscribes on the new connection from the last seq", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  socket.push(event("room", 1));
  socket.serverClose(1006);
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  welcome(second, { resumed: true });
  // Seqs 2 and 3 were written to the old socket and lost with it.
  second.push({ type: "subscribed", stream: "room", head: 4, recovered: true });
  second.push(event("room", 4));
  const resubscribe = await until(() => second.sentOf("subscribe")[0], "a subscribe on the new socket");
  assert.deepEqual(resubscribe, { type: "subscribe", stream: "room", since: 1 });
  second.push({ type: "pong" });
  second.push(event("room", 5)); // still from before the subscribe: dropped, it comes again
  second.push({ type: "subscribed", stream: "room", head: 5, recovered: true });
  for (const seq of [2, 3, 4, 5]) second.push(event("room", seq));
  await until(() => events.length === 5, "every event");
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3, 4, 5]);
  await client.close();
});

test("a refused session is dropped and each stream subscribed again from its last seq", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  socket.push(event("room", 1));
  socket.serverClose(1006);
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  second.push({ type: "error", id: null, code: "not_found", status: 404, detail: "no such session", session: "s1" });
  second.serverClose(4003, "no such session");
  const third = await until(() => FakeSocket.sockets[2], "a reconnect without the session");
  assert.equal(third.url.searchParams.get("session"), null);
  welcome(third, { session: "s2" });
  const again = await until(() => third.sentOf("subscribe")[0], "a subscribe");
  assert.deepEqual(again, { type: "subscribe", stream: "room", since: 1 });
  third.push({ type: "subscribed", stream: "room", head: 2, recovered: true });
  third.push(event("room", 2));
  await until(() => events.length === 2, "seq 2");
  assert.equal(client.refusedSessions.length, 1);
  assert.equal(client.session, "s2");
  await client.close();
});

test("history_expired goes on from the head", async () => {
  const { client, socket } = await connected();
  const expired = [];
  client.on("expired", (frame) => expired.push(frame));
  const events = [];
  const answer = client.subscribe("room", (e) => events.push(e), { since: 5 });
  await until(() => socket.sentOf("subscribe")[0], "subscribe");
  socket.push({ type: "error", id: null, code: "history_expired", status: 410, detail: "gone", stream: "room", head: 100 });
  socket.push({ type: "subscribed", stream: "room", head: 100, recovered: false });
  const frame = await answer;
  assert.equal(frame.history_expired.head, 100);
  socket.push(event("room", 101));
  assert.deepEqual(events.map((e) => e.seq), [101]);
  assert.equal(expired.length, 1);
  await client.close();
});

test("a 429 is retried with the same id after retry_after_ms", async () => {
  const { client, socket } = await connected();
  const retries = [];
  client.on("retry", (info) => retries.push(info));
  const acked = client.publish("room", { text: "hi" });
  const first = await until(() => socket.sentOf("publish")[0], "publish");
  socket.push({ type: "error", id: first.id, code: "rate_limited", status: 429, detail: "slow down", retry_after_ms: 5 });
  const second = await until(() => socket.sentOf("publish")[1], "the retry");
  assert.equal(second.id, first.id);
  socket.push({ type: "ack", id: first.id, event_id: "e1", seq: 1, duplicate: false });
  assert.equal((await acked).seq, 1);
  assert.equal(retries.length, 1);
  assert.equal(retries[0].retryAfterMs, 5);
  assert.ok(retries[0].delayMs >= 5, "never sooner than the server asked");
  await client.close();
});

test("other errors are not retried", async () => {
  const { client, socket } = await connected();
  const acked = client.publish("room", 1);
  const frame = await until(() => socket.sentOf("publish")[0], "publish");
  socket.push({ type: "error", id: frame.id, code: "forbidden", status: 403, detail: "no" });
  await assert.rejects(acked, (error) => error instanceof SwitchboardError && error.code === "forbidden");
  await client.close();
});

test("a send is retried on the next connection with the same id, and its reply assembled", async () => {
  const { client, socket } = await connected();
  await subscribed(client, socket, "room");
  const pieces = [];
  const acked = client.send("room", "echo", "Hello", { onDelta: (_, text) => pieces.push(text) });
  const first = await until(() => socket.sentOf("send")[0], "send");
  socket.serverClose(1006); // the ack never came
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  welcome(second, { resumed: true });
  second.push({ type: "subscribed", stream: "room", head: 0, recovered: true });
  await until(() => second.sentOf("ping")[0], "ping");
  second.push({ type: "pong" });
  const again = await until(() => second.sentOf("send")[0], "the send again");
  assert.equal(again.id, first.id);
  second.push({ type: "ack", id: first.id, event_id: "e1", seq: 1, duplicate: true });
  const ack = await acked;
  const cause = { client: "alice", message: first.id, prev: "e1" };
  const mine = (seq, kind, data) => ({ ...event("room", seq, kind), from: "agent:echo", cause, data });
  second.push({ ...event("room", 1, "message"), from: "client:alice", cause: { client: "alice", message: first.id, prev: null } });
  second.push(mine(2, "reply.delta", { run: "r1", offset: 0, text: "Hel" }));
  // Another agent's run started by this reply keeps the cause's client, with a depth.
  second.push({ ...mine(3, "reply.delta", { run: "r2", offset: 0, text: "Summary" }), cause: { ...cause, depth: 1 } });
  second.push(mine(4, "reply.delta", { run: "r1", offset: 3, text: "lo" }));
  second.push(mine(5, "reply.done", { run: "r1", status: "ok", text: "Hello", detail: null }));
  const reply = await client.reply(ack.id);
  assert.equal(reply.text, "Hello");
  assert.equal(reply.status, "ok");
  assert.deepEqual(pieces, ["Hel", "Hello"]);
  await client.close();
});

test("state changes: connecting, open, reconnecting, open; 4001 ends the client", async () => {
  FakeSocket.sockets = [];
  const states = [];
  const client = new SwitchboardClient("ws://gateway/ws/v1/", () => "FRESH", {
    WebSocket: FakeSocket,
    random: () => 0,
    onState: (change) => states.push(change.state),
  });
  const started = client.start();
  const socket = await until(() => FakeSocket.sockets[0], "a socket");
  assert.equal(socket.url.searchParams.get("token"), "FRESH", "a token function is called");
  welcome(socket);
  await started;
  socket.serverClose(1012, "restart");
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  welcome(second, { resumed: true });
  await until(() => second.sentOf("ping")[0], "ping");
  second.push({ type: "pong" });
  await until(() => client.reconnects === 1 && client.state === "open", "open again");
  second.serverClose(4001, "token expired");
  await until(() => client.state === "closed", "closed");
  assert.deepEqual(states, ["connecting", "open", "reconnecting", "open", "closed"]);
  await assert.rejects(client.waitOpen(10), ClientStopped);
  assert.deepEqual(client.closeCodes, [1012, 4001]);
});

test("drop() takes the connection for lost at once and the client resumes", async () => {
  const { client, socket } = await connected();
  const events = await subscribed(client, socket, "room");
  socket.push(event("room", 1));
  client.drop();
  assert.equal(socket.closed, true);
  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  assert.equal(second.url.searchParams.get("session"), "s1");
  welcome(second, { resumed: true });
  second.push({ type: "subscribed", stream: "room", head: 2, recovered: true });
  second.push(event("room", 2));
  await until(() => second.sentOf("ping")[0], "ping");
  second.push({ type: "pong" });
  await until(() => events.length === 2, "seq 2");
  assert.equal(client.closeCodes[0], 4000);
  await client.close();
});

test("watchPresence keeps a snapshot up to date with join and leave", async () => {
  const { client, socket } = await connected();
  await subscribed(client, socket, "room");
  const seen = [];
  client.watchPresence("room", (members) => seen.push(members.map((m) => m.client)));
  await until(() => socket.sentOf("presence")[0], "presence");
  socket.push({ type: "presence", stream: "room", clients: [{ client: "alice", name: null }] });
  await until(() => seen.length === 1, "snapshot");
  socket.push({ ...event("room", undefined, "join"), seq: undefined, data: { client: "bob", name: "Bob" } });
  socket.push({ ...event("room", undefined, "leave"), seq: undefined, data: { client: "alice", name: null } });
  assert.deepEqual(seen, [["alice"], ["alice", "bob"], ["bob"]]);
  await client.close();
});

test("receipts are coalesced per stream and only move forward", async () => {
  const { client, socket } = await connected({ receiptDelayMs: 0 });
  client.receipt("room", 3);
  client.receipt("room", 5);
  client.receipt("room", 4);
  await until(() => socket.sentOf("receipt").length >= 1, "a receipt");
  assert.deepEqual(socket.sentOf("receipt"), [{ type: "receipt", stream: "room", seq: 5 }]);
  await client.close();
});

// --- reply.restart: the run's text so far is void; the reply starts again at offset 0 ---------

/** Events of run r1 answering alice's message m1, with seqs. */
function runEvent(seq, kind, data) {
  return { ...event("room", seq, kind), from: "agent:echo", cause: { client: "alice", message: "m1", prev: "e1" }, data: { run: "r1", ...data } };
}
const delta = (seq, offset, text) => runEvent(seq, "reply.delta", { offset, text });
const restart = (seq, attempt = 2) => runEvent(seq, "reply.restart", { attempt, reason: "model_error" });
const finished = (seq, text) => runEvent(seq, "reply.done", { status: "ok", text, detail: null });

test("a restart mid-reply voids the text so far; the pieces after it start again at 0", () => {
  const assembler = new ReplyAssembler();
  assembler.add(delta(2, 0, "lorem "));
  assembler.add(delta(3, 6, "lo"));
  const reply = assembler.add(restart(4));
  assert.equal(reply.text, "");
  assert.deepEqual(reply.deltas, []);
  assert.equal(reply.restarts, 1);
  assert.equal(reply.attempt, 2);
  assembler.add(delta(5, 0, "ipsum "));
  assembler.add(delta(6, 6, "dolor"));
  assert.equal(reply.text, "ipsum dolor", "never a splice: no 'lorem loipsum'");
  assert.equal(reply.gap, false);
  assert.deepEqual(reply.deltas.map((d) => d.seq), [5, 6]);
  assembler.add(finished(7, "ipsum dolor"));
  assert.equal(reply.text, "ipsum dolor");
  assert.equal(reply.status, "ok");
});

test("a restart delivered twice does not void the pieces that followed it", () => {
  const reply = new ReplyAssembler().add(delta(2, 0, "lorem "));
  for (const e of [restart(4), delta(5, 0, "ipsum ")]) applyReplyEvent(reply, e);
  // A resume from a lagging checkpoint repeats seqs 4 and 5.
  assert.equal(applyReplyEvent(reply, restart(4)), false);
  assert.equal(applyReplyEvent(reply, delta(5, 0, "ipsum ")), false);
  applyReplyEvent(reply, delta(6, 6, "dolor"));
  assert.equal(reply.text, "ipsum dolor");
  assert.equal(reply.restarts, 1);
  // Restarts in a row, and one before any piece of its attempt, are fine too.
  for (const e of [restart(7, 3), restart(8, 4), delta(9, 0, "b"), finished(10, "b")]) applyReplyEvent(reply, e);
  assert.equal(reply.text, "b");
  assert.equal(reply.restarts, 3);
  assert.equal(reply.attempt, 4);
});

test("a restart caught up after a reconnect: the reply is the final text, callbacks in order", async () => {
  const { client, socket } = await connected();
  const seen = await subscribed(client, socket, "room");
  const pieces = [];
  const restarts = [];
  const acked = client.send("room", "echo", "hi", {
    id: "m1",
    onDelta: (_, text) => pieces.push(text),
    onRestart: (e, reply) => restarts.push([e.data.attempt, reply.text]),
  });
  await until(() => socket.sentOf("send")[0], "send");
  socket.push({ type: "ack", id: "m1", event_id: "e1", seq: 1, duplicate: false });
  await acked;
  socket.push({ ...event("room", 1, "message"), from: "client:alice", cause: { client: "alice", message: "m1", prev: null } });
  socket.push(delta(2, 0, "lorem "));
  socket.push(delta(3, 6, "lo"));
  assert.equal(client.replySoFar("m1").text, "lorem lo");
  socket.serverClose(1006);

  const second = await until(() => FakeSocket.sockets[1], "a reconnect");
  welcome(second, { resumed: true });
  // A lagging checkpoint: the resume repeats seq 3, then what the client missed.
  second.push({ type: "subscribed", stream: "room", head: 7, recovered: true });
  for (const e of [delta(3, 6, "lo"), restart(4), delta(5, 0, "ipsum "), restart(4), delta(6, 6, "dolor"), finished(7, "ipsum dolor")]) {
    second.push(e);
  }
  await until(() => second.sentOf("ping")[0], "ping");
  second.push({ type: "pong" });
  const reply = await client.reply("m1");
  assert.equal(reply.text, "ipsum dolor");
  assert.equal(reply.restarts, 1);
  assert.deepEqual(reply.deltas.map((d) => d.data.text), ["ipsum ", "dolor"]);
  assert.deepEqual(pieces, ["lorem ", "lorem lo", "ipsum ", "ipsum dolor"]);
  assert.deepEqual(restarts, [[2, ""]]);
  assert.deepEqual(seen.map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7], "the application sees the restart once");
  await client.close();
});

// --- tool calls: tool.call/tool.result paired in reply.tools; a restart voids its step's ---------

const toolCall = (seq, call, step, args) => runEvent(seq, "tool.call", { call, name: "lookup", arguments: args, step });
const toolResult = (seq, call, step, extra) => runEvent(seq, "tool.result", { call, name: "lookup", step, ...extra });

test("tool calls are paired with their results, and a restart drops its step's and later ones", () => {
  const assembler = new ReplyAssembler();
  assembler.add(toolCall(2, "c0", 0, {}));
  assembler.add(toolResult(3, "c0", 0, { ok: true, text: "billing" }));
  const reply = assembler.add(toolCall(4, "c1", 1, { key: "a" }));
  assert.equal(reply.tools.length, 2);
  assert.equal(reply.tools[1].ok, null, "no result yet");
  applyReplyEvent(reply, runEvent(5, "reply.restart", { attempt: 2, reason: "retry", step: 1 }));
  assert.deepEqual(reply.tools.map((t) => t.call), ["c0"], "step 0's call stands");
  applyReplyEvent(reply, toolCall(6, "c1", 1, { key: "b" }));
  applyReplyEvent(reply, toolResult(7, "c1", 1, { ok: false, error: "timeout", text: "late", truncated: false }));
  // Joined mid-run: a result without its call still shows.
  applyReplyEvent(reply, toolResult(8, "c9", 1, { ok: true, text: "x" }));
  assert.deepEqual(
    reply.tools.map((t) => [t.call, t.ok, t.error, t.arguments]),
    [["c0", true, null, {}], ["c1", false, "timeout", { key: "b" }], ["c9", true, null, null]],
  );
  assert.equal(reply.text, "", "tool events are not text");
  // A repeat (a resume from a lagging checkpoint) changes nothing.
  assert.equal(applyReplyEvent(reply, toolResult(8, "c9", 1, { ok: false })), false);
  // A restart that names no step (an older server) drops every call.
  applyReplyEvent(reply, runEvent(9, "reply.restart", { attempt: 3, reason: "retry" }));
  assert.deepEqual(reply.tools, []);
});

test("a send's onTool sees each tool event, and the reply carries the calls", async () => {
  const { client, socket } = await connected();
  await subscribed(client, socket, "room");
  const seen = [];
  const acked = client.send("room", "agent", "hi", {
    id: "m1",
    onTool: (e, reply) => seen.push([e.kind, reply.tools.length]),
  });
  await until(() => socket.sentOf("send")[0], "send");
  socket.push({ type: "ack", id: "m1", event_id: "e1", seq: 1, duplicate: false });
  await acked;
  socket.push({ ...event("room", 1, "message"), from: "client:alice", cause: { client: "alice", message: "m1", prev: null } });
  for (const e of [toolCall(2, "c0", 0, { key: "a" }), toolResult(3, "c0", 0, { ok: true, text: "v" }), delta(4, 0, "answer"), runEvent(5, "reply.done", { status: "ok", text: "answer", detail: { tools: ["lookup"] } })]) {
    socket.push(e);
  }
  const reply = await client.reply("m1");
  assert.deepEqual(seen, [["tool.call", 1], ["tool.result", 1]]);
  assert.equal(reply.text, "answer");
  assert.deepEqual(reply.tools.map((t) => [t.call, t.ok, t.text]), [["c0", true, "v"]]);
  await client.close();
});

// --- reply.snapshot: a compact catch-up's text so far, from its offset -------------------------

const snapshot = (seq, offset, text) => ({ ...runEvent(seq, "reply.snapshot", { offset, text }), id: `snapshot:e${seq}` });

test("a snapshot then the live deltas make the final text", () => {
  const assembler = new ReplyAssembler();
  const reply = assembler.add(snapshot(4, 0, "lorem ipsum "));
  assert.equal(reply.text, "lorem ipsum ");
  assert.equal(reply.gap, false);
  assembler.add(delta(6, 12, "dolor"));
  assert.equal(reply.text, "lorem ipsum dolor");
  assembler.add(finished(7, "lorem ipsum dolor"));
  assert.equal(reply.status, "ok");
});

test("a snapshot from a resume position continues the text; from 0 it replaces a voided attempt", () => {
  const resumed = new ReplyAssembler();
  resumed.add(delta(2, 0, "lorem "));
  const reply = resumed.add(snapshot(5, 6, "ipsum "));
  assert.equal(reply.text, "lorem ipsum ");
  resumed.add(delta(6, 12, "dolor"));
  assert.equal(reply.text, "lorem ipsum dolor");

  const restarted = new ReplyAssembler();
  restarted.add(delta(2, 0, "lorem "));
  restarted.add(delta(3, 6, "lo"));
  const again = restarted.add(snapshot(5, 0, "ipsum "));
  assert.equal(again.text, "ipsum ", "never a splice");
  assert.deepEqual(again.deltas.map((d) => d.kind), ["reply.snapshot"]);
});

test("a compact subscribe: folded seqs are no gap, a snapshot below the last seq is delivered", async () => {
  const { client, socket } = await connected();
  const events = [];
  const answer = client.subscribe("room", (e) => events.push(e), { since: 0, compact: true });
  const frame = await until(() => socket.sentOf("subscribe")[0], "subscribe");
  assert.deepEqual(frame, { type: "subscribe", stream: "room", since: 0, compact: true });
  socket.push({ type: "subscribed", stream: "room", head: 9, recovered: true });
  await answer;
  socket.push(event("room", 1, "message"));
  // r1's deltas were seqs 2..8; another run's reply.done is 9; then r1's snapshot (seq 8).
  socket.push({ ...finished(9, "other"), data: { run: "r2", status: "ok", text: "other" } });
  socket.push(snapshot(8, 0, "lorem ipsum "));
  socket.push(delta(10, 12, "dolor"));
  await until(() => events.length === 4, "four events");
  assert.deepEqual(events.map((e) => [e.seq, e.kind]), [
    [1, "message"],
    [9, "reply.done"],
    [8, "reply.snapshot"],
    [10, "reply.delta"],
  ]);
  assert.equal(socket.sentOf("subscribe").length, 1, "no resync");
  assert.equal(client.lastSeq("room"), 10);
  const assembler = new ReplyAssembler();
  for (const e of events.slice(2)) assembler.add(e);
  assert.equal(assembler.get("r1").text, "lorem ipsum dolor");
  await client.close();
});
