// WebSocket load generator for Switchboard's benchmarks, driven by bench/common.py.
//
// Why Node: a Python asyncio client spends most of a core at a few thousand frames a
// second, and on a small machine that CPU is taken from the server being measured. The
// `ws` client costs a small fraction of that, so the figures describe the server.
//
// Protocol: one JSON command per line on stdin, one JSON reply per line on stdout
// ({"ok": true, "result": ...} or {"ok": false, "error": "..."}); diagnostics go to stderr.
// Sockets live in named groups ("subs", "pub", "load", ...). Timestamps are milliseconds of
// CLOCK_MONOTONIC (process.hrtime), the same clock in every process of the machine, so the
// driver can compare times taken by several load-generator processes.

import { createInterface } from "node:readline";
import WebSocket from "ws";

const now = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const groups = new Map(); // name -> Conn[]
const closeCodes = {}; // close code -> count, for sockets that closed after opening

function bump(counter, key, by = 1) {
  counter[key] = (counter[key] || 0) + by;
}

class Conn {
  constructor(name, ws) {
    this.name = name;
    this.ws = ws;
    this.closed = false;
    this.closing = false; // we asked for the close: not counted as a server close
    this.handler = null; // (conn, data, t) => void, set by the phase that listens
    this.marker = null; // Buffer: the first frame containing it stamps markTime
    this.markTime = null;
    this.onClosed = null;
  }

  deliver(data) {
    const t = now();
    if (this.marker !== null && this.markTime === null && data.indexOf(this.marker) !== -1) {
      this.markTime = t;
    }
    if (this.handler !== null) this.handler(this, data, t);
  }

  closedWith(code) {
    this.closed = true;
    if (!this.closing) bump(closeCodes, code);
    if (this.onClosed !== null) this.onClosed(this, code);
  }
}

function shortReason(error) {
  const text = error.code || error.message || String(error);
  return text.length > 80 ? text.slice(0, 80) : text;
}

// Open one socket; resolves once it is usable: "open" (handshake done) or "welcome"
// (the first frame is the gateway's welcome, i.e. the token was accepted).
function openOne(url, name, expect, timeoutMs) {
  const t0 = now();
  return new Promise((resolve) => {
    let settled = false;
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: timeoutMs });
    const conn = new Conn(name, ws);
    const finish = (ok, reason) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (!ok) {
        conn.closing = true; // never opened: its close is not a server close
        if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
      }
      resolve({ ok, conn, reason, t0, t1: now() });
    };
    const timer = setTimeout(() => finish(false, "timeout"), timeoutMs);
    ws.on("open", () => {
      if (expect === "open") finish(true);
    });
    ws.on("message", (data) => {
      if (!settled) {
        const text = data.toString();
        if (text.includes('"type":"welcome"')) finish(true);
        else finish(false, "first frame was not welcome");
        return;
      }
      conn.deliver(data);
    });
    ws.on("error", (error) => finish(false, shortReason(error)));
    ws.on("close", (code) => {
      if (!settled) finish(false, `close ${code}`);
      else conn.closedWith(code);
    });
  });
}

// Run `task(i)` for i in [0, count) with at most `concurrency` in flight.
async function pool(count, concurrency, task) {
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      await task(i);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, worker));
}

function group(name) {
  const conns = groups.get(name);
  if (!conns) throw new Error(`no group ${name}`);
  return conns;
}

const commands = {
  // Open sockets into a group; reports handshake latencies and the span they took.
  async open({ group: name, urls, names, expect = "open", concurrency = 200, timeout_ms = 30000 }) {
    const conns = groups.get(name) || [];
    groups.set(name, conns);
    const latencies = [];
    const errors = {};
    let first = Infinity;
    let last = -Infinity;
    const cpu0 = process.cpuUsage();
    await pool(urls.length, concurrency, async (i) => {
      const r = await openOne(urls[i], names ? names[i] : String(i), expect, timeout_ms);
      first = Math.min(first, r.t0);
      if (r.ok) {
        conns.push(r.conn);
        latencies.push(r.t1 - r.t0);
        last = Math.max(last, r.t1);
      } else {
        bump(errors, r.reason);
      }
    });
    const cpu = process.cpuUsage(cpu0);
    return { opened: latencies.length, failed: urls.length - latencies.length, errors,
      latencies_ms: latencies, first_start: Number.isFinite(first) ? first : null,
      last_done: Number.isFinite(last) ? last : null, cpu_s: (cpu.user + cpu.system) / 1e6 };
  },

  // Every socket of the group subscribes (to `stream`, or to `prefix + its name`, or with
  // `group_by` N to `prefix + floor(its name / N)`: N consecutive sockets share a stream)
  // and waits for "subscribed".
  async subscribe({ group: name, stream = null, prefix = "", group_by = 0, concurrency = 200,
    timeout_ms = 30000 }) {
    const conns = group(name);
    const errors = {};
    let ok = 0;
    await pool(conns.length, concurrency, (i) => new Promise((resolve) => {
      const conn = conns[i];
      const target = stream ?? prefix + (group_by > 0 ? Math.floor(Number(conn.name) / group_by) : conn.name);
      const timer = setTimeout(() => { bump(errors, "timeout"); done(); }, timeout_ms);
      const done = () => { clearTimeout(timer); conn.handler = null; resolve(); };
      conn.handler = (c, data) => {
        const text = data.toString();
        if (text.includes('"type":"subscribed"')) { ok++; done(); }
        else if (text.includes('"type":"error"')) { bump(errors, text.slice(0, 120)); done(); }
      };
      conn.ws.send(JSON.stringify({ type: "subscribe", stream: target }));
    }));
    return { subscribed: ok, errors };
  },

  // The next frame containing `marker` stamps each socket of the group with its arrival time.
  async arm({ group: name, marker }) {
    const buffer = Buffer.from(marker);
    for (const conn of group(name)) {
      conn.marker = buffer;
      conn.markTime = null;
    }
    return { armed: group(name).length };
  },

  // Send one frame on one socket; returns the monotonic time just before sending.
  async fire({ group: name, index = 0, text }) {
    const conn = group(name)[index];
    const t = now();
    conn.ws.send(text);
    return { t };
  },

  // Wait until every armed socket saw its marker (or the timeout); return arrival times.
  async collect({ group: name, timeout_ms = 60000 }) {
    const conns = group(name);
    const deadline = now() + timeout_ms;
    const pending = () => conns.filter((c) => c.markTime === null && !c.closed).length;
    while (pending() > 0 && now() < deadline) await sleep(pending() > 100 ? 20 : 5);
    const times = [];
    let missing = 0;
    for (const conn of conns) {
      if (conn.markTime === null) missing++;
      else times.push(conn.markTime);
      conn.marker = null;
    }
    return { times, missing };
  },

  // Open-loop load: `rate` frames per second in total, round-robin over the group's sockets
  // (so each socket sends at rate/N, staggered), for `seconds`. Latency is measured from the
  // moment each frame is handed to the socket. mode "switchboard": `send` frames, ack and
  // reply.done matched by id; mode "publish": `publish` frames, done at their ack; mode
  // "reply": baseline frames, the first frame carrying the id is the reply. Frames sent in
  // the first `warmup` seconds are not measured. `deltas` counts the reply.delta events and
  // `events` every event frame the group received meanwhile. With `max_pending`, a frame
  // due while that many are unanswered is skipped (counted in `skipped`): the offered rate
  // is then capped by the answers, a closed loop that measures capacity without collapse.
  async load({ group: name, mode, rate, seconds, warmup = 0, drain = 10, id_prefix = "m",
    stream_prefix = "e2e-", text = "hello", agent = "echo", options = {}, max_pending = 0 }) {
    const conns = group(name).filter((c) => !c.closed);
    if (conns.length === 0) throw new Error("no open sockets to load");
    const pending = new Map(); // id -> {t, conn, measured, ack}
    const ackMs = [];
    const doneMs = [];
    const firstMs = []; // send -> the reply's first reply.delta, measured sends only
    const refusedMs = []; // send -> error frame (a 429, say), measured sends only
    const errors = {};
    const statuses = {};
    let sent = 0;
    let measuredSent = 0;
    let windowDone = 0;
    let lost = 0;
    let maxLag = 0;
    let lateSends = 0; // sends more than 5 ms behind schedule: the client itself was slow
    let deltas = 0;
    let skipped = 0;
    let events = 0;
    const interval = 1000 / rate;
    const total = Math.floor(seconds * rate);
    const start = now() + 20;
    const warmEnd = start + warmup * 1000;
    const end = start + seconds * 1000;

    const finish = (p, t, status) => {
      bump(statuses, status);
      if (p.measured) doneMs.push(t - p.t);
      if (t >= warmEnd && t <= end) windowDone++;
    };
    const handler = (conn, data, t) => {
      let msg;
      try { msg = JSON.parse(data); } catch { bump(errors, "unparsable"); return; }
      if (msg.type === "error") {
        bump(errors, msg.code || "error");
        const p = msg.id != null ? pending.get(msg.id) : undefined;
        if (p) {
          pending.delete(msg.id);
          if (p.measured) refusedMs.push(t - p.t);
        }
        return;
      }
      if (msg.type === "event") {
        events++;
        if (msg.kind === "reply.delta") deltas++;
      }
      if (mode === "publish") {
        if (msg.type === "ack") {
          const p = pending.get(msg.id);
          if (p) {
            pending.delete(msg.id);
            if (p.measured) ackMs.push(t - p.t);
            finish(p, t, "ok");
          }
        }
      } else if (mode === "switchboard") {
        if (msg.type === "ack") {
          const p = pending.get(msg.id);
          if (p && p.ack === null) {
            p.ack = t - p.t;
            if (p.measured) ackMs.push(p.ack);
          }
        } else if (msg.type === "event" && msg.kind === "reply.delta") {
          const p = pending.get(msg.cause && msg.cause.message);
          if (p && p.first === undefined) {
            p.first = t - p.t;
            if (p.measured) firstMs.push(p.first);
          }
        } else if (msg.type === "event" && msg.kind === "reply.done") {
          const id = msg.cause && msg.cause.message;
          const p = pending.get(id);
          if (p) {
            pending.delete(id);
            finish(p, t, msg.data && msg.data.status);
          }
        }
      } else if (msg.id != null) {
        const p = pending.get(msg.id);
        if (p) {
          pending.delete(msg.id);
          finish(p, t, "ok");
        }
      }
    };
    const onClosed = (conn) => {
      for (const [id, p] of pending) {
        if (p.conn === conn) { pending.delete(id); lost++; }
      }
    };
    for (const conn of conns) { conn.handler = handler; conn.onClosed = onClosed; }
    const cpu0 = process.cpuUsage();

    await new Promise((resolve) => {
      let k = 0;
      const tick = () => {
        const t = now();
        const due = Math.min(total, Math.floor((t - start) / interval) + 1);
        while (k < due) {
          const scheduled = start + k * interval;
          const conn = conns[k % conns.length];
          k++;
          if (conn.closed) { bump(errors, "socket_closed"); continue; }
          if (max_pending > 0 && pending.size >= max_pending) { skipped++; continue; }
          const lag = now() - scheduled;
          if (lag > maxLag) maxLag = lag;
          if (lag > 5) lateSends++;
          const id = id_prefix + k;
          const frame = mode === "switchboard"
            ? JSON.stringify({ type: "send", id, stream: stream_prefix + conn.name, agent, text, options })
            : mode === "publish"
              ? JSON.stringify({ type: "publish", id, stream: stream_prefix + conn.name, data: { text } })
              : JSON.stringify({ id, text });
          const measured = scheduled >= warmEnd;
          pending.set(id, { t: now(), conn, measured, ack: null });
          conn.ws.send(frame);
          sent++;
          if (measured) measuredSent++;
        }
        if (k >= total) { resolve(); return; }
        setTimeout(tick, Math.max(0, start + k * interval - now()));
      };
      setTimeout(tick, Math.max(0, start - now()));
    });
    const sendEnd = now();
    const drainUntil = sendEnd + drain * 1000;
    while (pending.size > 0 && now() < drainUntil) await sleep(10);
    const cpu = process.cpuUsage(cpu0);
    const unanswered = pending.size;
    for (const conn of conns) { conn.handler = null; conn.onClosed = null; }
    return {
      sent, measured_sent: measuredSent, window_done: windowDone,
      window_s: (end - warmEnd) / 1000, send_span_s: (sendEnd - start) / 1000,
      ack_ms: ackMs, done_ms: doneMs, first_ms: firstMs, refused_ms: refusedMs, errors, statuses, lost, unanswered,
      max_send_lag_ms: maxLag, late_sends: lateSends, deltas, events, skipped,
      client_cpu_s: (cpu.user + cpu.system) / 1e6,
    };
  },

  // The group's sockets stop reading (or read again): the kernel's receive buffers fill,
  // the server's writes back up, as with a client stuck on a slow network.
  async reading({ group: name, on }) {
    for (const conn of group(name)) {
      if (conn.closed || !conn.ws._socket) continue;
      if (on) conn.ws._socket.resume();
      else conn.ws._socket.pause();
    }
    return { sockets: group(name).length };
  },

  // Close every socket of a group and forget it.
  async close({ group: name, timeout_ms = 10000 }) {
    const conns = groups.get(name) || [];
    groups.delete(name);
    const open = conns.filter((c) => !c.closed);
    const waits = open.map((c) => new Promise((resolve) => {
      c.closing = true;
      c.onClosed = () => resolve();
      c.ws.close(1000);
    }));
    await Promise.race([Promise.all(waits), sleep(timeout_ms)]);
    for (const c of open) if (!c.closed) c.ws.terminate();
    return { closed: open.length };
  },

  // Sockets still open per group, and close codes of sockets the server closed since the
  // last stats (`reset`: start counting afresh).
  async stats({ reset = true } = {}) {
    const open = {};
    for (const [name, conns] of groups) open[name] = conns.filter((c) => !c.closed).length;
    const codes = { ...closeCodes };
    if (reset) for (const code of Object.keys(closeCodes)) delete closeCodes[code];
    const cpu = process.cpuUsage();
    return { open, close_codes: codes, rss: process.memoryUsage().rss,
      cpu_s: (cpu.user + cpu.system) / 1e6 };
  },

  async exit() {
    setImmediate(() => process.exit(0));
    return {};
  },
};

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
let queue = Promise.resolve();
lines.on("line", (line) => {
  // Commands run one at a time, in order; the driver waits for each reply.
  queue = queue.then(async () => {
    let reply;
    try {
      const { cmd, ...params } = JSON.parse(line);
      const handler = commands[cmd];
      if (!handler) throw new Error(`unknown command ${cmd}`);
      reply = { ok: true, result: await handler(params) };
    } catch (error) {
      reply = { ok: false, error: String(error && error.stack ? error.stack : error) };
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
  });
});
lines.on("close", () => process.exit(0));
