// Opens the narration example's page in headless Chromium, runs a search,
// and checks the page shows the whole narration: every delta, first word
// included, adding up to stream.done's fullText, then the actions.
//
// Usage: node narration.mjs http://127.0.0.1:PORT
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = process.argv[2];
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
  const page = await browser.newPage();
  page.on("console", (m) => console.log("page:", m.text()));
  await page.goto(`${base}/?q=pizza`);
  await page.waitForSelector("#narration[data-done=true]", { timeout: 20000 });
  await page.waitForSelector("#actions button", { timeout: 20000 });
  const complete = await page.getAttribute("#narration", "data-complete");
  const text = await page.textContent("#narration");
  const status = await page.textContent("#status");
  const buttons = await page.locator("#actions button").count();
  console.log(`narration: ${JSON.stringify(text)}`);
  console.log(`complete: ${complete}, status: ${status}, buttons: ${buttons}`);
  if (complete !== "true" || !text.startsWith("Found 10 great places") || buttons !== 2) failed = true;
  await page.click("#actions button >> nth=0");
} catch (e) {
  console.error(e);
  failed = true;
} finally {
  await browser.close();
}
console.log(failed ? "browser check: FAILED" : "browser check: ok");
process.exit(failed ? 1 : 0);
