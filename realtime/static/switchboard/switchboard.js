// @ts-check
/**
 * Switchboard's JavaScript client for the wire protocol v1 (docs/protocol.md).
 *
 * One ES module, no build step, no dependencies; the gateway serves it at
 * `/client/switchboard.js`. It has the semantics of the Python `ReconnectingClient`
 * (client/reconnecting.py) over one `SwitchboardClient` connection at a time:
 *
 * - it reconnects after any loss but 4001 and 4003 (a bad or withdrawn token) with
 *   exponential backoff and full jitter, resuming its session (`?session=`) with its own
 *   `positions`: the last seq it delivered on each stream the session holds, so the
 *   gateway goes on from there and not from what it wrote to the old socket;
 * - each stream's events reach the application once, in seq order: a resume that
 *   repeats events is deduplicated by seq, and a jump past the next seq makes the client
 *   subscribe again with `since` = the last seq it delivered, dropping that stream's
 *   events until the server answers;
 * - a refused session (expired, unknown) or refused positions are dropped and every
 *   stream is subscribed again with `since`;
 * - `send` and `publish` are retried across reconnects with the same message id until
 *   acked (the server answers a repeat with `duplicate: true`, so a message is accepted
 *   once); a 429 (`rate_limited`, `overloaded`), `internal` or `unavailable` error is retried after its
 *   `retry_after_ms`, with up to 50% jitter;
 * - replies to this client's own sends are assembled from their `reply.delta` pieces; a
 *   `reply.restart` voids the run's text so far and the reply is assembled again from
 *   offset 0 (a retried model call answered differently, and a reply is never a splice);
 *   the run's tool calls (`tool.call`, `tool.result`) are paired in `reply.tools`.
 *
 * ```js
 * import { SwitchboardClient } from "/client/switchboard.js";
 * const client = await SwitchboardClient.connect("ws://127.0.0.1:8000/ws/v1/", token);
 * await client.subscribe("room", (event) => console.log(event.seq, event.kind, event.data));
 * const ack = await client.send("room", "echo", "hello", { onDelta: (d, text) => show(text) });
 * const reply = await client.reply(ack.id);  // { text, status, deltas, done }
 * ```
 */

/** Closes after which reconnecting cannot help: a new token is needed. */
export const TERMINAL_CLOSE_CODES = new Set([4001, 4003]);
/** Refusals that a later retry with the same id may get past. `internal` is what a frame
 * gets while Redis is away; a retry with the same id cannot apply a message twice. */
export const RETRYABLE_ERRORS = new Set(["rate_limited", "overloaded", "internal", "unavailable"]);
/** The code this client closes a socket with when it drops it itself (`drop()`, a missed
 * heartbeat): not a server close code, so it always leads to a reconnect. */
export const CLOSE_DROPPED = 4000;

/**
 * @typedef {Record<string, any>} Frame
 *
 * @typedef {object} Cause
 * @property {string|null} client  the client whose message began the chain
 * @property {string|null} message  that message's id
 * @property {string|null} prev  the event this one follows
 * @property {number} [depth]  set on runs other agents' replies started
 * @property {string[]} [chain]
 *
 * @typedef {object} StreamEvent
 * @property {"event"} type
 * @property {string} stream
 * @property {number} [seq]  absent on join/leave
 * @property {string} id
 * @property {string} kind  message, published, reply.delta, reply.restart, reply.done,
 *   tool.call, tool.result, reply.snapshot (a compact catch-up's text so far, from its
 *   offset), join, leave
 * @property {string} from  `client:ID` or `agent:NAME`
 * @property {Cause} cause
 * @property {string} ts
 * @property {any} data
 *
 * @typedef {object} Reply  a run's reply as it streams
 * @property {string|null} run
 * @property {string|null} agent
 * @property {Cause|null} cause
 * @property {string} text  the pieces so far (since the last restart); once done, the
 *   reply.done's text
 * @property {StreamEvent[]} deltas  in offset order, each once, since the last restart
 * @property {StreamEvent|null} done
 * @property {string|null} status  ok, degraded, cancelled, failed once done
 * @property {boolean} gap  pieces before the first one seen were missed (joined mid-reply)
 * @property {number} restarts  `reply.restart` events taken: each voided the text so far
 * @property {number|null} attempt  the last restart's attempt number
 * @property {number|null} lastSeq  the seq of the last event taken (repeats are ignored)
 * @property {ToolCallView[]} tools  the run's tool calls in call order, each with its
 *   result once it came; a restart drops those of the step it names and later ones
 *
 * @typedef {object} ToolCallView  one tool call of a run and its result
 * @property {string} call  the call's id, which its tool.call and tool.result share
 * @property {string|null} name
 * @property {any} arguments  as the tool got them; null when invalid (or the call was missed)
 * @property {number|null} step
 * @property {boolean|null} ok  null until the result came
 * @property {string|null} text  the result's text (or why there is none)
 * @property {string|null} error  bad_arguments, unknown_tool, timeout, exception
 * @property {boolean} truncated
 *
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} ConnectionState
 *
 * @typedef {object} StateChange
 * @property {ConnectionState} state
 * @property {ConnectionState} previous
 * @property {number|null} closeCode  the close that caused a `reconnecting` or `closed`
 * @property {string} reason
 * @property {boolean} resumed  whether an `open` continued the previous session
 * @property {number} reconnects
 *
 * @typedef {object} RetryInfo
 * @property {string} id  the message id being retried
 * @property {string} code  rate_limited, overloaded, internal or unavailable
 * @property {number} status
 * @property {number|null} retryAfterMs  what the server asked for
 * @property {number} delayMs  what the client waits (retryAfterMs plus up to 50%)
 * @property {number} attempt
 *
 * @typedef {object} ClientOptions
 * @property {number} [initialBackoffMs]  first reconnect delay bound (default 50)
 * @property {number} [maxBackoffMs]  largest reconnect delay bound (default 5000)
 * @property {number} [connectTimeoutMs]  handshake and resume time limit (default 10000)
 * @property {number} [requestTimeoutMs]  wait for one answer on one connection (default 10000)
 * @property {number} [receiptDelayMs]  receipts of a stream are coalesced this long (default 200)
 * @property {boolean} [heartbeat]  ping every `heartbeat_s` and drop a connection whose
 *   pong does not come (default true)
 * @property {(change: StateChange) => void} [onState]
 * @property {typeof WebSocket} [WebSocket]  the WebSocket class (default the global one)
 * @property {() => number} [random]  for tests: the jitter's source (default Math.random)
 */

/** The server answered a request with an `error` frame. */
export class SwitchboardError extends Error {
  /** @param {Frame} frame */
  constructor(frame) {
    super(`${frame.code ?? "internal"} (${frame.status ?? 500}): ${frame.detail ?? ""}`);
    this.name = "SwitchboardError";
    /** @type {string} */
    this.code = frame.code ?? "internal";
    /** @type {number} */
    this.status = frame.status ?? 500;
    /** @type {string} */
    this.detail = frame.detail ?? "";
    /** @type {number|null} */
    this.retryAfterMs = frame.retry_after_ms ?? null;
    this.frame = frame;
  }
}

/** A connection closed while a request waited on it (code 1006 when no close frame came). */
export class SwitchboardClosed extends Error {
  /**
   * @param {number} code
   * @param {string} reason
   * @param {Frame[]} [frames]  frames received before a welcome (a refused connect has none)
   */
  constructor(code, reason, frames = []) {
    super(`connection closed: ${code} ${reason}`.trim());
    this.name = "SwitchboardClosed";
    this.code = code;
    this.reason = reason;
    this.frames = frames;
  }
}

/** The client is closed, or the server refused it for good (4001, 4003). */
export class ClientStopped extends Error {
  /** @param {number|null} code @param {string} reason */
  constructor(code, reason) {
    super(`client stopped (close ${code}: ${reason})`);
    this.name = "ClientStopped";
    this.code = code;
    this.reason = reason;
  }
}

/** No answer in time. */
export class TimeoutError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
  }
}

/**
 * Full jitter: uniform in [0, min(max, initial * 2^attempt)].
 * @param {number} attempt @param {number} initialMs @param {number} maxMs
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, initialMs, maxMs, random = Math.random) {
  return random() * Math.min(maxMs, initialMs * 2 ** attempt);
}

/**
 * Whether a reply event belongs to the run one of `client`'s sends started. Runs that
 * other agents' replies started (their cause has a `depth`) keep the sender's client and
 * message id in their cause too, but are not that send's reply.
 * @param {StreamEvent} event @param {string|null} client
 */
export function answersOwnSend(event, client) {
  const cause = event.cause;
  return Boolean(cause) && cause.client === client && !cause.depth;
}

/**
 * `url` with the given query parameters added (null/undefined values left out).
 * @param {string} url @param {Record<string, string|null|undefined>} params
 */
export function withQuery(url, params) {
  const extra = Object.entries(params)
    .filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => `${encodeURIComponent(key)}=${encodeURIComponent(String(value))}`)
    .join("&");
  if (!extra) return url;
  const hash = url.indexOf("#");
  const base = hash < 0 ? url : url.slice(0, hash);
  const fragment = hash < 0 ? "" : url.slice(hash);
  const sep = base.includes("?") ? (base.endsWith("?") || base.endsWith("&") ? "" : "&") : "?";
  return `${base}${sep}${extra}${fragment}`;
}

/**
 * A resume's `positions` parameter: base64url, without padding, of the JSON object
 * stream -> last seq processed.
 * @param {Record<string, number>} positions
 */
export function encodePositions(positions) {
  const bytes = new TextEncoder().encode(JSON.stringify(positions));
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** @returns {Reply} */
function newReply() {
  return {
    run: null,
    agent: null,
    cause: null,
    text: "",
    deltas: [],
    done: null,
    status: null,
    gap: false,
    restarts: 0,
    attempt: null,
    lastSeq: null,
    tools: [],
  };
}

/** Tool calls one reply keeps (the server bounds a run's; this bounds a hostile one). */
export const MAX_TOOL_CALLS_KEPT = 256;

/**
 * Fold a `tool.call`, `tool.result` or `reply.restart` into a run's tool calls: each call
 * once, with its result when it came (a result whose call was missed makes one with null
 * arguments); a restart drops the calls of the step it names and later ones (all of them
 * when it names none). Returns whether the list changed.
 * @param {ToolCallView[]} tools @param {StreamEvent} event
 */
export function applyToolEvent(tools, event) {
  const data = event.data || {};
  if (event.kind === "reply.restart") {
    const step = typeof data.step === "number" ? data.step : null;
    const kept = tools.filter((tool) => step !== null && (tool.step ?? 0) < step);
    const changed = kept.length !== tools.length;
    tools.splice(0, tools.length, ...kept);
    return changed;
  }
  if (event.kind !== "tool.call" && event.kind !== "tool.result") return false;
  let found = null;
  for (let index = tools.length - 1; index >= 0; index -= 1) {
    if (tools[index].call === data.call) {
      found = tools[index];
      break;
    }
  }
  if (event.kind === "tool.call" || !found) {
    if (tools.length >= MAX_TOOL_CALLS_KEPT) return false;
    found = {
      call: String(data.call ?? ""),
      name: typeof data.name === "string" ? data.name : null,
      arguments: event.kind === "tool.call" ? data.arguments ?? null : null,
      step: typeof data.step === "number" ? data.step : null,
      ok: null,
      text: null,
      error: null,
      truncated: false,
    };
    tools.push(found);
  }
  if (event.kind === "tool.result") {
    found.ok = Boolean(data.ok);
    found.text = typeof data.text === "string" ? data.text : null;
    found.error = typeof data.error === "string" ? data.error : null;
    found.truncated = Boolean(data.truncated);
  }
  return true;
}

/**
 * Apply one `reply.delta`, `reply.restart`, `reply.snapshot`, `reply.done`, `tool.call` or
 * `tool.result` to a reply (tool events go to `reply.tools`, see `applyToolEvent`). Pieces
 * are placed by offset: one already covered is ignored, one past the end (pieces missed
 * before a mid-reply subscribe) is kept and marks a gap; a restart voids the text so far,
 * and the pieces after it start again at offset 0; a snapshot (compact catch-up) is the
 * text from its offset, replacing whatever the reply held from there (from 0: all of it);
 * the `reply.done` text is the whole reply. An
 * event whose seq is not past the last one taken is a repeat and is ignored, so a restart
 * delivered twice never voids the pieces that followed it.
 * Returns whether the reply changed.
 * @param {Reply} reply @param {StreamEvent} event
 */
export function applyReplyEvent(reply, event) {
  const data = event.data || {};
  if (reply.run === null) {
    reply.run = data.run ?? null;
    reply.agent = typeof event.from === "string" ? event.from.replace(/^agent:/, "") : null;
    reply.cause = event.cause ?? null;
  }
  if (reply.done) return false;
  if (typeof event.seq === "number") {
    if (reply.lastSeq !== null && event.seq <= reply.lastSeq) return false;
    reply.lastSeq = event.seq;
  }
  if (event.kind === "reply.restart") {
    reply.text = "";
    reply.deltas = [];
    reply.gap = false;
    reply.restarts += 1;
    reply.attempt = typeof data.attempt === "number" ? data.attempt : null;
    applyToolEvent(reply.tools, event);
    return true;
  }
  if (event.kind === "tool.call" || event.kind === "tool.result") {
    return applyToolEvent(reply.tools, event);
  }
  if (event.kind === "reply.snapshot") {
    const offset = data.offset ?? 0;
    const piece = data.text ?? "";
    if (offset > reply.text.length) reply.gap = true;
    if (offset === 0) {
      reply.deltas = [];
      reply.gap = false;
    }
    reply.text = reply.text.slice(0, offset) + piece;
    reply.deltas.push(event);
    return true;
  }
  if (event.kind === "reply.delta") {
    const offset = data.offset ?? 0;
    const piece = data.text ?? "";
    if (offset < reply.text.length) return false;
    if (offset > reply.text.length) reply.gap = true;
    reply.text += piece;
    reply.deltas.push(event);
    return true;
  }
  if (event.kind === "reply.done") {
    reply.done = event;
    reply.status = data.status ?? null;
    reply.text = data.text ?? reply.text;
    return true;
  }
  return false;
}

/** Whether events of this kind belong to a run's reply (its pieces and tool calls). @param {string} kind */
export function isReplyKind(kind) {
  return kind.startsWith("reply.") || kind === "tool.call" || kind === "tool.result";
}

/** Assembles every run's reply on the streams it is fed, keyed by run id (bounded). */
export class ReplyAssembler {
  /** @param {number} [maxRuns] runs remembered; the oldest are forgotten first */
  constructor(maxRuns = 1000) {
    this.maxRuns = maxRuns;
    /** @type {Map<string, Reply>} */
    this.replies = new Map();
  }

  /**
   * Feed an event; returns its run's reply when the event is a reply piece, else null.
   * @param {StreamEvent} event
   * @returns {Reply|null}
   */
  add(event) {
    if (!event.kind || !isReplyKind(event.kind) || !event.data) return null;
    const run = event.data.run;
    let reply = this.replies.get(run);
    if (!reply) {
      reply = newReply();
      this.replies.set(run, reply);
      if (this.replies.size > this.maxRuns) {
        const oldest = this.replies.keys().next().value;
        if (oldest !== undefined) this.replies.delete(oldest);
      }
    }
    applyReplyEvent(reply, event);
    return reply;
  }

  /** @param {string} run */
  get(run) {
    return this.replies.get(run) ?? null;
  }
}

/** @template T @returns {{promise: Promise<T>, resolve: (value: T) => void, reject: (error: any) => void}} */
function deferred() {
  /** @type {(value: T) => void} */
  let resolve = () => {};
  /** @type {(error: any) => void} */
  let reject = () => {};
  const promise = new Promise((ok, fail) => {
    resolve = ok;
    reject = fail;
  });
  // A rejection nobody waits for (a request failed by a close) is not an unhandled one.
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/** @param {Promise<any>} promise @param {number} ms @param {string} what */
function withTimeout(promise, ms, what) {
  if (!Number.isFinite(ms)) return promise;
  /** @type {ReturnType<typeof setTimeout>|undefined} */
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`no ${what} within ${ms} ms`)), Math.max(0, ms));
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * @typedef {object} ConnectionHooks
 * @property {(frame: Frame) => void} onFrame  every frame but events, before it is routed
 * @property {(event: StreamEvent) => void} onEvent  sequenced events
 * @property {(event: StreamEvent) => void} onPresence  join/leave (no seq)
 * @property {(frame: Frame) => void} onUnrouted  frames no request waited for
 */

/**
 * @typedef {object} IdlessRequest
 * @property {string} kind  the answer's type: subscribed, unsubscribed, presence, pong
 * @property {string|null} stream
 * @property {ReturnType<typeof deferred<Frame>>} answer
 * @property {Frame|null} historyExpired
 */

/**
 * One WebSocket speaking protocol v1; the Python `SwitchboardClient`'s routing: acks and
 * errors with an id resolve the request with that id; `subscribed`, `unsubscribed`,
 * `presence` and `pong` resolve the oldest matching request, and an error without an id
 * fails the oldest such request (the server answers frames in order), except
 * `history_expired`, which names its stream and goes with that stream's `subscribed`.
 */
export class Connection {
  /** @param {WebSocket} ws @param {ConnectionHooks} hooks */
  constructor(ws, hooks) {
    this.ws = ws;
    this.hooks = hooks;
    /** @type {Frame|null} */
    this.welcome = null;
    this.closed = false;
    /** @type {number|null} */
    this.closeCode = null;
    this.closeReason = "";
    /** @type {Frame[]} frames before the welcome, for SwitchboardClosed.frames */
    this.early = [];
    /** @type {Map<string, ReturnType<typeof deferred<Frame>>>} */
    this.pending = new Map();
    /** @type {Map<string, ReturnType<typeof deferred<Frame|null>>>} */
    this.cancels = new Map();
    /** @type {IdlessRequest[]} */
    this.idless = [];
    this._welcome = deferred();
    /** @type {ReturnType<typeof deferred<number>>} */
    this._closedDeferred = deferred();
    /** Resolves with the close code once the connection is closed. */
    this.closedPromise = this._closedDeferred.promise;
    ws.onmessage = (message) => this._onMessage(message);
    ws.onclose = (event) => this._onClose(event.code || 1006, event.reason || "");
    ws.onerror = () => {}; // a close event follows every error
  }

  /** Resolves with the welcome; rejects with SwitchboardClosed if refused. */
  waitWelcome(timeoutMs = 10000) {
    return withTimeout(this._welcome.promise, timeoutMs, "welcome");
  }

  /** @param {Frame} frame */
  sendFrame(frame) {
    if (this.closed) throw new SwitchboardClosed(this.closeCode ?? 1006, this.closeReason);
    this.ws.send(JSON.stringify(frame));
  }

  /**
   * Send a frame carrying `id` and wait for its `ack` (SwitchboardError for an `error`).
   * @param {string} id @param {Frame} frame @param {number} timeoutMs
   * @returns {Promise<Frame>}
   */
  async request(id, frame, timeoutMs) {
    if (this.pending.has(id)) throw new Error(`a request with id ${id} is already waiting`);
    /** @type {ReturnType<typeof deferred<Frame>>} */
    const answer = deferred();
    this.sendFrame(frame);
    this.pending.set(id, answer);
    try {
      return await withTimeout(answer.promise, timeoutMs, `answer to ${id}`);
    } finally {
      if (this.pending.get(id) === answer) this.pending.delete(id);
    }
  }

  /**
   * @param {string} kind @param {string|null} stream @param {Frame} frame
   * @param {number} timeoutMs
   * @returns {Promise<IdlessRequest>}
   */
  async idlessRequest(kind, stream, frame, timeoutMs) {
    /** @type {IdlessRequest} */
    const request = { kind, stream, answer: deferred(), historyExpired: null };
    this.sendFrame(frame);
    this.idless.push(request);
    try {
      await withTimeout(request.answer.promise, timeoutMs, kind);
    } finally {
      const index = this.idless.indexOf(request);
      if (index >= 0) this.idless.splice(index, 1);
    }
    return request;
  }

  /**
   * @param {string} stream @param {number|null} since @param {number} timeoutMs
   * @param {boolean} [compact]  missed replies as reply.done or reply.snapshot
   * @returns {Promise<Frame>} the `subscribed` frame (with `history_expired` when it came)
   */
  async subscribe(stream, since, timeoutMs, compact = false) {
    /** @type {Frame} */
    const frame = { type: "subscribe", stream };
    if (since !== null && since !== undefined) frame.since = since;
    if (compact) frame.compact = true;
    const request = await this.idlessRequest("subscribed", stream, frame, timeoutMs);
    const answer = await request.answer.promise;
    return request.historyExpired ? { ...answer, history_expired: request.historyExpired } : answer;
  }

  /** Also a barrier: the server has handled every earlier frame. @param {number} timeoutMs */
  async ping(timeoutMs) {
    const request = await this.idlessRequest("pong", null, { type: "ping" }, timeoutMs);
    return request.answer.promise;
  }

  /**
   * Close the socket and take the connection for lost at once, without waiting for the
   * closing handshake (which never ends on a dead network).
   * @param {number} code @param {string} reason
   */
  abandon(code, reason) {
    if (this.closed) return;
    this.ws.onmessage = null;
    this.ws.onclose = null;
    try {
      this.ws.close(code, reason);
    } catch {
      // Already closing: nothing to do.
    }
    this._onClose(code, reason);
  }

  /** @param {number} [code] @param {string} [reason] */
  close(code = 1000, reason = "") {
    try {
      this.ws.close(code, reason);
    } catch {
      // Already closing.
    }
  }

  /** @param {MessageEvent} message */
  _onMessage(message) {
    if (typeof message.data !== "string") return; // the server sends text frames only
    /** @type {Frame} */
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch {
      frame = { type: null, raw: message.data };
    }
    if (frame === null || typeof frame !== "object") frame = { type: null, raw: message.data };
    if (this.welcome === null && frame.type !== "welcome") this.early.push(frame);
    this._dispatch(frame);
  }

  /** @param {Frame} frame */
  _dispatch(frame) {
    const kind = frame.type;
    if (kind === "event") {
      if (frame.seq === undefined || frame.seq === null) this.hooks.onPresence(/** @type {any} */ (frame));
      else this.hooks.onEvent(/** @type {any} */ (frame));
      return;
    }
    this.hooks.onFrame(frame);
    if (kind === "ack") this._resolveId(frame);
    else if (kind === "error") this._onError(frame);
    else if (kind === "pong" || kind === "subscribed" || kind === "unsubscribed" || kind === "presence")
      this._onIdlessAnswer(kind, frame);
    else if (kind === "welcome") {
      this.welcome = frame;
      this._welcome.resolve(frame);
    } else this.hooks.onUnrouted(frame);
  }

  /** @param {Frame} frame */
  _resolveId(frame) {
    const answer = this.pending.get(frame.id);
    if (!answer) {
      this.hooks.onUnrouted(frame);
      return;
    }
    this.pending.delete(frame.id);
    if (frame.type === "error") answer.reject(new SwitchboardError(frame));
    else answer.resolve(frame);
  }

  /** @param {Frame} frame */
  _onError(frame) {
    const id = frame.id;
    if (id !== null && id !== undefined) {
      if (this.pending.has(id)) return this._resolveId(frame);
      const cancel = this.cancels.get(id);
      if (cancel) {
        this.cancels.delete(id);
        cancel.resolve(frame);
        return;
      }
      this.hooks.onUnrouted(frame);
      return;
    }
    if (frame.code === "history_expired" && frame.stream) {
      const request = this.idless.find((r) => r.kind === "subscribed" && r.stream === frame.stream);
      if (request) request.historyExpired = frame;
      else this.hooks.onUnrouted(frame);
      return;
    }
    const request = this.idless.shift();
    if (request) request.answer.reject(new SwitchboardError(frame));
    else this.hooks.onUnrouted(frame);
  }

  /** @param {string} kind @param {Frame} frame */
  _onIdlessAnswer(kind, frame) {
    const stream = frame.stream ?? null;
    const index = this.idless.findIndex((r) => r.kind === kind && r.stream === stream);
    if (index < 0) {
      this.hooks.onUnrouted(frame);
      return;
    }
    const [request] = this.idless.splice(index, 1);
    request.answer.resolve(frame);
  }

  /** @param {number} code @param {string} reason */
  _onClose(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.closeCode = code;
    this.closeReason = reason;
    const closed = new SwitchboardClosed(code, reason, [...this.early]);
    this._welcome.reject(closed);
    for (const answer of this.pending.values()) answer.reject(closed);
    for (const cancel of this.cancels.values()) cancel.reject(closed);
    for (const request of this.idless) request.answer.reject(closed);
    this.pending.clear();
    this.cancels.clear();
    this.idless = [];
    this._closedDeferred.resolve(code);
  }
}

/**
 * @typedef {object} Tracked  one stream as the application sees it, across connections
 * @property {number|null} lastSeq  the last seq delivered
 * @property {boolean} resyncing  a subscribe from lastSeq is in flight: drop until answered
 * @property {Set<(event: StreamEvent) => void>} handlers
 * @property {Frame|null} subscribed  the last `subscribed` answer
 * @property {boolean} compact  subscribed with `compact: true` (so are its resubscribes)
 * @property {number|null} compactThrough  a compact catch-up's end (its `subscribed`
 *   head): seqs up to it may skip folded deltas, and a reply.snapshot may carry a seq
 *   below the last one delivered
 */

/**
 * @typedef {object} Collector  the reply to one of this client's sends
 * @property {Reply} reply
 * @property {ReturnType<typeof deferred<Reply>>} finished
 * @property {((delta: StreamEvent, text: string) => void)|null} onDelta
 * @property {((restart: StreamEvent, reply: Reply) => void)|null} onRestart
 * @property {((event: StreamEvent, reply: Reply) => void)|null} onTool
 */

/** A client that outlives its connections: what an application uses. */
export class SwitchboardClient {
  /**
   * @param {string|string[]} urls  gateway WebSocket URL(s), e.g. ws://host/ws/v1/; a
   *   reconnect goes to the next one
   * @param {string|(() => string|Promise<string>)} token  a JWT, or a function that gives
   *   one before each connection attempt (to renew short-lived tokens)
   * @param {ClientOptions} [options]
   */
  constructor(urls, token, options = {}) {
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    this.token = token;
    this.initialBackoffMs = options.initialBackoffMs ?? 50;
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.receiptDelayMs = options.receiptDelayMs ?? 200;
    this.heartbeat = options.heartbeat ?? true;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.random = options.random ?? Math.random;
    /** @type {ConnectionState} */
    this.state = "idle";
    /** @type {string|null} */
    this.client = null;
    /** @type {string|null} */
    this.session = null;
    /** @type {Frame|null} the last welcome */
    this.welcome = null;
    /** welcomes received; `reconnects` is one less */
    this.connections = 0;
    /** @type {(number|null)[]} one per lost connection */
    this.closeCodes = [];
    /** @type {Frame[]} */
    this.refusedSessions = [];
    /** @type {Frame[]} history_expired frames passed on */
    this.expired = [];
    /** events dropped because their seq was already delivered */
    this.duplicatesDropped = 0;
    /** @type {Map<string, Tracked>} */
    this._streams = new Map();
    /** @type {Set<string>} streams the session is known to hold (a `subscribed` came under
     * it): only these may be named in a resume's positions */
    this._held = new Set();
    /** @type {Map<string, Collector>} */
    this._replies = new Map();
    /** @type {Connection|null} */
    this._conn = null;
    /** @type {Connection|null} the connection being opened */
    this._opening = null;
    /** @type {ClientStopped|null} */
    this._stopped = null;
    /** @type {Set<() => void>} */
    this._stateWaiters = new Set();
    this._urlIndex = 0;
    /** @type {Promise<void>|null} */
    this._runner = null;
    /** @type {(() => void)|null} */
    this._wake = null;
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @type {Map<string, number>} */
    this._receipts = new Map();
    /** @type {Map<string, number>} */
    this._receiptsSent = new Map();
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._receiptTimer = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._heartbeatTimer = null;
    this._ids = 0;
    this._idPrefix = Math.floor(this.random() * 2 ** 32).toString(16).padStart(8, "0");
    if (options.onState) this.on("state", options.onState);
  }

  /**
   * Start, and resolve once the first connection is open.
   * @param {string|string[]} urls
   * @param {string|(() => string|Promise<string>)} token
   * @param {ClientOptions} [options]
   */
  static async connect(urls, token, options = {}) {
    const client = new SwitchboardClient(urls, token, options);
    await client.start();
    return client;
  }

  /** Start connecting (once); resolves when the first connection is open. */
  start() {
    if (!this._runner) {
      this._setState("connecting", null, "");
      this._runner = this._run();
    }
    return this.waitOpen(this.connectTimeoutMs);
  }

  /** Reconnections so far (welcomes after the first). */
  get reconnects() {
    return Math.max(0, this.connections - 1);
  }

  // --- listening ------------------------------------------------------------------------

  /**
   * Listen: "state" (StateChange), "event" (every stream's sequenced events, each once, in
   * order), "presence" (join/leave events), "subscribed" (`subscribed` frames, restored
   * ones included), "expired" (history_expired frames), "retry" (RetryInfo: a refused
   * send/publish will be sent again), "error" (error frames no request waited for).
   * Returns a function that stops listening.
   * @param {"state"|"event"|"presence"|"subscribed"|"expired"|"retry"|"error"} type
   * @param {Function} listener
   */
  on(type, listener) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set?.delete(listener);
  }

  /** @param {string} type @param {any} value */
  _emit(type, value) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (error) {
        // One failing listener must not stop delivery to the others.
        console.error(`switchboard: a ${type} listener failed`, error);
      }
    }
  }

  // --- connection -----------------------------------------------------------------------

  /** @param {ConnectionState} state @param {number|null} closeCode @param {string} reason */
  _setState(state, closeCode, reason) {
    const previous = this.state;
    if (state !== previous) {
      this.state = state;
      this._emit("state", {
        state,
        previous,
        closeCode,
        reason,
        resumed: state === "open" ? Boolean(this.welcome?.resumed) : false,
        reconnects: this.reconnects,
      });
    }
    for (const wake of [...this._stateWaiters]) wake();
  }

  /**
   * Resolves with the open connection (waiting up to `timeoutMs` for one); rejects with
   * ClientStopped once the client has stopped.
   * @param {number} [timeoutMs]
   * @returns {Promise<Connection>}
   */
  waitOpen(timeoutMs = this.connectTimeoutMs) {
    const ready = () => {
      if (this._stopped) throw this._stopped;
      const conn = this._conn;
      return this.state === "open" && conn && !conn.closed ? conn : null;
    };
    try {
      const now = ready();
      if (now) return Promise.resolve(now);
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      /** @type {ReturnType<typeof setTimeout>|undefined} */
      let timer;
      const finish = () => {
        this._stateWaiters.delete(check);
        clearTimeout(timer);
      };
      const check = () => {
        try {
          const conn = ready();
          if (!conn) return;
          finish();
          resolve(conn);
        } catch (error) {
          finish();
          reject(error);
        }
      };
      this._stateWaiters.add(check);
      if (Number.isFinite(timeoutMs)) {
        timer = setTimeout(() => {
          finish();
          reject(new TimeoutError(`no open connection within ${timeoutMs} ms`));
        }, Math.max(0, timeoutMs));
      }
    });
  }

  /** @param {number} ms */
  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve(undefined);
      }
      this._wake = done;
    }).finally(() => {
      this._wake = null;
    });
  }

  async _run() {
    let attempt = 0;
    while (!this._stopped) {
      const url = this.urls[this._urlIndex % this.urls.length];
      this._urlIndex += 1;
      /** @type {Connection} */
      let conn;
      try {
        conn = await this._openConnection(url);
      } catch (error) {
        if (this._stopped) return;
        if (error instanceof SwitchboardClosed) {
          if (this._sessionRefused(error)) continue; // at once, without the session
          if (TERMINAL_CLOSE_CODES.has(error.code)) {
            this._stop(error.code, error.reason);
            return;
          }
        }
        await this._sleep(backoffDelay(attempt, this.initialBackoffMs, this.maxBackoffMs, this.random));
        attempt += 1;
        continue;
      }
      if (this._stopped) {
        conn.close();
        return;
      }
      attempt = 0;
      this._conn = conn;
      this._setState("open", null, "");
      this._flushReceipts();
      this._startHeartbeat(conn);
      const code = await conn.closedPromise;
      this._stopHeartbeat();
      this.closeCodes.push(code);
      if (this._stopped) return;
      if (TERMINAL_CLOSE_CODES.has(code)) {
        this._stop(code, conn.closeReason);
        return;
      }
      this._setState("reconnecting", code, conn.closeReason);
      // Spread a gateway's clients over time instead of all at once.
      await this._sleep(backoffDelay(0, this.initialBackoffMs, this.maxBackoffMs, this.random));
    }
  }

  /** @param {string} url @returns {Promise<Connection>} */
  async _openConnection(url) {
    const token = typeof this.token === "function" ? await this.token() : this.token;
    /** @type {Set<string>} */
    const restored = new Set();
    if (this.session === null) this._held.clear(); // a new session holds nothing yet
    const positions = this.session === null ? null : encodePositions(this.resumePositions());
    const ws = new this.WebSocket(withQuery(url, { token, session: this.session, positions }));
    const conn = new Connection(ws, {
      onFrame: (frame) => {
        if (frame.type === "subscribed") restored.add(frame.stream);
        this._onFrame(frame);
      },
      // The connection an event came on is the one to resubscribe on after a gap: during a
      // resume `_conn` is still the old, closed one.
      onEvent: (event) => this._onEvent(event, conn),
      onPresence: (event) => this._emit("presence", event),
      onUnrouted: (frame) => {
        if (frame.type === "error") this._emit("error", frame);
      },
    });
    this._opening = conn;
    try {
      const welcome = await conn.waitWelcome(this.connectTimeoutMs);
      this.welcome = welcome;
      this.client = welcome.client ?? null;
      this.session = welcome.session ?? null;
      this.connections += 1;
      if (welcome.resumed) {
        // The server restores the session's streams before it reads any frame of ours,
        // so once this ping is answered every restored `subscribed` is in.
        const tries = restored.size + 3;
        for (let i = 0; i < tries; i += 1) {
          try {
            await conn.ping(this.connectTimeoutMs);
            break;
          } catch (error) {
            if (!(error instanceof SwitchboardError)) throw error;
            // An id-less refusal of a restored stream came first.
          }
        }
      }
      for (const [stream, tracked] of this._streams) {
        if (!restored.has(stream)) {
          tracked.resyncing = true;
          await conn.subscribe(stream, tracked.lastSeq, this.connectTimeoutMs, tracked.compact);
        }
      }
    } catch (error) {
      conn.abandon(1000, "connect failed");
      throw error;
    } finally {
      this._opening = null;
    }
    return conn;
  }

  /**
   * What a resume sends as `positions`: per stream the session holds, the last seq
   * delivered (streams without one go on from the session's record).
   * @returns {Record<string, number>}
   */
  resumePositions() {
    /** @type {Record<string, number>} */
    const positions = {};
    for (const [stream, tracked] of this._streams) {
      if (this._held.has(stream) && tracked.lastSeq !== null) positions[stream] = tracked.lastSeq;
    }
    return positions;
  }

  /** @param {SwitchboardClosed} refused */
  _sessionRefused(refused) {
    for (const frame of refused.frames) {
      if (frame.type === "error" && frame.session) {
        this.refusedSessions.push(frame);
        this.session = null;
        return true;
      }
    }
    return false;
  }

  /** @param {number|null} code @param {string} reason */
  _stop(code, reason) {
    if (this._stopped) return;
    this._stopped = new ClientStopped(code, reason);
    this._stopHeartbeat();
    if (this._receiptTimer) clearTimeout(this._receiptTimer);
    for (const collector of this._replies.values()) {
      if (!collector.reply.done) collector.finished.reject(this._stopped);
    }
    this._setState("closed", code, reason);
    this._wake?.();
  }

  /** Stop for good: close the connection and stop reconnecting. */
  async close() {
    this._stop(1000, "closed by the client");
    // Not waiting for the closing handshake: on a dead network it never ends.
    this._opening?.abandon(1000, "closed by the client");
    this._conn?.abandon(1000, "closed by the client");
    if (this._runner) await this._runner;
  }

  /**
   * Drop the current connection as a network failure would (closing the socket without
   * waiting for the server): the client reconnects with backoff and resumes its session.
   */
  drop() {
    this._conn?.abandon(CLOSE_DROPPED, "dropped by the client");
  }

  /** @param {Connection} conn */
  _startHeartbeat(conn) {
    this._stopHeartbeat();
    const intervalS = Number(this.welcome?.heartbeat_s);
    if (!this.heartbeat || !(intervalS > 0)) return;
    const intervalMs = intervalS * 1000;
    const beat = async () => {
      if (conn.closed || this._conn !== conn) return;
      try {
        await conn.ping(Math.min(intervalMs, this.requestTimeoutMs));
      } catch (error) {
        if (error instanceof TimeoutError && !conn.closed) {
          // No pong: the network is gone without telling us. Take it as lost.
          conn.abandon(CLOSE_DROPPED, "heartbeat timeout");
          return;
        }
      }
      if (!conn.closed && this._conn === conn) this._heartbeatTimer = setTimeout(beat, intervalMs);
    };
    this._heartbeatTimer = setTimeout(beat, intervalMs);
  }

  _stopHeartbeat() {
    if (this._heartbeatTimer) clearTimeout(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  // --- requests -------------------------------------------------------------------------

  /** A client message id unique for this client (and, in practice, any). */
  newId() {
    this._ids += 1;
    return `${this._idPrefix}-${this._ids}`;
  }

  /** @param {string} stream */
  _track(stream) {
    let tracked = this._streams.get(stream);
    if (!tracked) {
      tracked = {
        lastSeq: null,
        resyncing: false,
        handlers: new Set(),
        subscribed: null,
        compact: false,
        compactThrough: null,
      };
      this._streams.set(stream, tracked);
    }
    return tracked;
  }

  /**
   * Subscribe to a stream (kept across reconnects). Events after `since` (default: the
   * last seq this client delivered on it, or only new ones for a stream it never had) go
   * to `handler` and to "event" listeners, each once, in seq order. `compact`: the replies
   * missed since `since` come as their reply.done alone, or as one reply.snapshot while
   * still streaming, not as every delta (docs/protocol.md).
   * @param {string} stream
   * @param {((event: StreamEvent) => void)|null} [handler]
   * @param {{since?: number|null, timeoutMs?: number, compact?: boolean}} [options]
   * @returns {Promise<Frame>} the `subscribed` answer
   */
  async subscribe(stream, handler = null, options = {}) {
    const tracked = this._track(stream);
    if (handler) tracked.handlers.add(handler);
    if (options.since !== undefined && options.since !== null) tracked.lastSeq = options.since;
    tracked.resyncing = true;
    tracked.compact = options.compact === true;
    const timeoutMs = options.timeoutMs ?? this.requestTimeoutMs;
    const conn = await this.waitOpen(timeoutMs);
    try {
      return await conn.subscribe(stream, tracked.lastSeq, timeoutMs, tracked.compact);
    } catch (error) {
      if (!(error instanceof SwitchboardClosed)) throw error;
      // The next connection subscribes every tracked stream from its last seq.
      await this.waitOpen(timeoutMs);
      return tracked.subscribed ?? { type: "subscribed", stream, head: null, recovered: true };
    }
  }

  /**
   * Stop following a stream: no more events, and it is not subscribed again on reconnect.
   * @param {string} stream @param {{timeoutMs?: number}} [options]
   */
  async unsubscribe(stream, options = {}) {
    this._streams.delete(stream);
    const conn = this._conn;
    if (!conn || conn.closed || this.state !== "open") return null;
    try {
      const request = await conn.idlessRequest(
        "unsubscribed",
        stream,
        { type: "unsubscribe", stream },
        options.timeoutMs ?? this.requestTimeoutMs,
      );
      return await request.answer.promise;
    } catch (error) {
      if (error instanceof SwitchboardClosed) return null; // the next connection will not have it
      throw error;
    }
  }

  /**
   * Send a message to an agent; retried across reconnects and 429s with one id until
   * acked. Resolves with the `ack`; the reply is `reply(ack.id)`.
   * @param {string} stream @param {string} agent @param {string} text
   * @param {{options?: Record<string, any>, id?: string, prev?: string,
   *   timeoutMs?: number, onDelta?: (delta: StreamEvent, text: string) => void,
   *   onRestart?: (restart: StreamEvent, reply: Reply) => void,
   *   onTool?: (event: StreamEvent, reply: Reply) => void}} [extra]  `onRestart`: the
   *   reply's text so far is void (a `reply.restart`); the next `onDelta` starts it again.
   *   `onTool`: a `tool.call` or `tool.result` of the run came (`reply.tools` has it)
   * @returns {Promise<Frame>}
   */
  async send(stream, agent, text, extra = {}) {
    const timeoutMs = extra.timeoutMs ?? 30000;
    if (!this._streams.has(stream)) await this.subscribe(stream, null, { timeoutMs });
    const id = extra.id ?? this.newId();
    const collector = this._collector(id);
    if (extra.onDelta) collector.onDelta = extra.onDelta;
    if (extra.onRestart) collector.onRestart = extra.onRestart;
    if (extra.onTool) collector.onTool = extra.onTool;
    /** @type {Frame} */
    const frame = { type: "send", id, stream, agent, text };
    if (extra.options) frame.options = extra.options;
    if (extra.prev) frame.prev = extra.prev;
    try {
      return await this._untilAcked(id, frame, timeoutMs);
    } catch (error) {
      // Refused for good: no run, so no reply to wait for.
      if (error instanceof SwitchboardError && !collector.reply.deltas.length) {
        this._replies.delete(id);
        collector.finished.reject(error);
      }
      throw error;
    }
  }

  /**
   * Publish `data` to a stream; retried like `send`. Resolves with the `ack`.
   * @param {string} stream @param {any} data @param {{id?: string, timeoutMs?: number}} [extra]
   */
  publish(stream, data, extra = {}) {
    const id = extra.id ?? this.newId();
    return this._untilAcked(id, { type: "publish", id, stream, data }, extra.timeoutMs ?? 30000);
  }

  /**
   * @param {string} id @param {Frame} frame @param {number} timeoutMs
   * @returns {Promise<Frame>}
   */
  async _untilAcked(id, frame, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    let attempt = 0;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw new TimeoutError(`no ack for ${id} before the timeout`);
      const conn = await this.waitOpen(left);
      attempt += 1;
      try {
        return await conn.request(id, frame, Math.min(left, this.requestTimeoutMs));
      } catch (error) {
        if (error instanceof SwitchboardClosed) continue; // same id next time: accepted once
        if (error instanceof TimeoutError) {
          if (conn.closed) continue;
          throw error;
        }
        if (!(error instanceof SwitchboardError) || !RETRYABLE_ERRORS.has(error.code)) throw error;
        const delayMs = (error.retryAfterMs ?? 200) * (1 + 0.5 * this.random());
        if (Date.now() + delayMs > deadline) throw error;
        /** @type {RetryInfo} */
        const info = {
          id,
          code: error.code,
          status: error.status,
          retryAfterMs: error.retryAfterMs,
          delayMs,
          attempt,
        };
        this._emit("retry", info);
        await new Promise((resolve) => setTimeout(resolve, delayMs));
        if (this._stopped) throw this._stopped;
      }
    }
  }

  /**
   * The reply to one of this client's sends, once its `reply.done` is in.
   * @param {string} messageId @param {{timeoutMs?: number}} [options]
   * @returns {Promise<Reply>}
   */
  reply(messageId, options = {}) {
    return withTimeout(this._collector(messageId).finished.promise, options.timeoutMs ?? 30000, "reply");
  }

  /** The reply so far of one of this client's sends (null if unknown). @param {string} messageId */
  replySoFar(messageId) {
    return this._replies.get(messageId)?.reply ?? null;
  }

  /** @param {string} id @returns {Collector} */
  _collector(id) {
    let collector = this._replies.get(id);
    if (!collector) {
      collector = {
        reply: newReply(),
        finished: deferred(),
        onDelta: null,
        onRestart: null,
        onTool: null,
      };
      this._replies.set(id, collector);
    }
    return collector;
  }

  /**
   * Cancel the run of one of this client's sends. Resolves once the server has taken it
   * (the run then ends with a `reply.done` of status `cancelled`); rejects with
   * SwitchboardError when the server refuses (not_found, already finished).
   * @param {string} id @param {{timeoutMs?: number}} [options]
   */
  async cancel(id, options = {}) {
    const timeoutMs = options.timeoutMs ?? this.requestTimeoutMs;
    const conn = await this.waitOpen(timeoutMs);
    /** @type {ReturnType<typeof deferred<Frame|null>>} */
    const refused = deferred();
    conn.cancels.set(id, refused);
    try {
      conn.sendFrame({ type: "cancel", id });
      await conn.ping(timeoutMs); // success has no answer: the pong proves none is coming
    } finally {
      if (conn.cancels.get(id) === refused) conn.cancels.delete(id);
    }
    refused.resolve(null);
    const error = await refused.promise;
    if (error) throw new SwitchboardError(error);
  }

  /**
   * The clients present on a stream now.
   * @param {string} stream @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{client: string, name: string|null}[]>}
   */
  async presence(stream, options = {}) {
    const timeoutMs = options.timeoutMs ?? this.requestTimeoutMs;
    const conn = await this.waitOpen(timeoutMs);
    const request = await conn.idlessRequest("presence", stream, { type: "presence", stream }, timeoutMs);
    const answer = await request.answer.promise;
    return answer.clients;
  }

  /**
   * Follow who is present on a stream: `onChange` gets the members, ordered by client id,
   * after each snapshot and each join or leave. A snapshot is asked at once, whenever the
   * stream is (re)subscribed and after every reconnect, since join/leave are not resumed.
   * Returns a function that stops following.
   * @param {string} stream
   * @param {(members: {client: string, name: string|null}[]) => void} onChange
   */
  watchPresence(stream, onChange) {
    /** @type {Map<string, {client: string, name: string|null}>} */
    const members = new Map();
    let active = true;
    let queued = false;
    const notify = () => {
      if (!active) return;
      onChange([...members.values()].sort((a, b) => (a.client < b.client ? -1 : a.client > b.client ? 1 : 0)));
    };
    const refresh = async () => {
      if (queued || !active) return; // one query answers every reason to ask
      queued = true;
      try {
        await this.waitOpen(Infinity);
        queued = false;
        const clients = await this.presence(stream);
        if (!active) return;
        members.clear();
        for (const member of clients) members.set(member.client, member);
        notify();
      } catch {
        // Closed meanwhile: the next open asks again.
      } finally {
        queued = false;
      }
    };
    const offPresence = this.on("presence", (/** @type {StreamEvent} */ event) => {
      if (event.stream !== stream || !event.data) return;
      if (event.kind === "join") members.set(event.data.client, { client: event.data.client, name: event.data.name ?? null });
      else if (event.kind === "leave") members.delete(event.data.client);
      notify();
    });
    const offSubscribed = this.on("subscribed", (/** @type {Frame} */ frame) => {
      if (frame.stream === stream) refresh();
    });
    const offState = this.on("state", (/** @type {StateChange} */ change) => {
      if (change.state === "open") refresh();
    });
    refresh();
    return () => {
      active = false;
      offPresence();
      offSubscribed();
      offState();
    };
  }

  /**
   * Record that this client has processed `stream` up to `seq`. Receipts only move
   * forward; a stream's are coalesced for `receiptDelayMs` into one frame, and one that
   * could not be sent goes out when the client is next open.
   * @param {string} stream @param {number} seq
   */
  receipt(stream, seq) {
    if ((this._receipts.get(stream) ?? -1) >= seq) return;
    this._receipts.set(stream, seq);
    if (this._receiptTimer === null && !this._stopped) {
      this._receiptTimer = setTimeout(() => {
        this._receiptTimer = null;
        this._flushReceipts();
      }, this.receiptDelayMs);
    }
  }

  _flushReceipts() {
    const conn = this._conn;
    if (!conn || conn.closed || this.state !== "open") return;
    for (const [stream, seq] of this._receipts) {
      if ((this._receiptsSent.get(stream) ?? -1) >= seq) continue;
      try {
        conn.sendFrame({ type: "receipt", stream, seq });
        this._receiptsSent.set(stream, seq);
      } catch {
        return; // closed: sent when next open
      }
    }
  }

  // --- events ---------------------------------------------------------------------------

  /** The last seq delivered on a stream (null: none yet). @param {string} stream */
  lastSeq(stream) {
    return this._streams.get(stream)?.lastSeq ?? null;
  }

  /**
   * A sequenced event (join/leave go to "presence").
   * @param {StreamEvent} event @param {Connection|null} [conn] the connection it came on
   */
  _onEvent(event, conn = null) {
    const tracked = this._streams.get(event.stream);
    if (!tracked) return; // unsubscribed: what was still in flight is not wanted
    if (tracked.resyncing) return; // a subscribe from lastSeq is coming; it delivers this again
    const seq = /** @type {number} */ (event.seq);
    const last = tracked.lastSeq;
    const through = tracked.compactThrough;
    if (event.kind === "reply.snapshot") {
      // Not a stored event: its seq is the last one it covers (maybe below `last`), and
      // taking it twice leaves the same text.
      if (last === null || seq > last) tracked.lastSeq = seq;
      this._deliver(tracked, event);
      return;
    }
    if (through !== null && seq >= through) tracked.compactThrough = null;
    if (last !== null && seq <= last) {
      this.duplicatesDropped += 1; // already delivered (a resume from a lagging checkpoint)
      return;
    }
    if (last !== null && seq > last + 1 && !(through !== null && seq <= through)) {
      // Lost in flight with the old socket: ask again from what we have.
      tracked.resyncing = true;
      this._resync(event.stream, conn ?? this._conn);
      return;
    }
    tracked.lastSeq = seq;
    this._deliver(tracked, event);
  }

  /**
   * Subscribe again from the last seq delivered, on the connection that showed the gap.
   * If it has closed, the next one takes over: it either restores the stream (its
   * `subscribed` ends the resync, and a gap there resyncs on it) or subscribes it anew.
   * @param {string} stream @param {Connection|null} conn
   */
  async _resync(stream, conn) {
    const tracked = this._streams.get(stream);
    if (!conn || conn.closed || !tracked) return;
    try {
      await conn.subscribe(stream, tracked.lastSeq, this.connectTimeoutMs, tracked.compact);
    } catch {
      // Closed meanwhile: the next connection takes over, as above.
    }
  }

  /** @param {Tracked} tracked @param {StreamEvent} event */
  _deliver(tracked, event) {
    if (isReplyKind(event.kind) && answersOwnSend(event, this.client)) {
      const collector = this._replies.get(event.cause?.message ?? "");
      if (collector && applyReplyEvent(collector.reply, event)) {
        if ((event.kind === "reply.delta" || event.kind === "reply.snapshot") && collector.onDelta) {
          try {
            collector.onDelta(event, collector.reply.text);
          } catch (error) {
            console.error("switchboard: an onDelta callback failed", error);
          }
        } else if (event.kind === "reply.restart" && collector.onRestart) {
          try {
            collector.onRestart(event, collector.reply);
          } catch (error) {
            console.error("switchboard: an onRestart callback failed", error);
          }
        } else if (event.kind.startsWith("tool.") && collector.onTool) {
          try {
            collector.onTool(event, collector.reply);
          } catch (error) {
            console.error("switchboard: an onTool callback failed", error);
          }
        }
        if (collector.reply.done) collector.finished.resolve(collector.reply);
      }
    }
    for (const handler of [...tracked.handlers]) {
      try {
        handler(event);
      } catch (error) {
        console.error("switchboard: a stream handler failed", error);
      }
    }
    this._emit("event", event);
  }

  /** @param {Frame} frame */
  _onFrame(frame) {
    const stream = frame.stream;
    if (frame.type === "error" && frame.code === "history_expired") {
      this.expired.push(frame);
      this._emit("expired", frame);
    }
    if (frame.type === "subscribed") {
      this._held.add(frame.stream); // written to the session before it is answered
      this._emit("subscribed", frame);
    }
    const tracked = stream !== undefined && stream !== null ? this._streams.get(stream) : undefined;
    if (!tracked) return;
    if (frame.type === "subscribed") {
      // Events follow from since + 1 when recovered, from head + 1 otherwise.
      // Compact only when it answers our own subscribe (a session's restored streams are
      // caught up in full).
      const asked = tracked.resyncing;
      tracked.resyncing = false;
      tracked.subscribed = frame;
      if (!frame.recovered) tracked.lastSeq = frame.head;
      tracked.compactThrough = tracked.compact && asked ? frame.head : null;
    } else if (frame.type === "error" && frame.code === "history_expired") {
      tracked.lastSeq = null; // go on from whatever the server sends next
    }
  }
}
