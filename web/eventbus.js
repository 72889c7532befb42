// eventbus.js: the browser (and Node) client of eventbus. No dependencies; an ES module.
//
//   import { EventBus } from "/eventbus.js";
//   const bus = new EventBus("wss://bus.example.com/v1/ws", { token: () => fetchToken() });
//   bus.subscribe("rooms.lobby", (event) => render(event), { after: 0 });
//   await bus.publish({ channel: "rooms.lobby", type: "message", data: { text: "hi" } });
//
// Every subscription remembers the last seq it delivered; after any drop (network, server restart,
// slow-consumer close) the client reconnects with backoff and jitter and resumes each subscription
// with `after`, so handlers see every event once, in seq order. Publishes get an `id` before they
// are first sent, so one re-sent after a reconnect is answered as a duplicate, never stored twice.

const PROTOCOL_CLOSE = { GOING_AWAY: 1001, UNAUTHORIZED: 4001, REFUSED: 4003, SLOW: 4008, TOO_LARGE: 4009 };

/** Delay before reconnect attempt `attempt` (0-based): exponential, capped, with jitter. */
export function backoffDelay(attempt, { initialMs = 250, maxMs = 10000 } = {}, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  // "Equal jitter": at least half the ceiling, so reconnect storms spread without starving.
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** Does subscription target `pattern` (a channel, or `*` / `>` pattern) cover `channel`? */
export function covers(pattern, channel) {
  const p = pattern.split(".");
  const c = channel.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return c.length > i;
    if (i >= c.length) return false;
    if (p[i] !== "*" && p[i] !== c[i]) return false;
  }
  return p.length === c.length;
}

class Subscription {
  constructor(bus, channel, handler, options) {
    this.bus = bus;
    this.channel = channel;
    this.handler = handler;
    this.compact = Boolean(options.compact);
    this.group = options.group;
    this.onError = options.onError;
    /** Last seq delivered per channel (patterns span channels); null: none yet. */
    this.delivered = new Map();
    if (options.after !== undefined && options.after !== null) {
      this.delivered.set(channel, options.after);
    }
    this.head = null;
    this.active = true;
  }

  /** The subscribe frame for (re)subscribing now. */
  frame() {
    const frame = { op: "subscribe", channel: this.channel };
    if (this.group) frame.group = this.group;
    const after = this.delivered.get(this.channel);
    if (after !== undefined && !this.group) {
      frame.after = after;
      // Compacted catch-up is for the first read; a resume needs every event after `after`.
      if (this.compact && !this.resumed) frame.compact = true;
    }
    return frame;
  }

  /** Delivers `event` unless it is not newer than what this subscription already delivered. */
  deliver(event) {
    const last = this.delivered.get(event.channel);
    if (last !== undefined && event.seq <= last) return false;
    this.delivered.set(event.channel, event.seq);
    try {
      this.handler(event);
    } catch (err) {
      this.bus._report(err);
    }
    return true;
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.bus._unsubscribe(this);
  }
}

export class EventBus extends EventTarget {
  /**
   * @param {string} url  the gateway's WebSocket URL (`ws(s)://host/v1/ws`)
   * @param {object} options
   *   token: a token, or a function (sync or async) returning one; called at every connect.
   *     None at all: the bus asks the app's connect hook, with the page's cookies, who this is
   *     (docs/protocol.md §9); the app's refusal (close 4003) ends the connection for good.
   *   refreshBeforeS: seconds before expiry to send a fresh token (default 60)
   *   backoff: { initialMs, maxMs }
   *   WebSocket: the WebSocket class (default: globalThis.WebSocket)
   *   transport: "auto" (WebSocket where there is one, else SSE), "websocket" or "sse"
   *   EventSource, fetch: for the SSE transport (defaults: the globals)
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    const transport = options.transport ?? "auto";
    this.sse = transport === "sse" || (transport === "auto" && !this.WebSocket);
    // The HTTP side of the same bus: /v1/sse and /v1/events next to /v1/ws.
    this.httpBase = options.httpUrl ?? url.replace(/^ws/, "http").replace(/\/v1\/ws$/, "");
    this.subscriptions = new Set();
    this.pending = new Map(); // ref -> { frame, resolve, reject }
    this.nextRef = 1;
    this.attempt = 0;
    this.state = "idle";
    this.socket = null;
    this.closedByUser = false;
    this.timers = new Set();
    this.identity = null;
  }

  /** Opens the connection (subscribe/publish also open it). Resolves once authenticated. */
  connect() {
    if (!this._welcomed) {
      this._welcomed = new Promise((resolve) => (this._resolveWelcome = resolve));
    }
    if (this.state === "idle" || this.state === "closed") {
      this.closedByUser = false;
      this._open();
    }
    return this._welcomed;
  }

  /**
   * Subscribes `handler(event)` to `channel`. Options: `after` (history from that seq; 0 for all),
   * `compact` (latest per key for that history), `group` (services), `onError(frame)`.
   * Returns a subscription with `unsubscribe()`.
   */
  subscribe(channel, handler, options = {}) {
    const sub = new Subscription(this, channel, handler, options);
    this.subscriptions.add(sub);
    if (this.sse) this._reopenSse();
    else if (this.state === "open") this._send(sub.frame());
    else this.connect();
    return sub;
  }

  /** Publishes one event; resolves with the ack (`{id, channel, seq, duplicate}`) once durable. */
  publish(event) {
    const withId = { ...event, id: event.id ?? randomId() };
    if (this.sse) return this._publishHttp(withId);
    const ref = `p${this.nextRef++}`;
    const frame = { op: "publish", event: withId, ref };
    return new Promise((resolve, reject) => {
      this.pending.set(ref, { frame, resolve, reject });
      if (this.state === "open") this._send(frame);
      else this.connect();
    });
  }

  /** Closes for good: no reconnect; pending publishes are rejected. */
  close() {
    this.closedByUser = true;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    if (this.socket) this.socket.close(1000, "client closed");
    this.source?.close();
    this.source = null;
    this._setState("closed");
    for (const [ref, p] of this.pending) {
      p.reject(new Error("closed before the publish was acknowledged"));
      this.pending.delete(ref);
    }
  }

  // Internals.

  _setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(Object.assign(new Event("state"), { state, ...detail }));
  }

  _report(error) {
    this.dispatchEvent(Object.assign(new Event("error"), { error }));
  }

  _later(ms, fn) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
    return timer;
  }

  async _token() {
    const t = this.options.token;
    return typeof t === "function" ? await t() : t;
  }

  async _open() {
    if (this.sse) return this._openSse();
    this._setState("connecting");
    const token = await this._tokenOrRetry();
    if (token === null || this.closedByUser) return;
    const socket = new this.WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => socket.send(JSON.stringify({ op: "hello", token }));
    socket.onmessage = (message) => {
      if (socket !== this.socket) return;
      let frame;
      try {
        frame = JSON.parse(typeof message.data === "string" ? message.data : String(message.data));
      } catch (error) {
        this._report(error);
        return;
      }
      this._onFrame(frame);
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      for (const timer of this.timers) clearTimeout(timer);
      this.timers.clear();
      if (this.closedByUser) return;
      this.dispatchEvent(Object.assign(new Event("disconnect"), { code: event.code, reason: event.reason }));
      if (event.code === PROTOCOL_CLOSE.REFUSED) {
        // The application said no: asking again would get the same answer.
        this._report(Object.assign(new Error(event.reason || "refused by the application"), { code: "refused" }));
        this.close();
        return;
      }
      this._scheduleReconnect();
    };
    socket.onerror = () => {}; // onclose follows and handles it
  }

  /** A token for a new connection, or null after scheduling a retry (the token source failed). */
  async _tokenOrRetry() {
    try {
      return await this._token();
    } catch (error) {
      this._report(error);
      this._scheduleReconnect();
      return null;
    }
  }

  _scheduleReconnect() {
    if (this.closedByUser) return;
    const delay = backoffDelay(this.attempt++, this.options.backoff);
    this._setState("reconnecting", { delay });
    this._later(delay, () => this._open());
  }

  _send(frame) {
    if (this.socket && this.state === "open") this.socket.send(JSON.stringify(frame));
  }

  _onFrame(frame) {
    switch (frame.op) {
      case "welcome":
        this.attempt = 0;
        this.identity = frame.identity;
        this._setState("open", { identity: frame.identity });
        for (const sub of this.subscriptions) {
          this._send(sub.frame());
          sub.resumed = true;
        }
        for (const p of this.pending.values()) this._send(p.frame);
        this._planRefresh(frame.expires_at);
        this._resolveWelcome?.(frame);
        return;
      case "subscribed":
        for (const sub of this.subscriptions) {
          if (sub.channel === frame.channel && !sub.delivered.has(sub.channel) && typeof frame.head === "number") {
            // Live from here: later resumes continue after this head.
            sub.delivered.set(sub.channel, frame.head);
          }
        }
        return;
      case "event": {
        const event = frame.event;
        for (const sub of this.subscriptions) {
          if (sub.active && covers(sub.channel, event.channel)) sub.deliver(event);
        }
        return;
      }
      case "ack": {
        const p = this.pending.get(frame.ref);
        if (p) {
          this.pending.delete(frame.ref);
          p.resolve({ id: frame.id, channel: frame.channel, seq: frame.seq, duplicate: frame.duplicate });
        }
        return;
      }
      case "refreshed":
        this._planRefresh(frame.expires_at);
        return;
      case "error": {
        const p = frame.ref !== undefined ? this.pending.get(frame.ref) : undefined;
        if (p && frame.code === "unavailable") {
          // Not stored: the same frame (same id) again shortly; it can never be stored twice.
          this._later(backoffDelay(1, this.options.backoff), () => this._send(p.frame));
          return;
        }
        if (p) {
          this.pending.delete(frame.ref);
          p.reject(Object.assign(new Error(frame.message), { code: frame.code }));
          return;
        }
        for (const sub of this.subscriptions) {
          if (frame.channel !== undefined && sub.channel === frame.channel) sub.onError?.(frame);
        }
        this._report(Object.assign(new Error(frame.message), { code: frame.code, frame }));
        return;
      }
      default:
        return;
    }
  }

  _unsubscribe(sub) {
    this.subscriptions.delete(sub);
    if (this.sse) {
      this._reopenSse();
      return;
    }
    const others = [...this.subscriptions].some((s) => s.channel === sub.channel);
    if (!others) this._send({ op: "unsubscribe", channel: sub.channel });
  }

  // The SSE transport: one EventSource for every subscription (channels only, no compaction). Its
  // URL carries each channel's position, so our own reconnects (fresh token, new channel set)
  // resume exactly like the browser's automatic ones with Last-Event-ID.

  _reopenSse() {
    if (this.closedByUser || this._reopenQueued) return;
    // Subscriptions made together (a page setting up) share one stream.
    this._reopenQueued = true;
    queueMicrotask(() => {
      this._reopenQueued = false;
      if (this.state === "idle" || this.state === "closed") this.connect();
      else if (this.state === "open" || this.state === "connecting") this._openSse();
    });
  }

  async _openSse() {
    this.source?.close();
    this.source = null;
    this._setState("connecting");
    const channels = [...new Set([...this.subscriptions].map((s) => s.channel))];
    if (channels.length === 0) {
      this._setState("open");
      this._resolveWelcome?.({ op: "welcome" });
      return;
    }
    const token = await this._tokenOrRetry();
    if (token === null || this.closedByUser) return;
    const positions = [];
    for (const channel of channels) {
      const known = [...this.subscriptions]
        .map((s) => s.delivered.get(channel))
        .filter((seq) => seq !== undefined);
      if (known.length) positions.push(`${channel}:${Math.min(...known)}`);
    }
    const query = channels.map((c) => `channel=${encodeURIComponent(c)}`);
    // Without a token, the bus asks the app's connect hook (the browser sends the page's cookies).
    if (token !== undefined) query.push(`token=${encodeURIComponent(token)}`);
    if (positions.length) query.push(`last_event_id=${encodeURIComponent(positions.join(","))}`);
    const source = new this.EventSource(`${this.httpBase}/v1/sse?${query.join("&")}`);
    this.source = source;
    source.onopen = () => {
      if (source !== this.source) return;
      this.attempt = 0;
      this._setState("open");
      this._resolveWelcome?.({ op: "welcome" });
    };
    source.addEventListener("positions", (message) => {
      if (source !== this.source) return;
      // Where the stream starts: channels we had no position for now have one.
      const start = JSON.parse(message.data);
      for (const sub of this.subscriptions) {
        if (!sub.delivered.has(sub.channel) && typeof start[sub.channel] === "number") {
          sub.delivered.set(sub.channel, start[sub.channel]);
        }
      }
    });
    source.onmessage = (message) => {
      if (source !== this.source) return;
      this._onFrame({ op: "event", event: JSON.parse(message.data) });
    };
    source.onerror = () => {
      if (source !== this.source) return;
      // CONNECTING: the browser retries by itself with Last-Event-ID. CLOSED: it gave up (an
      // expired token answers 401): ours is a fresh token and the positions we hold.
      if (source.readyState === 2) {
        source.close();
        this.source = null;
        this._scheduleReconnect();
      } else {
        this._setState("reconnecting");
      }
    };
  }

  async _publishHttp(event) {
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await this.fetch(`${this.httpBase}/v1/events`, {
          method: "POST",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${await this._token()}` },
          body: JSON.stringify(event),
        });
      } catch {
        response = null; // the network: the same id again, never stored twice
      }
      if (response?.ok) {
        const ack = (await response.json()).events[0];
        return { id: ack.id, channel: ack.channel, seq: ack.seq, duplicate: ack.duplicate };
      }
      if (response && response.status < 500) {
        const problem = await response.json().catch(() => ({}));
        throw Object.assign(new Error(problem.detail ?? response.statusText), {
          code: (problem.type ?? "").replace("urn:eventbus:problem:", ""),
        });
      }
      if (this.closedByUser) throw new Error("closed before the publish was acknowledged");
      await new Promise((resolve) => setTimeout(resolve, backoffDelay(attempt, this.options.backoff)));
    }
  }

  _planRefresh(expiresAt) {
    if (typeof this.options.token !== "function" || !expiresAt) return;
    const before = (this.options.refreshBeforeS ?? 60) * 1000;
    const inMs = Math.max(1000, expiresAt * 1000 - Date.now() - before);
    this._later(inMs, async () => {
      try {
        this._send({ op: "refresh", token: await this._token() });
      } catch (error) {
        this._report(error);
      }
    });
  }
}

export { PROTOCOL_CLOSE };

/**
 * Mints a token (`POST /v1/tokens`, docs/protocol.md §2): in a backend, with an API key or a
 * service token as `credential`, e.g. a client token for a browser:
 * `mintToken("https://bus.example.com", { sub: "alice", subscribe: ["orders"], ttl_s: 3600 }, { credential })`.
 * Resolves to `{ token, expires_at }`; rejects with an Error carrying the problem's `status`,
 * `type` and `field` when refused.
 */
export async function mintToken(baseUrl, claims = {}, { credential, fetch: fetchFn = globalThis.fetch } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (credential) headers.Authorization = `Bearer ${credential}`;
  const response = await fetchFn(`${baseUrl.replace(/\/+$/, "")}/v1/tokens`, {
    method: "POST",
    headers,
    body: JSON.stringify(claims),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(body.detail ?? `minting a token failed: ${response.status}`);
    Object.assign(err, { status: response.status, type: body.type, field: body.field });
    throw err;
  }
  return body;
}
