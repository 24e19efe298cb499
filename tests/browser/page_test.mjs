// Drives fanout's page (GET /) in Debian's chromium through playwright-core.
//
//   node tests/browser/page_test.mjs http://127.0.0.1:PORT/ [--reconnect]
//
// Env: NODE_PATH must reach playwright-core (tests/browser/setup.sh prints
// it); CHROMIUM (default /usr/bin/chromium); SCREENSHOT (default
// target/browser-test/page.png).
//
// Checks, each bounded in time: the socket opens; candles are drawn and keep
// updating; the canvas shows candle colours; events stream in; a filter for
// `payment` leaves only payments; switching symbol and interval re-draws;
// a chat line comes back in the chat log. With --reconnect it then prints
// `RESTART` on stdout and waits for one line on stdin (sent by the driver
// once it has killed the server and started a new one on the same port),
// and checks the page noticed the drop, reconnected and draws candles again.
// Prints `page test: ok` and exits 0, or prints why and exits 1.

import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

// ESM imports ignore NODE_PATH; require() honours it.
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const here = dirname(fileURLToPath(import.meta.url));
const url = process.argv[2];
const reconnect = process.argv.includes("--reconnect");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const screenshot = process.env.SCREENSHOT || resolve(here, "../../target/browser-test/page.png");
if (!url) {
  console.error("usage: node page_test.mjs URL [--reconnect]");
  process.exit(2);
}

const started = Date.now();
const log = (...args) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls `fn` (run in the page) until it returns a truthy value.
async function waitFor(page, what, fn, arg, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await page.evaluate(fn, arg);
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000}s waiting for ${what}`);
    await sleep(100);
  }
}

const chartState = () => {
  const chart = document.getElementById("chart");
  return {
    candles: Number(chart.dataset.candles),
    updates: Number(chart.dataset.lastUpdate),
    status: document.getElementById("status").dataset.state,
    info: document.getElementById("chart-info").textContent,
  };
};

// Counts canvas pixels in the candle colours (#26a69a up, #ef5350 down):
// a blank or text-only canvas has none.
const candlePixels = () => {
  const canvas = document.getElementById("chart-canvas");
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let up = 0, down = 0;
  const near = (i, r, g, b) => Math.abs(data[i] - r) < 12 && Math.abs(data[i + 1] - g) < 12 && Math.abs(data[i + 2] - b) < 12;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] < 200) continue;
    if (near(i, 0x26, 0xa6, 0x9a)) up++;
    else if (near(i, 0xef, 0x53, 0x50)) down++;
  }
  return { up, down, total: up + down };
};

const eventTypes = () => [...document.querySelectorAll("#event-log li")].map((li) => li.dataset.type);

async function waitForCandles(page, label) {
  const first = await waitFor(page, `${label}: candles drawn (data-candles > 0)`,
    () => { const c = document.getElementById("chart"); return Number(c.dataset.candles) > 0 && Number(c.dataset.lastUpdate); }, null, 30000);
  await waitFor(page, `${label}: the chart updating (data-last-update above ${first})`,
    (n) => Number(document.getElementById("chart").dataset.lastUpdate) > n, first, 20000);
  const state = await page.evaluate(chartState);
  log(`${label}: ${state.candles} candle(s) drawn, ${state.updates} update(s), ${state.info}`);
  return state;
}

async function run(browser) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 860 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") log(`console error: ${m.text()}`); });

  log(`loading ${url}`);
  const response = await page.goto(url, { waitUntil: "load", timeout: 15000 });
  if (!response || response.status() !== 200) throw new Error(`GET ${url}: status ${response && response.status()}`);
  const type = response.headers()["content-type"] || "";
  if (!type.startsWith("text/html")) throw new Error(`GET ${url}: Content-Type ${type}, expected text/html`);

  await waitFor(page, "the socket to open (#status data-state=open)", () => document.getElementById("status").dataset.state === "open");
  log("connected");

  // --- the chart ---
  await waitForCandles(page, "default symbol");
  const pixels = await page.evaluate(candlePixels);
  log(`canvas: ${pixels.up} up-coloured and ${pixels.down} down-coloured pixel(s)`);
  if (pixels.total < 20) throw new Error(`the canvas looks blank: only ${pixels.total} pixel(s) in candle colours`);

  // --- the event stream ---
  await waitFor(page, "events in #event-log", () => document.querySelectorAll("#event-log li").length >= 5);
  const mixed = await page.evaluate(eventTypes);
  log(`event log: ${mixed.length} row(s), types ${[...new Set(mixed)].join(", ")}`);

  await page.fill("#filter-input", "payment");
  await page.click("#filter-apply");
  await waitFor(page, "payments after applying the filter `payment`",
    () => { const t = [...document.querySelectorAll("#event-log li")].map((li) => li.dataset.type); return t.length >= 3; });
  await sleep(1000); // let more arrive: none of them may be anything else
  const filtered = await page.evaluate(eventTypes);
  const wrong = filtered.filter((t) => t !== "payment");
  if (wrong.length) throw new Error(`filter \`payment\`: the log still shows ${wrong.length} other event(s): ${[...new Set(wrong)].join(", ")}`);
  const filterError = await page.textContent("#filter-error");
  if (filterError) throw new Error(`filter \`payment\`: the page shows an error: ${filterError}`);
  log(`filter payment: ${filtered.length} row(s), all payments`);

  // A filter the server refuses: its error is shown, not swallowed.
  await page.fill("#filter-input", '{"field":"type","op":"resembles","value":"x"}');
  await page.click("#filter-apply");
  const refused = await waitFor(page, "the server's error for a bad operator in #filter-error",
    () => document.getElementById("filter-error").textContent);
  log(`bad filter refused: ${refused}`);

  // A JSON expression too, and back to a mixed view for the screenshot.
  await page.fill("#filter-input", '{"field":"type","op":"in","value":["trade","payment","contract_event"]}');
  await page.click("#filter-apply");
  await waitFor(page, "events after applying a JSON filter", () => document.querySelectorAll("#event-log li").length >= 3);
  const jsonError = await page.textContent("#filter-error");
  if (jsonError) throw new Error(`JSON filter: the page shows an error: ${jsonError}`);

  // --- switching symbol and interval ---
  const symbols = await page.$$eval("#symbol option", (os) => os.map((o) => o.value));
  const intervals = await page.$$eval("#interval option", (os) => os.map((o) => o.value));
  log(`pickers: symbols ${symbols.join(", ")}; intervals ${intervals.join(", ")}`);
  if (symbols.length < 2 || !intervals.includes("1s")) throw new Error("the pickers were not filled from market.symbols");
  const current = await page.inputValue("#symbol");
  const other = symbols.find((s) => s !== current);
  await page.selectOption("#symbol", other);
  await page.selectOption("#interval", "1s");
  await waitFor(page, `the chart to switch to ${other} · 1s`, (want) => document.getElementById("chart-info").textContent === want, `${other} · 1s`);
  await waitForCandles(page, `${other} 1s`);

  // --- chat ---
  const line = `hello from chromium ${Math.random().toString(36).slice(2, 8)}`;
  await waitFor(page, "a nick from chat.join", () => document.getElementById("me").textContent !== "…");
  await page.fill("#chat-input", line);
  await page.press("#chat-input", "Enter");
  await waitFor(page, `"${line}" in #chat-log`, (t) => document.getElementById("chat-log").textContent.includes(t), line, 10000);
  log(`chat: "${line}" echoed as ${await page.textContent("#me")}`);

  // A freshly started server has only seconds of history: give the
  // screenshot a fuller chart (best effort, not a check).
  await waitFor(page, "more candles", () => Number(document.getElementById("chart").dataset.candles) >= 15, null, 15000)
    .catch(() => log("screenshot with fewer than 15 candles"));
  await sleep(500); // one more chart frame
  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot });
  log(`screenshot: ${screenshot}`);

  // --- reconnect ---
  if (reconnect) {
    // Record every status the page shows from here on.
    await page.evaluate(() => {
      const status = document.getElementById("status");
      window.__states = [];
      new MutationObserver(() => window.__states.push(status.dataset.state))
        .observe(status, { attributes: true, attributeFilter: ["data-state"] });
    });
    const before = await page.evaluate(chartState);
    console.log("RESTART");
    await readLine();
    log("driver says the server was restarted");
    await waitFor(page, "the page to reconnect (#status data-state=open)",
      () => window.__states.includes("closed") && document.getElementById("status").dataset.state === "open", null, 30000);
    const states = await page.evaluate(() => window.__states);
    log(`status went ${states.join(" -> ")}`);
    const after = await waitForCandles(page, "after reconnect");
    if (after.info !== before.info) throw new Error(`after reconnect the chart shows ${after.info}, not ${before.info}`);
    const line2 = `back again ${Math.random().toString(36).slice(2, 8)}`;
    await page.fill("#chat-input", line2);
    await page.press("#chat-input", "Enter");
    await waitFor(page, `"${line2}" in #chat-log after reconnect`, (t) => document.getElementById("chat-log").textContent.includes(t), line2, 10000);
    await waitFor(page, "events after reconnect", () => document.querySelectorAll("#event-log li").length >= 1);
    log("reconnected: candles, events and chat work again");
  }

  if (pageErrors.length) throw new Error(`the page threw: ${pageErrors.join("; ")}`);
}

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function readLine() {
  const { value, done } = await stdinLines.next();
  if (done) throw new Error("stdin closed before the driver restarted the server");
  return value;
}

// A hard stop, should anything above hang in a way no wait catches.
const watchdog = setTimeout(() => { console.log("page test: FAILED: watchdog (150 s)"); process.exit(1); }, 150000);

let browser;
let failed = null;
try {
  browser = await chromium.launch({
    executablePath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    timeout: 30000,
  });
  log(`browser: chromium ${browser.version()}`);
  await run(browser);
} catch (e) {
  failed = e;
} finally {
  if (browser) await browser.close().catch(() => {});
}
clearTimeout(watchdog);
if (failed) {
  console.log(`page test: FAILED: ${failed.message || failed}`);
  process.exit(1);
}
console.log("page test: ok");
process.exit(0);
