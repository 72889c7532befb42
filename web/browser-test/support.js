// What the browser tests share: where the binary and Chromium are, free ports, and waiting for a
// condition (never a fixed sleep).
import { createServer } from "node:net";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const root = join(here, "..", "..");
export const BIN = process.env.EVENTBUS_BIN ?? join(root, "target", "debug", "eventbus");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const WAIT = 20000;
/** Chromium's flags for a quiet, headless run in a container. */
export const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

export const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

export async function until(what, check, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
