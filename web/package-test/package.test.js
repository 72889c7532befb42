// The npm package as a user gets it: `npm pack`, installed from the tarball into a fresh project,
// imported by its name from Node, and run against a real all-in-one bus that is killed (-9) and
// started again mid-stream. The subscriber must see every event once, in seq order, across the
// restart, and its own publish must be acknowledged.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { BIN, root, freePort, until } from "../browser-test/support.js";

const temp = mkdtempSync(join(tmpdir(), "eventbus-package-"));
const children = [];
after(() => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  rmSync(temp, { recursive: true, force: true });
});

// Global WebSocket is in Node 22; Node 20.10+ has it behind a flag (the package says so).
const nodeFlags = typeof WebSocket === "undefined" ? ["--experimental-websocket"] : [];

function startBus(port, data) {
  const bus = spawn(BIN, ["serve", "--dev", "--listen", `127.0.0.1:${port}`, "--data", data], {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, EVENTBUS_LOG: "warn" },
  });
  children.push(bus);
  return bus;
}

async function publish(url, n) {
  const token = (await (await fetch(`${url}/v1/tokens`, { method: "POST" })).json()).token;
  const response = await fetch(`${url}/v1/events`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ channel: "pkg.orders", type: "order.placed", data: { n } }),
  });
  assert.equal(response.status, 200, await response.text());
}

// What the installed package runs: imports by name (both entry points), subscribes from the
// start, publishes once, and prints every event it is handed as one line of JSON.
const consumer = `
import { EventBus, mintToken } from "@eventbus/client";
import { bridge, emit } from "@eventbus/client/dom";
if (typeof bridge !== "function" || typeof emit !== "function") throw new Error("no DOM entry point");
const url = process.env.BUS_URL;
// Development mode mints without a credential; a backend gives { credential: apiKey }.
const bus = new EventBus(url.replace("http", "ws") + "/v1/ws", {
  token: async () => (await mintToken(url, { sub: "pkg-app", role: "service" })).token,
  backoff: { initialMs: 50, maxMs: 500 },
});
bus.subscribe("pkg.orders", (event) => console.log(JSON.stringify({ seq: event.seq, n: event.data.n })), { after: 0 });
const ack = await bus.publish({ channel: "pkg.orders", type: "order.placed", data: { n: 0 } });
console.log(JSON.stringify({ acked: ack.seq }));
const refused = await mintToken(url, { ttl_s: -1 }).then(() => null, (err) => ({ status: err.status, field: err.field }));
console.log(JSON.stringify({ refused }));
`;

test("the packed package installs, imports by name, and resumes across a bus restart", async () => {
  // Pack and install exactly what would be published.
  execFileSync("npm", ["pack", "--pack-destination", temp, "--silent"], { cwd: join(root, "web") });
  const tarball = readdirSync(temp).find((f) => f.endsWith(".tgz"));
  assert.ok(tarball, "npm pack made a tarball");
  const project = join(temp, "app");
  execFileSync("mkdir", ["-p", project]);
  writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", type: "module", private: true }));
  execFileSync("npm", ["install", "--no-audit", "--no-fund", "--silent", join(temp, tarball)], { cwd: project });
  writeFileSync(join(project, "consumer.js"), consumer);

  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const data = join(temp, "data");
  let bus = startBus(port, data);
  await until("the bus to answer", async () => (await fetch(`${url}/healthz`)).ok);
  // What the bus serves to pages (and the browser tests run) is the packed build, byte for byte.
  for (const file of ["eventbus.js", "eventbus-dom.js"]) {
    const installed = readFileSync(join(project, "node_modules", "@eventbus", "client", file), "utf8");
    assert.equal(await (await fetch(`${url}/${file}`)).text(), installed, `/${file} is the packed ${file}`);
  }

  const app = spawn(process.execPath, [...nodeFlags, "consumer.js"], {
    cwd: project,
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, BUS_URL: url },
  });
  children.push(app);
  const seen = [];
  let acked = null;
  let refused;
  createInterface({ input: app.stdout }).on("line", (line) => {
    const message = JSON.parse(line);
    if ("acked" in message) acked = message.acked;
    else if ("refused" in message) refused = message.refused;
    else seen.push(message);
  });

  await until("the consumer's own publish to be acknowledged", () => acked !== null);
  for (const n of [1, 2, 3]) await publish(url, n);
  await until("events 1-3 (after the consumer's own)", () => seen.length >= 4);

  // kill -9 and start again on the same port and data: the client reconnects and resumes.
  bus.kill("SIGKILL");
  await new Promise((r) => bus.once("exit", r));
  bus = startBus(port, data);
  await until("the bus to answer again", async () => (await fetch(`${url}/healthz`)).ok);
  for (const n of [4, 5, 6]) await publish(url, n);
  await until("events 4-6 after the restart", () => seen.length >= 7);
  // A moment for anything doubled to show: a resume from the wrong place would repeat 1-3.
  await publish(url, 7);
  await until("event 7", () => seen.some((e) => e.n === 7));

  assert.deepEqual(
    seen.map((e) => e.seq),
    [1, 2, 3, 4, 5, 6, 7, 8],
    "every event once, in seq order, across the restart",
  );
  assert.equal(acked, 1, "the consumer's publish was stored first, and acknowledged with its seq");
  await until("the refused mint", () => refused !== undefined);
  assert.deepEqual(refused, { status: 400, field: "ttl_s" }, "a refused mint rejects with the problem's fields");
  assert.deepEqual(seen.map((e) => e.n), [0, 1, 2, 3, 4, 5, 6, 7]);
});
