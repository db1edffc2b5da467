// Opens the narration example's page in headless Chromium, runs a search,
// and checks the page shows the whole narration: every delta, first word
// included, adding up to stream.done's fullText (which comes compressed:
// the handshake must have negotiated permessage-deflate), then the actions. Then a
// page from another origin tries to open the socket: refused by the server
// at BASE, accepted by the one at ALLOWED (started with that origin on its
// allowlist). With SEARCH and STREAM, two instances sharing topics through
// Redis, the page is loaded from SEARCH and streams over a WebSocket to
// STREAM (which allows SEARCH's origin).
//
// Usage: node browser.mjs BASE OTHER_ORIGIN ALLOWED [SEARCH STREAM]
import { chromium } from "playwright-core";
import http from "node:http";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, otherOrigin, allowed, search, stream] = process.argv.slice(2);

// A page served from `otherOrigin` by a small server of this script's that
// tries to open a WebSocket to `target` and writes what happened.
const probes = http.createServer((req, res) => {
  const target = new URL(req.url, otherOrigin).searchParams.get("target");
  res.writeHead(200, { "content-type": "text/html" });
  res.end(`<p id="result">pending</p><script>
    const ws = new WebSocket(${JSON.stringify(target)});
    ws.onopen = () => { document.getElementById("result").textContent = "open"; ws.close(); };
    ws.onclose = (e) => { if (e.code === 1006) document.getElementById("result").textContent = "refused"; };
  </script>`);
});
await new Promise((resolve) => probes.listen(Number(new URL(otherOrigin).port), "127.0.0.1", resolve));

async function crossOriginAttempt(context, target) {
  const page = await context.newPage();
  const ws = target.replace("http", "ws") + "/ws";
  await page.goto(`${otherOrigin}/probe?target=${encodeURIComponent(ws)}`);
  await page.waitForFunction(() => document.getElementById("result").textContent !== "pending", null, {
    timeout: 20000,
  });
  const result = await page.textContent("#result");
  await page.close();
  return result;
}

const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "chromium-")), {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
try {
  const narrate = async (url, label) => {
    const page = await browser.newPage();
    page.on("console", (m) => console.log("page:", m.text()));
    // The handshake's response headers, as Chromium received them.
    const cdp = await browser.newCDPSession(page);
    await cdp.send("Network.enable");
    let extensions = null;
    cdp.on("Network.webSocketHandshakeResponseReceived", ({ response }) => {
      const name = Object.keys(response.headers).find((h) => h.toLowerCase() === "sec-websocket-extensions");
      extensions = name ? response.headers[name] : "";
    });
    await page.goto(url);
    await page.waitForSelector("#narration[data-done=true]", { timeout: 20000 });
    await page.waitForSelector("#actions button", { timeout: 20000 });
    const complete = await page.getAttribute("#narration", "data-complete");
    const text = await page.textContent("#narration");
    const status = await page.textContent("#status");
    const buttons = await page.locator("#actions button").count();
    console.log(`${label}narration: ${JSON.stringify(text)}`);
    console.log(`${label}complete: ${complete}, status: ${status}, buttons: ${buttons}, extensions: ${JSON.stringify(extensions)}`);
    if (complete !== "true" || !text.startsWith("Found 10 great places") || buttons !== 2) failed = true;
    if (!extensions?.startsWith("permessage-deflate")) failed = true;
    return page;
  };
  const page = await narrate(`${base}/?q=pizza`, "");
  if (search && stream) {
    const ws = stream.replace("http", "ws") + "/ws";
    await narrate(`${search}/?q=pizza&ws=${encodeURIComponent(ws)}`, "across instances: ");
  }
  await page.click("#actions button >> nth=0");
  const refused = await crossOriginAttempt(browser, base);
  const accepted = await crossOriginAttempt(browser, allowed);
  console.log(`page from ${otherOrigin}: ${refused} by the default server, ${accepted} by the one allowing it`);
  if (refused !== "refused" || accepted !== "open") failed = true;
} catch (e) {
  console.error(e);
  failed = true;
} finally {
  await browser.close();
  probes.close();
}
console.log(failed ? "browser check: FAILED" : "browser check: ok");
process.exit(failed ? 1 : 0);
