// The demo page joins with the application's cookie alone: the bus (not in development mode, so
// no token can be minted without a key) is started with a connect hook that this test provides,
// an HTTP server that knows browsers by a session cookie, checks the bus's signature and answers
// with an identity and grants (docs/protocol.md §9). A browser without the cookie is refused with
// the app's reason and does not reconnect.
//
//   EVENTBUS_BIN=target/debug/eventbus node --test web/browser-test/
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { BIN, CHROMIUM, CHROMIUM_ARGS, freePort, until } from "./support.js";

const SECRET = "demo-hook-secret-0123456789";
const SESSIONS = { "s-ann": "ann", "s-ben": "ben" };

/** The app's connect hook: a signed request in, an identity with grants (or a refusal) out. */
function startApp(asked) {
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const signature = req.headers["x-eventbus-signature"] ?? "";
      const t = /^t=(\d+),/.exec(signature)?.[1];
      const expected = `t=${t},v1=${createHmac("sha256", SECRET).update(`${t}.${body}`).digest("hex")}`;
      if (!t || expected.length !== signature.length || !timingSafeEqual(Buffer.from(expected), Buffer.from(signature))) {
        res.writeHead(401).end();
        return;
      }
      const request = JSON.parse(body);
      asked.push(request);
      const session = /(?:^|;\s*)session=([^;]+)/.exec(request.headers.cookie ?? "")?.[1];
      const identity = SESSIONS[session];
      const answer = identity
        ? { allow: true, identity, subscribe: ["demo.board"], publish: ["demo.board"], expires_in: 600 }
        : { allow: false, reason: "sign in to the app first" };
      res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(answer));
    });
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

let browser;
let bus;
let app;
after(async () => {
  await browser?.close();
  if (bus?.exitCode === null) bus.kill("SIGKILL");
  app?.close();
});

test("the demo joins with the app's cookie alone, and without it is refused with the app's reason", async () => {
  const asked = [];
  app = await startApp(asked);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  bus = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--data", mkdtempSync(join(tmpdir(), "eventbus-hook-"))], {
    stdio: ["ignore", "ignore", "inherit"],
    env: {
      ...process.env,
      EVENTBUS_LOG: "warn",
      EVENTBUS_CORS_ORIGINS: url,
      EVENTBUS_HOOK_CONNECT_URL: `http://127.0.0.1:${app.address().port}/connect`,
      EVENTBUS_HOOK_SECRET: SECRET,
    },
  });
  await until("the bus to answer", async () => (await fetch(`${url}/healthz`)).ok);
  // Not in development mode: the page could not mint itself a token.
  assert.equal((await fetch(`${url}/v1/tokens`, { method: "POST" })).status, 401);

  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  const pages = [];
  for (const session of ["s-ann", "s-ben"]) {
    const context = await browser.newContext();
    await context.addCookies([{ name: "session", value: session, url }]);
    const page = await context.newPage();
    page.on("pageerror", (err) => assert.fail(`page error: ${err}`));
    await page.goto(`${url}/?auth=app`);
    await until("the page to be live", async () => (await page.$eval("eb-status", (e) => e.getAttribute("state"))) === "open");
    pages.push(page);
  }
  const [ann, ben] = pages;
  assert.equal(await ann.$eval("#me", (e) => e.textContent), "ann");
  assert.equal(await ben.$eval("#me", (e) => e.textContent), "ben");
  assert.equal(asked[0].hook, "connect");
  assert.deepEqual(Object.keys(asked[0].headers), ["cookie"], "only the allow-listed headers reach the app");

  // The app's identities publish and receive like any other.
  await ann.fill("eb-composer input", "from ann");
  await ann.click("eb-composer button");
  await until("ben to see ann's note", async () =>
    (await ben.$$eval("#notes eb-note .text", (els) => els.map((e) => e.textContent))).includes("from ann"));
  await until("presence of both", async () => (await ann.$eval("eb-presence", (e) => e.textContent)) === "ann, ben");

  // No session cookie: the app refuses, the page says why and stays closed.
  const stranger = await (await browser.newContext()).newPage();
  await stranger.goto(`${url}/?auth=app`);
  await until("the refusal to show", async () =>
    (await stranger.$eval("#me", (e) => e.textContent)) === "not let in: sign in to the app first");
  const connects = asked.length;
  await until("the page to stay closed", async () => (await stranger.$eval("eb-status", (e) => e.getAttribute("state"))) === "closed");
  assert.equal(asked.length, connects, "a refused page does not ask again");
});
