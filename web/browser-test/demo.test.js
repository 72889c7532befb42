// The demo in a real browser (Debian's Chromium, driven by playwright-core) against the real
// all-in-one bus: two pages share a board; the server is killed (-9) and started again on the same
// data while a page has a publish in flight; both pages come back with everything once; a page
// opened later shows the compacted backlog. Takes the README's screenshot.
//
//   EVENTBUS_BIN=target/debug/eventbus node --test web/browser-test/
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { BIN, CHROMIUM, CHROMIUM_ARGS, freePort, root, until } from "./support.js";

class Bus {
  constructor(port, data) {
    this.port = port;
    this.data = data;
    this.url = `http://127.0.0.1:${port}`;
  }
  async start() {
    this.process = spawn(BIN, ["serve", "--dev", "--listen", `127.0.0.1:${this.port}`, "--data", this.data], {
      stdio: ["ignore", "ignore", "inherit"],
      // One attempt before a webhook is dead, so that the admin page's test sees one soon.
      env: { ...process.env, EVENTBUS_LOG: "warn", EVENTBUS_WEBHOOK_MAX_ATTEMPTS: "1" },
    });
    await until("the bus to answer", async () => (await fetch(`${this.url}/healthz`)).ok);
  }
  kill() {
    this.process.kill("SIGKILL");
    return new Promise((r) => this.process.once("exit", r));
  }
  async publish(event) {
    const token = (await (await fetch(`${this.url}/v1/tokens`, { method: "POST" })).json()).token;
    const response = await fetch(`${this.url}/v1/events`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify(event),
    });
    assert.equal(response.status, 200, await response.text());
  }
}

const noteTexts = (page) => page.$$eval("#notes eb-note .text", (els) => els.map((e) => e.textContent).sort());
const activitySeqs = (page) => page.$$eval("#activity li", (els) => els.map((e) => Number(e.dataset.seq)).reverse());
const state = (page) => page.$eval("eb-status", (e) => e.getAttribute("state"));

let browser;
let bus;
after(async () => {
  await browser?.close();
  if (bus?.process?.exitCode === null) await bus.kill();
});

test("two pages share a board across a server crash, and a late page gets the compacted backlog", async () => {
  bus = new Bus(await freePort(), mkdtempSync(join(tmpdir(), "eventbus-browser-")));
  await bus.start();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
  });
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const [a, b] = [await context.newPage(), await context.newPage()];
  for (const page of [a, b]) {
    page.on("pageerror", (err) => assert.fail(`page error: ${err}`));
    await page.goto(bus.url);
    await until("the page to be live", async () => (await state(page)) === "open");
  }

  // An action in one page appears in the other.
  await a.fill("eb-composer input", "buy milk");
  await a.click("eb-composer button");
  await until("b to show a's note", async () => (await noteTexts(b)).includes("buy milk"));
  await b.fill("eb-composer input", "call Ann");
  await b.click("eb-composer button");
  await until("a to show b's note", async () => (await noteTexts(a)).length === 2);

  // Presence: both pages are here.
  await until("presence of both", async () => (await a.$eval("eb-presence", (e) => e.textContent)).split(", ").length === 2);

  // The server dies; a note is written while it is down; it comes back on the same data, and
  // another service publishes before the pages are back.
  await bus.kill();
  await until("a to notice", async () => (await state(a)) !== "open");
  await a.fill("eb-composer input", "written offline");
  await a.click("eb-composer button");
  await bus.start();
  await bus.publish({ channel: "demo.board", type: "note.added", key: "from-service", data: { key: "from-service", text: "from a service", by: "cron" } });
  for (const page of [a, b]) {
    await until("the page to be live again", async () => (await state(page)) === "open");
    await until("every note once", async () =>
      JSON.stringify(await noteTexts(page)) === JSON.stringify(["buy milk", "call Ann", "from a service", "written offline"]));
  }
  // Nothing twice, nothing skipped: the events each page received are 1..n in order.
  for (const page of [a, b]) {
    const seqs = await activitySeqs(page);
    assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `seqs seen: ${seqs}`);
  }

  // Removing a note; a page opened later shows the compacted backlog: only what is on the board.
  await b.click("eb-note:has-text('call Ann') button");
  await until("a to drop the note", async () => !(await noteTexts(a)).includes("call Ann"));
  const late = await context.newPage();
  await late.goto(bus.url);
  await until("the late page to show the board", async () =>
    JSON.stringify(await noteTexts(late)) === JSON.stringify(["buy milk", "from a service", "written offline"]));
  const lateSeqs = await activitySeqs(late);
  assert.ok(lateSeqs.length === 3, `compacted: one event per note on the board, got ${lateSeqs}`);

  // The SSE fallback: the same board, live, without a WebSocket.
  const sse = await context.newPage();
  sse.on("pageerror", (err) => assert.fail(`page error: ${err}`));
  await sse.goto(`${bus.url}/?transport=sse`);
  await until("the SSE page to show the board", async () =>
    JSON.stringify(await noteTexts(sse)) === JSON.stringify(["buy milk", "from a service", "written offline"]));
  await a.fill("eb-composer input", "seen over SSE");
  await a.click("eb-composer button");
  await until("the SSE page to get it live", async () => (await noteTexts(sse)).includes("seen over SSE"));
  await sse.fill("eb-composer input", "sent over HTTP");
  await sse.click("eb-composer button");
  await until("a to get the SSE page's note", async () => (await noteTexts(a)).includes("sent over HTTP"));
  const sseSeqs = await activitySeqs(sse);
  assert.deepEqual(sseSeqs, sseSeqs.map((_, i) => i + 1), `SSE seqs: ${sseSeqs}`);

  // The admin page: figures for a service token (development mode: minted without a key).
  const admin = await context.newPage();
  await admin.goto(`${bus.url}/admin`);
  await admin.click("#login button");
  await until("the admin figures", async () => {
    const rows = await admin.$$eval("#process tr", (trs) => Object.fromEntries(trs.map((tr) => [tr.children[0].textContent, tr.children[1].textContent])));
    return Number(rows["connections"]) >= 3 && Number(rows["events stored (since start)"]) >= 1;
  });
  assert.equal(await admin.$$eval("#gateways tbody tr", (trs) => trs.length), 1, "the all-in-one's one gateway");

  // A burst moves the charts; the channel browser finds its channel, and its live tail follows.
  await bus.publish(Array.from({ length: 200 }, (_, i) => ({ channel: "admin.burst", type: "tick", data: { i } })));
  await until("the events-in chart to show the burst", async () =>
    Number(await admin.$eval("#chart-in", (f) => f.dataset.peak ?? 0)) > 0);
  await until("the connections chart to count the pages", async () =>
    Number(await admin.$eval("#chart-connections", (f) => f.dataset.last ?? 0)) >= 3);
  await admin.fill("#prefix", "admin.");
  await admin.click("#channel-search button");
  await until("the channel in the browser", async () =>
    (await admin.$$eval("#channel-list tbody tr", (trs) => trs.map((tr) => tr.textContent))).some((t) => t.includes("admin.burst") && t.includes("200")));
  await admin.click("#channel-list tbody button");
  await until("the channel's facts", async () => {
    const facts = await admin.$$eval("#channel-facts tr", (trs) => Object.fromEntries(trs.map((tr) => [tr.children[0].textContent, tr.children[1].textContent])));
    return facts["head (last seq)"] === "200" && facts["first retained seq"] === "1";
  });
  await until("the tail's last ten", async () => (await admin.$$eval("#tail li", (lis) => lis.length)) === 10);
  await bus.publish({ channel: "admin.burst", type: "tick", data: { i: 200 } });
  await until("the tail to follow live", async () =>
    (await admin.$$eval("#tail li", (lis) => lis.map((li) => Number(li.dataset.seq))))[0] === 201);
  const tailSeqs = await admin.$$eval("#tail li", (lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(tailSeqs, Array.from({ length: 11 }, (_, i) => 201 - i), "the tail: newest first, each once");
  assert.equal(await admin.$eval("#presence", (p) => p.textContent), "nobody", "read before the tail subscribed: nobody else is on it");
  assert.equal(await admin.$eval("#webhooks-none", (p) => p.hidden), false);

  // A webhook whose receiver is not there dies (one attempt, as this bus is configured); the
  // page shows it dead with its error, and its retry button sets it going again.
  const token = (await (await fetch(`${bus.url}/v1/tokens`, { method: "POST" })).json()).token;
  const registered = await fetch(`${bus.url}/v1/webhooks`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ url: "http://127.0.0.1:9/nobody", channels: ["admin.hooked"], secret: "admin-test-secret-0123" }),
  });
  assert.equal(registered.status, 201, await registered.text());
  await bus.publish({ channel: "admin.hooked", type: "tick" });
  await until("the dead webhook on the page", async () =>
    (await admin.$$eval("#webhooks tbody tr", (trs) => trs.map((tr) => tr.children[2].textContent))).includes("dead"), 30000);
  const retried = admin.waitForResponse((r) => r.url().endsWith("/retry") && r.request().method() === "POST");
  await admin.click("#webhooks button.retry");
  assert.equal((await retried).status(), 200, "the retry was taken");
  // A few seconds of samples, so that the screenshot shows lines (one sample a second).
  await until("eight samples on the charts", async () =>
    Number(await admin.$eval("#chart-in", (f) => f.dataset.samples ?? 0)) >= 8);
  await admin.screenshot({ path: process.env.ADMIN_SCREENSHOT ?? join(root, "target", "admin.png"), fullPage: true });

  mkdirSync(join(root, "target"), { recursive: true });
  await a.screenshot({ path: process.env.SCREENSHOT ?? join(root, "target", "demo.png") });
});
