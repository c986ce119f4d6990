// Artillery processor for Switchboard (scenario: switchboard.yml). Each virtual user is one
// client: it gets a token of its own, opens a WebSocket, sends `messages` messages to
// `agent` one after another and waits for each one's reply.done, then closes.
//
// Why a function step and not Artillery's stock `ws` engine: that engine counts a session
// as completed when the server refused it (a 4029 close after the per-client cap) and its
// `match` expects one answer per frame sent, where a send is answered by an ack, then the
// run's events (message, reply.delta..., reply.done). Here every frame is read and
// counted for what it is.
//
// What it reports (Artillery's summary and its JSON report):
//   histograms switchboard.ack_ms          send -> ack
//              switchboard.reply_done_ms   send -> the run's reply.done
//              switchboard.connect_ms      socket open -> welcome
//   counters   switchboard.sent, .acked, .reply_done.<status> (ok, degraded, failed, cancelled)
//              switchboard.refused.<code>  error frames answering a send (rate_limited,
//                                          overloaded, forbidden, ...)
//              switchboard.close.<code>    close codes the server ended a session with
//                                          (4029: over a connection cap; 4001: bad token;
//                                          1012: gateway restarting; 4008: too slow a reader)
//              switchboard.timeout         replies not done within `reply_timeout_ms`
//
// Tokens: with SWITCHBOARD_SIGNING_SECRET (the tenant's signing secret) and
// SWITCHBOARD_TENANT set, each user's token is signed here (HS256, as manage.py
// issue_token does); otherwise it asks the gateway's /demo/token, which `bin/dev start`
// serves for its demo tenant.

"use strict";

const crypto = require("node:crypto");

const CLOSE_NORMAL = 1000;

function base64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT with the claims the gateway reads: sub (client), tnt (tenant), exp. */
function signToken(secret, tenant, client, ttlSeconds) {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = { sub: client, tnt: tenant, exp: Math.floor(Date.now() / 1000) + ttlSeconds };
  const body = base64url(JSON.stringify(claims));
  const signature = crypto.createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

async function mintToken(target, client) {
  const secret = process.env.SWITCHBOARD_SIGNING_SECRET;
  const tenant = process.env.SWITCHBOARD_TENANT;
  if (secret && tenant) return signToken(secret, tenant, client, 3600);
  const response = await fetch(new URL("/demo/token", target), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ client }),
  });
  if (!response.ok) {
    throw new Error(`/demo/token answered ${response.status}: set SWITCHBOARD_TENANT and SWITCHBOARD_SIGNING_SECRET for a tenant other than bin/dev start's demo`);
  }
  return (await response.json()).token;
}

function socketUrl(target, token) {
  const url = new URL("/ws/v1/", target);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  return url.toString();
}

function number(value, fallback) {
  const parsed = Number(value);
  return Number.isFinite(parsed) ? parsed : fallback;
}

/**
 * One virtual user's session. Resolves when it is over; rejects when the server refused
 * it before its welcome (a 4029 or 4001 close, a refused handshake), so Artillery counts
 * that user as failed (`vusers.failed`, `errors.refused: close 4029`) besides the
 * switchboard.close.<code> counter.
 */
function session(url, vars, events) {
  const messages = number(vars.messages, 3);
  const thinkMs = number(vars.think_ms, 500);
  const replyTimeoutMs = number(vars.reply_timeout_ms, 30000);
  const options = typeof vars.options === "string" ? JSON.parse(vars.options) : vars.options || {};
  const stream = `${vars.stream_prefix || "artillery"}-${vars.$uuid || crypto.randomUUID()}`.slice(0, 200);

  // Loaded here, not at the top, so the token code can be used without the dependencies.
  const WebSocket = require("ws");
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const opened = Date.now();
    const pending = new Map(); // message id -> {sentAt, run}
    let sentCount = 0;
    let timer = null;
    let finished = false;
    let welcomed = false;

    const finish = (refusal) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      if (refusal && !welcomed) reject(new Error(`refused: ${refusal}`));
      else resolve();
    };

    const sendNext = () => {
      if (sentCount >= messages) {
        ws.close(CLOSE_NORMAL);
        return;
      }
      sentCount += 1;
      const id = crypto.randomUUID().replace(/-/g, "");
      pending.set(id, { sentAt: Date.now(), acked: false });
      ws.send(JSON.stringify({ type: "send", id, stream, agent: vars.agent || "echo", text: `artillery message ${sentCount}`, options }));
      events.emit("counter", "switchboard.sent", 1);
      clearTimeout(timer);
      timer = setTimeout(() => {
        events.emit("counter", "switchboard.timeout", 1);
        pending.delete(id);
        ws.close(CLOSE_NORMAL);
      }, replyTimeoutMs);
    };

    const afterReply = () => setTimeout(sendNext, thinkMs);

    ws.on("message", (raw) => {
      let frame;
      try {
        frame = JSON.parse(raw.toString());
      } catch {
        events.emit("counter", "switchboard.unparsable", 1);
        return;
      }
      if (frame.type === "welcome") {
        welcomed = true;
        events.emit("histogram", "switchboard.connect_ms", Date.now() - opened);
        sendNext();
      } else if (frame.type === "ack") {
        const entry = pending.get(frame.id);
        if (entry && !entry.acked) {
          entry.acked = true;
          events.emit("histogram", "switchboard.ack_ms", Date.now() - entry.sentAt);
          events.emit("counter", "switchboard.acked", 1);
        }
      } else if (frame.type === "error") {
        events.emit("counter", `switchboard.refused.${frame.code || "unknown"}`, 1);
        if (frame.id && pending.delete(frame.id)) {
          // Refused (a 429 included): nothing will follow for it; go on after retry_after_ms.
          clearTimeout(timer);
          setTimeout(sendNext, Math.max(thinkMs, number(frame.retry_after_ms, 0)));
        }
      } else if (frame.type === "event" && frame.kind === "reply.done") {
        // The run's cause names the message it answers.
        const cause = frame.cause || {};
        const entry = pending.get(cause.message);
        if (entry) {
          pending.delete(cause.message);
          clearTimeout(timer);
          events.emit("histogram", "switchboard.reply_done_ms", Date.now() - entry.sentAt);
          events.emit("counter", `switchboard.reply_done.${(frame.data && frame.data.status) || "unknown"}`, 1);
          afterReply();
        }
      }
    });
    ws.on("close", (code) => {
      if (code !== CLOSE_NORMAL) events.emit("counter", `switchboard.close.${code}`, 1);
      finish(code !== CLOSE_NORMAL ? `close ${code}` : null);
    });
    ws.on("error", (error) => {
      // A refused handshake (HTTP 403/5xx) or a network error: counted, not thrown.
      events.emit("counter", `switchboard.socket_error.${error.code || "other"}`, 1);
      finish(error.message);
    });
  });
}

/** The scenario's one step: `- function: "chat"`. */
async function chat(context, events) {
  const target = context.vars.target;
  // One client id per user, unless `client` names one for all (to rehearse the per-client
  // connection cap: past it the gateway closes with 4029).
  const client = context.vars.client || `${context.vars.client_prefix || "artillery"}-${crypto.randomUUID().slice(0, 8)}`;
  let token;
  try {
    token = await mintToken(target, client);
  } catch (error) {
    events.emit("counter", "switchboard.token_failed", 1);
    throw error;
  }
  await session(socketUrl(target, token), context.vars, events);
}

module.exports = { chat, signToken };
