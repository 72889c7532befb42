// Unit tests of eventbus.js's reconnect, resume, ordering and publish logic, under Node's test
// runner, against a scripted stand-in for the WebSocket (the browser tests use the real server).
import { test } from "node:test";
import assert from "node:assert/strict";
import { EventBus, backoffDelay, covers } from "../eventbus.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = false;
    FakeSocket.all.push(this);
    queueMicrotask(() => this.onopen?.());
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close() { this.closed = true; }
  // The server's side.
  push(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code = 1006) { this.onclose?.({ code, reason: "" }); }
  ops() { return this.sent.map((f) => f.op); }
}

const until = async (what, check) => {
  const deadline = Date.now() + 2000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
};

const newBus = (options = {}) => {
  FakeSocket.all = [];
  let tokens = 0;
  return new EventBus("ws://bus/v1/ws", {
    WebSocket: FakeSocket,
    token: () => `token-${++tokens}`,
    backoff: { initialMs: 1, maxMs: 4 },
    ...options,
  });
};

const event = (seq, channel = "room") => ({ op: "event", event: { seq, channel, id: `e${seq}`, type: "t" } });

test("backoff grows, is capped, and is jittered within the upper half", () => {
  const opts = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, opts, () => 0), 50);
  assert.equal(backoffDelay(0, opts, () => 1), 100);
  assert.equal(backoffDelay(3, opts, () => 1), 800);
  assert.equal(backoffDelay(10, opts, () => 1), 1000);
  assert.equal(backoffDelay(10, opts, () => 0), 500);
});

test("patterns cover channels as the server's do", () => {
  assert.ok(covers("orders", "orders"));
  assert.ok(!covers("orders", "orders.eu"));
  assert.ok(covers("orders.*", "orders.eu"));
  assert.ok(!covers("orders.*", "orders.eu.1"));
  assert.ok(covers("orders.>", "orders.eu.1"));
  assert.ok(!covers("orders.>", "orders"));
});

test("a dropped connection resumes every subscription after the last delivered seq", async () => {
  const bus = newBus();
  const seen = [];
  bus.subscribe("room", (e) => seen.push(e.seq));
  await until("first socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const first = FakeSocket.all[0];
  assert.deepEqual(first.sent[0], { op: "hello", token: "token-1" });
  first.push({ op: "welcome", identity: "alice", expires_at: 0 });
  assert.deepEqual(first.sent[1], { op: "subscribe", channel: "room" });
  first.push({ op: "subscribed", channel: "room", head: 4 });
  first.push(event(5));
  first.push(event(6));
  first.drop();

  await until("second socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length === 1);
  const second = FakeSocket.all[1];
  assert.equal(second.sent[0].token, "token-2", "a fresh token at every connect");
  second.push({ op: "welcome", identity: "alice", expires_at: 0 });
  assert.deepEqual(second.sent[1], { op: "subscribe", channel: "room", after: 6 });
  second.push({ op: "subscribed", channel: "room", head: 8 });
  // A server that repeats itself changes nothing for the application.
  second.push(event(6));
  second.push(event(7));
  second.push(event(8));
  assert.deepEqual(seen, [5, 6, 7, 8]);
  bus.close();
});

test("events reach handlers once and in seq order, per channel of a pattern", async () => {
  const bus = newBus();
  const seen = [];
  bus.subscribe("room.*", (e) => seen.push(`${e.channel}#${e.seq}`));
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const s = FakeSocket.all[0];
  s.push({ op: "welcome", identity: "svc", expires_at: 0 });
  for (const [seq, ch] of [[1, "room.a"], [1, "room.b"], [1, "room.a"], [2, "room.a"], [2, "room.b"], [1, "room.b"], [3, "other.x"]]) {
    s.push(event(seq, ch));
  }
  assert.deepEqual(seen, ["room.a#1", "room.b#1", "room.a#2", "room.b#2"]);
  bus.close();
});

test("history from after, compacted only on the first read", async () => {
  const bus = newBus();
  bus.subscribe("board", () => {}, { after: 0, compact: true });
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const s = FakeSocket.all[0];
  s.push({ op: "welcome", identity: "a", expires_at: 0 });
  assert.deepEqual(s.sent[1], { op: "subscribe", channel: "board", after: 0, compact: true });
  s.push(event(3, "board"));
  s.drop();
  await until("second socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length === 1);
  FakeSocket.all[1].push({ op: "welcome", identity: "a", expires_at: 0 });
  assert.deepEqual(FakeSocket.all[1].sent[1], { op: "subscribe", channel: "board", after: 3 });
  bus.close();
});

test("a publish survives a reconnect with the same id and resolves on the ack", async () => {
  const bus = newBus();
  const acked = bus.publish({ channel: "room", type: "said", data: "hi" });
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const first = FakeSocket.all[0];
  first.push({ op: "welcome", identity: "a", expires_at: 0 });
  const sent = first.sent.find((f) => f.op === "publish");
  assert.ok(sent.event.id, "an id is given before the first send");
  first.drop(); // no ack: was it stored? The retry says.
  await until("second socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length === 1);
  const second = FakeSocket.all[1];
  second.push({ op: "welcome", identity: "a", expires_at: 0 });
  const again = second.sent.find((f) => f.op === "publish");
  assert.equal(again.event.id, sent.event.id);
  second.push({ op: "ack", ref: again.ref, id: again.event.id, channel: "room", seq: 9, duplicate: true });
  assert.deepEqual(await acked, { id: sent.event.id, channel: "room", seq: 9, duplicate: true });
  bus.close();
});

test("a refused publish rejects with the error's code", async () => {
  const bus = newBus();
  const refused = bus.publish({ channel: "secret", type: "t" });
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const s = FakeSocket.all[0];
  s.push({ op: "welcome", identity: "a", expires_at: 0 });
  const frame = s.sent.find((f) => f.op === "publish");
  s.push({ op: "error", ref: frame.ref, code: "forbidden", message: "no" });
  await assert.rejects(refused, (err) => err.code === "forbidden");
  bus.close();
});

test("the token is refreshed before it expires", async () => {
  const bus = newBus({ refreshBeforeS: 0 });
  bus.connect();
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const s = FakeSocket.all[0];
  s.push({ op: "welcome", identity: "a", expires_at: Math.ceil(Date.now() / 1000) + 1 });
  await until("refresh", () => s.ops().includes("refresh"));
  assert.equal(s.sent.find((f) => f.op === "refresh").token, "token-2");
  bus.close();
});

test("unsubscribe tells the server, and no more events reach the handler", async () => {
  const bus = newBus();
  const seen = [];
  const sub = bus.subscribe("room", (e) => seen.push(e.seq));
  await until("socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  const s = FakeSocket.all[0];
  s.push({ op: "welcome", identity: "a", expires_at: 0 });
  s.push(event(1));
  sub.unsubscribe();
  s.push(event(2));
  assert.deepEqual(seen, [1]);
  assert.deepEqual(s.sent.at(-1), { op: "unsubscribe", channel: "room" });
  bus.close();
});

class FakeEventSource {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.listeners = {};
    FakeEventSource.all.push(this);
  }
  addEventListener(name, fn) { this.listeners[name] = fn; }
  close() { this.readyState = 2; }
  // The server's side.
  open() { this.readyState = 1; this.onopen?.(); }
  positions(map) { this.listeners.positions?.({ data: JSON.stringify(map) }); }
  event(seq, channel) { this.onmessage?.({ data: JSON.stringify({ seq, channel, id: `e${seq}`, type: "t" }) }); }
  fail() { this.readyState = 2; this.onerror?.(); }
}

test("without WebSocket, SSE carries subscriptions and resumes them from their positions", async () => {
  FakeEventSource.all = [];
  let tokens = 0;
  const bus = new EventBus("wss://bus.example/v1/ws", {
    transport: "auto",
    WebSocket: null,
    EventSource: FakeEventSource,
    token: () => `t${++tokens}`,
    backoff: { initialMs: 1, maxMs: 4 },
  });
  const seen = [];
  bus.subscribe("news.a", (e) => seen.push(`a${e.seq}`));
  bus.subscribe("news.b", (e) => seen.push(`b${e.seq}`), { after: 0 });
  await until("an event source", () => FakeEventSource.all.length >= 1 && FakeEventSource.all.at(-1).url.searchParams.getAll("channel").length === 2);
  const first = FakeEventSource.all.at(-1);
  assert.equal(first.url.origin + first.url.pathname, "https://bus.example/v1/sse");
  assert.equal(first.url.searchParams.get("last_event_id"), "news.b:0", "only b has a position yet");
  first.open();
  first.positions({ "news.a": 7, "news.b": 0 });
  first.event(8, "news.a");
  first.event(1, "news.b");
  first.event(8, "news.a"); // a repeat changes nothing
  first.fail(); // e.g. the token expired: the browser gave up
  await until("a new event source", () => FakeEventSource.all.at(-1) !== first);
  const second = FakeEventSource.all.at(-1);
  assert.notEqual(second.url.searchParams.get("token"), first.url.searchParams.get("token"), "a fresh token");
  assert.equal(FakeEventSource.all.length, 2, "subscriptions made together share one stream");
  assert.equal(second.url.searchParams.get("last_event_id"), "news.a:8,news.b:1");
  second.open();
  second.event(9, "news.a");
  assert.deepEqual(seen, ["a8", "b1", "a9"]);
  bus.close();
});

test("over SSE, publishes go through POST /v1/events, retried with the same id", async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, body: JSON.parse(init.body), auth: init.headers.Authorization });
    if (calls.length === 1) throw new TypeError("network down");
    if (calls.length === 2) return { ok: false, status: 503, json: async () => ({}) };
    const e = calls.at(-1).body;
    return { ok: true, status: 200, json: async () => ({ events: [{ id: e.id, channel: e.channel, seq: 3, duplicate: false }] }) };
  };
  const bus = new EventBus("ws://bus/v1/ws", { transport: "sse", EventSource: FakeEventSource, fetch, token: "tok", backoff: { initialMs: 1, maxMs: 2 } });
  const ack = await bus.publish({ channel: "news.a", type: "t" });
  assert.equal(calls.length, 3);
  assert.equal(calls[0].url, "http://bus/v1/events");
  assert.equal(calls[0].auth, "Bearer tok");
  assert.ok(calls.every((c) => c.body.id === ack.id), "one id for every attempt");
  assert.equal(ack.seq, 3);
  const refusing = new EventBus("ws://bus/v1/ws", {
    transport: "sse", EventSource: FakeEventSource, token: "tok",
    fetch: async () => ({ ok: false, status: 403, statusText: "Forbidden", json: async () => ({ type: "urn:eventbus:problem:forbidden", detail: "no" }) }),
  });
  await assert.rejects(refusing.publish({ channel: "x", type: "t" }), (err) => err.code === "forbidden");
  bus.close();
  refusing.close();
});
