// The narration page in Debian's headless Chromium, streaming through the
// client: plainly, with WebSocket refused by a proxy (so over Server-Sent
// Events), and from one of two instances sharing a real Redis while that
// instance is killed (SIGKILL) mid-stream and started again.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { freePort, narration, onCleanup, runCleanups, startNarration, startProxy, startRedis, until } from "./support.mjs";

let browser;

before(async () => {
  browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "chromium-")), {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  onCleanup(() => browser.close());
});

after(runCleanups);

/** Opens `url` (the page searches at once) and waits for the whole narration. */
async function narrate(url, { during } = {}) {
  const page = await browser.newPage();
  page.on("console", (m) => console.log("page:", m.text()));
  await page.goto(url);
  if (during) await during(page);
  await page.waitForSelector("#narration[data-done=true]", { timeout: 30000 });
  await page.waitForSelector("#actions button", { timeout: 30000 });
  const result = {
    complete: await page.getAttribute("#narration", "data-complete"),
    text: await page.textContent("#narration"),
    transport: await page.getAttribute("#connection", "data-transport"),
    delivered: await page.evaluate(() => window.delivered),
    page,
  };
  return result;
}

/** Each seq exactly once, in order, and the deltas add up to fullText. */
function assertWhole(result) {
  assert.equal(result.complete, "true", "the deltas add up to fullText");
  assert.ok(result.text.startsWith("Found 10 great places"), result.text);
  let next = 1;
  for (const [first, last] of result.delivered) {
    assert.equal(first, next, `seq ${next} once`);
    next = last + 1;
  }
}

test("the page streams a whole narration through the client", async () => {
  const { base } = await narration();
  const result = await narrate(`${base}/?q=pizza`);
  assertWhole(result);
  assert.equal(result.transport, "websocket");
  await result.page.close();
});

test("with WebSocket refused on the way, the page streams over Server-Sent Events", async () => {
  const { port } = await narration({ NARRATION_WORD_MS: "40" });
  const proxy = await startProxy(port, { refuseUpgrade: true });
  onCleanup(() => proxy.close());
  const result = await narrate(`http://127.0.0.1:${proxy.port}/?q=pizza`);
  assertWhole(result);
  assert.equal(result.transport, "sse");
  await result.page.close();
});

test("told to, the page starts with Server-Sent Events", async () => {
  const { base } = await narration();
  const result = await narrate(`${base}/?q=pizza&transport=sse`);
  assertWhole(result);
  assert.equal(result.transport, "sse");
  await result.page.close();
});

test("the instance the page streams from is killed mid-stream and restarted: nothing lost, nothing twice", async () => {
  const redis = await startRedis();
  onCleanup(() => redis.stop());
  const searchPort = await freePort();
  const streamPort = await freePort();
  const search = await startNarration(searchPort, { REDIS_URL: redis.url, NARRATION_WORD_MS: "80" });
  onCleanup(() => search.stop("SIGKILL").catch(() => {}));
  const streamEnv = { REDIS_URL: redis.url, WS_ALLOWED_ORIGINS: `http://127.0.0.1:${searchPort}` };
  let stream = await startNarration(streamPort, streamEnv);
  onCleanup(() => stream.stop("SIGKILL").catch(() => {}));
  const ws = encodeURIComponent(`ws://127.0.0.1:${streamPort}/ws`);
  const result = await narrate(`http://127.0.0.1:${searchPort}/?q=pizza&ws=${ws}`, {
    during: async (page) => {
      await until("a few words on the page", async () =>
        (await page.evaluate(() => window.delivered.length)) >= 6,
      );
      await stream.stop("SIGKILL");
      await until("the page to notice", async () =>
        (await page.textContent("#connection")).startsWith("reconnecting"),
      );
      stream = await startNarration(streamPort, streamEnv);
    },
  });
  assertWhole(result);
  await result.page.close();
});
