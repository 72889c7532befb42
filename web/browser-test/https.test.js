// The bus as the README's https quick start runs it: `eventbus serve --config eventbus.toml
// --tls-cert … --tls-key …`, and the demo page in a real Chromium over https and wss. The
// certificate is made here; Chromium trusts exactly its public key (not every certificate).
//
//   EVENTBUS_BIN=target/debug/eventbus node --test web/browser-test/
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { request } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import selfsigned from "selfsigned";
import { BIN, CHROMIUM, CHROMIUM_ARGS, freePort, until } from "./support.js";

/** GET over https trusting `ca` alone; resolves to the status code. */
const getStatus = (url, ca) =>
  new Promise((resolve, reject) => {
    request(url, { ca }, (res) => {
      res.resume();
      resolve(res.statusCode);
    }).on("error", reject).end();
  });

let browser;
let bus;
after(async () => {
  await browser?.close();
  if (bus && bus.exitCode === null) bus.kill("SIGKILL");
});

test("the demo page over https and wss, served with a configuration file and a certificate", async () => {
  const dir = mkdtempSync(join(tmpdir(), "eventbus-https-"));
  const pems = await selfsigned.generate([{ name: "commonName", value: "localhost" }], {
    keySize: 2048,
    days: 2,
    extensions: [{ name: "subjectAltName", altNames: [{ type: 2, value: "localhost" }, { type: 7, ip: "127.0.0.1" }] }],
  });
  writeFileSync(join(dir, "cert.pem"), pems.cert);
  writeFileSync(join(dir, "key.pem"), pems.private);
  const port = await freePort();
  writeFileSync(
    join(dir, "eventbus.toml"),
    `dev = true\n\n[serve]\nlisten = "127.0.0.1:${port}"\ndata = ${JSON.stringify(join(dir, "data"))}\n`,
  );
  bus = spawn(BIN, ["serve", "--config", join(dir, "eventbus.toml"), "--tls-cert", join(dir, "cert.pem"), "--tls-key", join(dir, "key.pem")], {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, EVENTBUS_LOG: "warn" },
  });
  const url = `https://localhost:${port}`;
  await until("the bus to answer over https", async () => (await getStatus(`${url}/healthz`, pems.cert)) === 200);

  const spki = createHash("sha256").update(new X509Certificate(pems.cert).publicKey.export({ type: "spki", format: "der" })).digest("base64");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${spki}`],
  });
  const context = await browser.newContext();
  const [a, b] = [await context.newPage(), await context.newPage()];
  for (const page of [a, b]) {
    page.on("pageerror", (err) => assert.fail(`page error: ${err}`));
    await page.goto(url);
    assert.equal(new URL(page.url()).protocol, "https:");
    await until("the page to be live over wss", async () => (await page.$eval("eb-status", (e) => e.getAttribute("state"))) === "open");
  }
  await a.fill("eb-composer input", "sent over https");
  await a.click("eb-composer button");
  await until("b to get it over wss", async () =>
    (await b.$$eval("#notes eb-note .text", (els) => els.map((e) => e.textContent))).includes("sent over https"));
});
