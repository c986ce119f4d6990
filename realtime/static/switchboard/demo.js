// @ts-check
// The demo page: chat with an agent through the JavaScript client, watch replies stream in,
// see who is here, drop the connection and flood the server to see recovery and 429s.
// Everything the page knows is also in window.__switchboardDebug (the browser tests read it).
import { ReplyAssembler, SwitchboardClient, SwitchboardError, isReplyKind } from "/client/switchboard.js";

const FLOOD_COUNT = 60;
const DEFAULT_STREAM = "lobby";
const STREAM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,199}$/;
const MAX_ITEMS = 500; // rendered events kept on the page
const STREAMS_KEY = "switchboard-demo-streams";
const CLIENT_KEY = "switchboard-demo-client";

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const params = new URLSearchParams(location.search);

/** @typedef {import("/client/switchboard.js").StreamEvent} StreamEvent */
/** @typedef {import("/client/switchboard.js").StateChange} StateChange */

const debug = {
  /** @type {SwitchboardClient|null} */
  client: null,
  /** @type {StateChange[]} */
  states: [],
  /** @type {Record<string, number[]>} seqs of stored events delivered per stream, in
   * delivery order (a reply.snapshot is not one: it is in `events`, not here) */
  seqs: {},
  /** @type {number} the compact catch-up's end (its `subscribed` head): seqs up to it may
   * skip deltas folded into a snapshot or a reply.done */
  compactThrough: 0,
  /** @type {Record<string, any[]>} events delivered per stream (kind, seq, id, data) */
  events: {},
  /** @type {string|null} */
  stream: null,
  subscribed: false,
  rateLimited: 0,
  /** @type {number[]} retry_after_ms of each 429 */
  retryAfterMs: [],
  flood: { sent: 0, acked: 0, failed: 0, done: false },
  /** @type {{client: string, name: string|null}[]} */
  presence: [],
  get state() {
    return this.client ? this.client.state : "idle";
  },
  get reconnects() {
    return this.client ? this.client.reconnects : 0;
  },
};
// @ts-ignore - for the tests and the curious
window.__switchboardDebug = debug;

// --- the token -------------------------------------------------------------------------

/** @typedef {{token: string, client: string, name: string, expires_at: number, agents: string[], unavailable?: Record<string, string>}} Grant */
/** @type {Grant|null} */
let grant = null;

/** @param {string|null} client @param {string|null} name @returns {Promise<Grant>} */
async function fetchGrant(client, name) {
  const response = await fetch("/demo/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ client, name }),
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `token request failed (${response.status})`);
  return body;
}

/** The token for each connection attempt: the one we have while it has a minute left. */
async function token() {
  if (!grant || grant.expires_at * 1000 - Date.now() < 60_000) {
    grant = await fetchGrant(grant ? grant.client : null, grant ? grant.name : null);
  }
  return grant.token;
}

// --- small helpers -----------------------------------------------------------------------

/** @param {string} tag @param {Record<string, string>} [attrs] @param {(Node|string)[]} [children] */
function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

/** @param {string} text @param {string} [tone] */
function activity(text, tone = "") {
  const list = $("activity");
  const time = new Date().toLocaleTimeString([], { hour12: false });
  list.prepend(el("li", tone ? { class: tone } : {}, [el("time", {}, [time]), text]));
  while (list.children.length > 200) list.lastElementChild?.remove();
}

/** Display names of the clients seen in presence (events carry only client ids). */
/** @type {Map<string, string>} */
const names = new Map();

/** @param {string} from `client:ID` or `agent:NAME` */
const who = (from) => {
  const id = from.replace(/^(client|agent):/, "");
  return from.startsWith("client:") ? names.get(id) ?? id : id;
};

// --- streams -------------------------------------------------------------------------------

/** @returns {string[]} */
function knownStreams() {
  try {
    const saved = JSON.parse(localStorage.getItem(STREAMS_KEY) || "[]");
    if (Array.isArray(saved)) return saved.filter((s) => typeof s === "string" && STREAM_NAME.test(s));
  } catch {
    // Unreadable: start again.
  }
  return [];
}

/** @param {string} stream */
function rememberStream(stream) {
  const streams = knownStreams().filter((s) => s !== stream);
  streams.unshift(stream);
  try {
    localStorage.setItem(STREAMS_KEY, JSON.stringify(streams.slice(0, 12)));
  } catch {
    // Private mode: the list is just not kept.
  }
}

function renderStreams() {
  const list = $("streams");
  list.replaceChildren();
  const streams = knownStreams();
  if (!streams.includes(DEFAULT_STREAM)) streams.push(DEFAULT_STREAM);
  for (const stream of streams) {
    const link = el("a", { href: `?stream=${encodeURIComponent(stream)}`, "data-stream": stream }, [`#${stream}`]);
    if (stream === debug.stream) link.setAttribute("aria-current", "true");
    link.addEventListener("click", (event) => {
      event.preventDefault();
      openStream(stream);
    });
    list.append(el("li", {}, [link]));
  }
}

// --- the event list ----------------------------------------------------------------------

const assembler = new ReplyAssembler();
/** @type {Map<string, HTMLElement>} run id -> its reply item */
const replyItems = new Map();

function scrolledToBottom() {
  const list = $("events");
  return list.scrollHeight - list.scrollTop - list.clientHeight < 60;
}

/** @param {HTMLElement} item @param {boolean} follow */
function addItem(item, follow) {
  const list = $("events");
  list.append(item);
  while (list.children.length > MAX_ITEMS) list.firstElementChild?.remove();
  if (follow) list.scrollTop = list.scrollHeight;
}

/** @param {HTMLElement} item @param {number} seq */
function noteSeq(item, seq) {
  const first = item.dataset.firstSeq || String(seq);
  item.dataset.firstSeq = first;
  item.dataset.seq = String(seq);
  const label = item.querySelector(".seq");
  if (label) label.textContent = first === String(seq) ? `#${seq}` : `#${first}–${seq}`;
}

/** @param {StreamEvent} event */

function onEvent(event) {
  if (event.stream !== debug.stream) return;
  const seq = /** @type {number} */ (event.seq);
  if (event.kind !== "reply.snapshot") (debug.seqs[event.stream] ||= []).push(seq);
  (debug.events[event.stream] ||= []).push({ seq, kind: event.kind, id: event.id, from: event.from, data: event.data });
  const follow = scrolledToBottom();
  const mine = event.cause && event.cause.client === debug.client?.client;

  if (event.kind === "message") {
    const item = el("li", { class: `msg${event.from === `client:${debug.client?.client}` ? " mine" : ""}`, "data-kind": "message" }, [
      el("div", { class: "meta" }, [`${who(event.from)} → ${event.data.agent}`, el("span", { class: "seq" })]),
      el("div", { class: "bubble" }, [String(event.data.text ?? "")]),
    ]);
    noteSeq(item, seq);
    addItem(item, follow);
  } else if (event.kind === "published") {
    const data = event.data && typeof event.data === "object" && "text" in event.data ? String(event.data.text) : JSON.stringify(event.data);
    const item = el("li", { class: "published", "data-kind": "published" }, [
      `${who(event.from)} published `,
      el("span", { class: "data" }, [data]),
      el("span", { class: "seq" }),
    ]);
    noteSeq(item, seq);
    addItem(item, follow);
  } else if (isReplyKind(event.kind)) {
    const reply = assembler.add(event);
    if (!reply || !reply.run) return;
    let item = replyItems.get(reply.run);
    if (!item || !item.isConnected) {
      const cause = reply.cause || { client: null };
      item = el("li", { class: "reply", "data-kind": "reply", "data-run": reply.run, "data-status": "streaming" }, [
        el("div", { class: "meta" }, [
          `${reply.agent} → ${cause.client ? who(`client:${cause.client}`) : "?"}${mine ? " (you)" : ""}`,
          el("span", { class: "status-tag" }),
          el("span", { class: "restart-tag", hidden: "" }),
          el("span", { class: "seq" }),
        ]),
        el("ul", { class: "tools", hidden: "" }),
        el("div", { class: "bubble" }),
      ]);
      replyItems.set(reply.run, item);
      addItem(item, follow);
    }
    /** @type {HTMLElement} */ (item.querySelector(".bubble")).textContent = reply.text;
    renderTools(/** @type {HTMLElement} */ (item.querySelector(".tools")), reply.tools);
    if (event.kind === "tool.result" && event.data && !event.data.ok) {
      activity(`${reply.agent}'s tool ${event.data.name} failed: ${event.data.error}`, "bad");
    }
    if (reply.restarts) {
      // The model's answer so far was void (a retried call answered differently): the
      // bubble starts again from nothing, and says so.
      item.dataset.restarts = String(reply.restarts);
      const tag = /** @type {HTMLElement} */ (item.querySelector(".restart-tag"));
      tag.hidden = false;
      tag.textContent = reply.restarts === 1 ? "↻ restarted" : `↻ restarted ×${reply.restarts}`;
      tag.title = `the answer so far was discarded and started again (attempt ${reply.attempt ?? "?"})`;
      if (event.kind === "reply.restart") activity(`${reply.agent}'s answer restarted (attempt ${reply.attempt ?? "?"})`);
    }
    if (event.kind === "reply.snapshot") {
      // Caught up in one piece: the answer so far, then the live pieces.
      item.dataset.hydrated = "true";
      item.title = `caught up at seq ${seq}: the answer so far in one piece`;
    }
    noteSeq(item, seq);
    if (reply.done) {
      item.dataset.status = reply.status || "done";
      const tag = /** @type {HTMLElement} */ (item.querySelector(".status-tag"));
      tag.textContent = reply.status === "ok" ? "✓" : String(reply.status);
      tag.className = `status-tag ${reply.status === "ok" ? "ok" : "other"}`;
      const why = reason(reply.done.data?.detail);
      if (reply.status !== "ok" && why && !item.querySelector(".reason")) item.append(el("div", { class: "reason" }, [why]));
    }
    if (follow) $("events").scrollTop = $("events").scrollHeight;
  }
  debug.client?.receipt(event.stream, seq);
  updateSeqCheck();
}

const MAX_SHOWN_CHARS = 300; // of a tool's arguments or result, in the list

/** @param {string} text */
function clip(text) {
  return text.length > MAX_SHOWN_CHARS ? `${text.slice(0, MAX_SHOWN_CHARS)}…` : text;
}

/**
 * A reply's tool calls, each with its result once it came (text only: never markup).
 * @param {HTMLElement} list @param {import("/client/switchboard.js").ToolCallView[]} tools
 */
function renderTools(list, tools) {
  list.hidden = tools.length === 0;
  list.replaceChildren(
    ...tools.map((tool) => {
      const state = tool.ok === null ? "running" : tool.ok ? "ok" : "error";
      const args = tool.arguments === null ? "invalid arguments" : clip(JSON.stringify(tool.arguments));
      const outcome =
        tool.ok === null ? "…" : tool.ok ? clip(tool.text ?? "") : `${tool.error}: ${clip(tool.text ?? "")}`;
      return el("li", { class: `tool ${state}`, "data-call": tool.call, "data-state": state }, [
        el("span", { class: "tool-label" }, ["tool "]),
        el("span", { class: "tool-name" }, [tool.name ?? "?"]),
        el("span", { class: "tool-args" }, [`(${args})`]),
        el("span", { class: "tool-result" }, [` → ${outcome}${tool.truncated ? " [cut]" : ""}`]),
      ]);
    }),
  );
}

/**
 * Why a run did not end `ok`, for people: the reply.done detail's message (`model not
 * configured`, `timeout`, `provider error 500`), else its reason code; the step, if named.
 * @param {any} detail
 */
function reason(detail) {
  if (!detail || typeof detail !== "object") return "";
  const why = String(detail.message || detail.reason || "");
  return why && detail.step ? `${why} (step ${detail.step})` : why;
}

/** @param {StreamEvent} event */
function onPresenceEvent(event) {
  if (event.stream !== debug.stream || !event.data) return;
  if (event.data.name) names.set(event.data.client, event.data.name);
  const verb = event.kind === "join" ? "joined" : "left";
  addItem(el("li", { class: "system", "data-kind": event.kind }, [`${event.data.name || event.data.client} ${verb}`]), scrolledToBottom());
}

function updateSeqCheck() {
  const stream = debug.stream;
  const seqs = stream ? debug.seqs[stream] || [] : [];
  const node = $("seq-check");
  if (!seqs.length) {
    node.textContent = "no events yet";
    node.className = "";
    return;
  }
  let gaps = 0;
  let repeats = 0;
  for (let i = 1; i < seqs.length; i += 1) {
    if (seqs[i] <= seqs[i - 1]) repeats += 1;
    else if (seqs[i] !== seqs[i - 1] + 1 && seqs[i] - 1 > debug.compactThrough) gaps += 1;
  }
  const range = `#${seqs[0]}–${seqs[seqs.length - 1]}`;
  node.textContent = gaps || repeats ? `${range}: ${gaps} gaps, ${repeats} repeats` : `${range} in order, none missed or repeated`;
  node.className = gaps || repeats ? "bad" : "good";
  $("head-info").textContent = `last seq ${seqs[seqs.length - 1]}`;
}

// --- presence ------------------------------------------------------------------------------

/** @type {(() => void)|null} */
let stopWatching = null;

/** @param {{client: string, name: string|null}[]} members */
function renderPresence(members) {
  debug.presence = members;
  for (const member of members) if (member.name) names.set(member.client, member.name);
  const list = $("presence");
  list.replaceChildren(
    ...members.map((member) => {
      const label = member.name && member.name !== member.client ? `${member.name} (${member.client})` : member.client;
      const item = el("li", { "data-client": member.client }, [label]);
      if (member.client === debug.client?.client) item.append(el("span", { class: "you" }, ["you"]));
      return item;
    }),
  );
  $("presence-count").textContent = String(members.length);
}

// --- opening a stream ----------------------------------------------------------------------

/** @param {string} stream */
async function openStream(stream) {
  const client = debug.client;
  if (!client || stream === debug.stream) return;
  const previous = debug.stream;
  if (stopWatching) stopWatching();
  if (previous) client.unsubscribe(previous).catch(() => {});
  debug.stream = stream;
  debug.subscribed = false;
  debug.seqs[stream] = [];
  debug.events[stream] = [];
  document.body.dataset.stream = stream;
  delete document.body.dataset.subscribed;
  replyItems.clear();
  $("events").replaceChildren();
  $("stream-title").textContent = `#${stream}`;
  $("head-info").textContent = "";
  rememberStream(stream);
  renderStreams();
  renderPresence([]);
  updateSeqCheck();
  const url = new URL(location.href);
  url.searchParams.set("stream", stream);
  history.replaceState(null, "", url);
  stopWatching = client.watchPresence(stream, renderPresence);
  try {
    // since 0: the stream's whole retained history, then live events; compact: each
    // finished reply as its reply.done, one streaming as a snapshot, not every delta.
    const answer = await client.subscribe(stream, onEvent, { since: 0, compact: true });
    if (debug.stream !== stream) return;
    debug.subscribed = true;
    document.body.dataset.subscribed = "true";
    activity(`subscribed to #${stream} (head ${answer.head ?? "?"})`);
  } catch (error) {
    activity(`subscribing to #${stream} failed: ${error}`, "bad");
  }
}

// --- sending, dropping, flooding -----------------------------------------------------------

/** @param {SubmitEvent} event */
async function onSend(event) {
  event.preventDefault();
  const client = debug.client;
  const input = /** @type {HTMLInputElement} */ ($("text"));
  const text = input.value.trim();
  if (!client || !debug.stream || !text) return;
  input.value = "";
  const agent = /** @type {HTMLSelectElement} */ ($("agent")).value;
  /** @type {Record<string, number>|undefined} */
  let options;
  if (agent === "echo") {
    const chunks = Number(/** @type {HTMLInputElement} */ ($("chunks")).value) || 1;
    const delay = Number(/** @type {HTMLInputElement} */ ($("delay")).value) || 0;
    options = { chunks, chunk_delay_ms: delay };
  }
  try {
    const ack = await client.send(debug.stream, agent, text, { options });
    if (ack.duplicate) activity(`message ${ack.id} was already accepted (seq ${ack.seq})`);
  } catch (error) {
    const detail = error instanceof SwitchboardError ? `${error.code}: ${error.detail}` : String(error);
    activity(`send refused — ${detail}`, "bad");
  }
}

async function flood() {
  const client = debug.client;
  const stream = debug.stream;
  if (!client || !stream) return;
  const button = /** @type {HTMLButtonElement} */ ($("flood"));
  button.disabled = true;
  const before = debug.rateLimited;
  debug.flood = { sent: FLOOD_COUNT, acked: 0, failed: 0, done: false };
  const show = () => {
    const f = debug.flood;
    $("flood-status").textContent = `${f.acked}/${f.sent} acked${f.failed ? `, ${f.failed} failed` : ""}, ${debug.rateLimited - before} × 429`;
  };
  show();
  activity(`flood: publishing ${FLOOD_COUNT} messages at once`);
  const batch = Date.now().toString(36);
  await Promise.all(
    Array.from({ length: FLOOD_COUNT }, (_, index) =>
      client
        .publish(stream, { text: `flood ${index + 1}/${FLOOD_COUNT}`, batch })
        .then(() => {
          debug.flood.acked += 1;
        })
        .catch((error) => {
          debug.flood.failed += 1;
          activity(`flood message ${index + 1} failed: ${error}`, "bad");
        })
        .finally(show),
    ),
  );
  debug.flood.done = true;
  activity(`flood: ${debug.flood.acked} acked, each once; ${debug.rateLimited - before} answers were 429 and retried after retry_after_ms`);
  button.disabled = false;
}

// --- connection state ------------------------------------------------------------------------

/** @param {StateChange} change */
function onState(change) {
  debug.states.push(change);
  document.body.dataset.state = change.state;
  const badge = $("state");
  badge.textContent = change.state;
  badge.dataset.state = change.state;
  $("reconnects").textContent = String(change.reconnects);
  if (change.state === "open") {
    const resumed = change.resumed ? "resumed" : "new";
    $("resumed").textContent = `${resumed} (${debug.client?.session?.slice(0, 8) ?? "?"}…)`;
    activity(change.reconnects ? `open again — session ${resumed}, reconnect #${change.reconnects}` : "open", "good");
  } else if (change.state === "reconnecting") {
    $("last-close").textContent = `${change.closeCode}${change.reason ? ` (${change.reason})` : ""}`;
    activity(`connection lost (close ${change.closeCode}${change.reason ? `: ${change.reason}` : ""}); reconnecting`, "bad");
  } else if (change.state === "closed") {
    $("last-close").textContent = `${change.closeCode} (${change.reason})`;
    activity(`closed for good: ${change.reason}`, "bad");
  }
}

// --- start -----------------------------------------------------------------------------------

async function main() {
  $("new-stream").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($("stream-name"));
    const stream = input.value.trim();
    if (!STREAM_NAME.test(stream)) {
      activity(`'${stream}' is not a stream name: letters, digits and _ . : @ / + = -`, "bad");
      return;
    }
    input.value = "";
    openStream(stream);
  });
  $("composer").addEventListener("submit", (event) => onSend(/** @type {SubmitEvent} */ (event)));
  $("drop").addEventListener("click", () => {
    activity("dropping the connection");
    debug.client?.drop();
  });
  $("flood").addEventListener("click", () => flood());
  $("agent").addEventListener("change", () => {
    $("echo-options").hidden = /** @type {HTMLSelectElement} */ ($("agent")).value !== "echo";
  });

  const requested = params.get("client") || sessionStorage.getItem(CLIENT_KEY);
  let first;
  try {
    first = await fetchGrant(requested, params.get("name"));
  } catch (error) {
    activity(`no demo token: ${error instanceof Error ? error.message : error}`, "bad");
    $("state").textContent = "no token";
    return;
  }
  grant = first;
  // Kept per tab: a reload is the same person, another tab another one.
  sessionStorage.setItem(CLIENT_KEY, first.client);
  names.set(first.client, first.name);
  $("me").textContent = first.name && first.name !== first.client ? `${first.name} (${first.client})` : first.client;
  const select = /** @type {HTMLSelectElement} */ ($("agent"));
  // Agents that can only answer with their fallback (no model configured) stay choosable,
  // so their degraded reply can be seen, but the menu says why they will not answer.
  const unavailable = first.unavailable || {};
  select.replaceChildren(
    ...first.agents.map((agent) =>
      unavailable[agent]
        ? el("option", { value: agent, "data-unavailable": unavailable[agent] }, [`${agent} — ${unavailable[agent]}`])
        : el("option", { value: agent }, [agent]),
    ),
  );

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const client = new SwitchboardClient(`${scheme}://${location.host}/ws/v1/`, token, { onState });
  debug.client = client;
  client.on("presence", onPresenceEvent);
  // Before the catch-up's events: their seqs may skip what was folded, up to this head.
  client.on("subscribed", (/** @type {any} */ frame) => {
    if (frame.stream === debug.stream) debug.compactThrough = frame.head ?? 0;
  });
  client.on("retry", (/** @type {import("/client/switchboard.js").RetryInfo} */ info) => {
    if (info.status === 429) {
      debug.rateLimited += 1;
      if (info.retryAfterMs !== null) debug.retryAfterMs.push(info.retryAfterMs);
      $("rate-limited").textContent = `${debug.rateLimited} — last asked ${info.retryAfterMs} ms, waited ${Math.round(info.delayMs)}`;
    }
  });
  client.on("expired", (/** @type {any} */ frame) => activity(`#${frame.stream}: older events no longer retained; going on from seq ${frame.head}`));
  client.on("error", (/** @type {any} */ frame) => activity(`server: ${frame.code} — ${frame.detail}`, "bad"));
  try {
    await client.start();
  } catch (error) {
    activity(`could not connect: ${error}`, "bad");
    return;
  }
  const wanted = params.get("stream") || knownStreams()[0] || DEFAULT_STREAM;
  await openStream(STREAM_NAME.test(wanted) ? wanted : DEFAULT_STREAM);
}

main();
