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

const PROTOCOL_CLOSE = { GOING_AWAY: 1001, UNAUTHORIZED: 4001, SLOW: 4008, TOO_LARGE: 4009 };

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
   *   token: a token, or a function (sync or async) returning one; called at every connect
   *   refreshBeforeS: seconds before expiry to send a fresh token (default 60)
   *   backoff: { initialMs, maxMs }
   *   WebSocket: the WebSocket class (default: globalThis.WebSocket)
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
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
    if (this.state === "open") this._send(sub.frame());
    else this.connect();
    return sub;
  }

  /** Publishes one event; resolves with the ack (`{id, channel, seq, duplicate}`) once durable. */
  publish(event) {
    const withId = { ...event, id: event.id ?? randomId() };
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
    this._setState("connecting");
    let token;
    try {
      token = await this._token();
    } catch (error) {
      this._report(error);
      this._scheduleReconnect();
      return;
    }
    if (this.closedByUser) return;
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
      this._scheduleReconnect();
    };
    socket.onerror = () => {}; // onclose follows and handles it
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
    const others = [...this.subscriptions].some((s) => s.channel === sub.channel);
    if (!others) this._send({ op: "unsubscribe", channel: sub.channel });
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
