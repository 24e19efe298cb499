// Drives fanout's page (GET /) in Debian's chromium through playwright-core.
//
//   node tests/browser/page_test.mjs http://127.0.0.1:PORT/ [--reconnect]
//
// Env: NODE_PATH must reach playwright-core (tests/browser/setup.sh prints
// it); CHROMIUM (default /usr/bin/chromium); SCREENSHOT (default
// target/browser-test/page.png).
//
// Checks, each bounded in time: the socket opens; candles are drawn and keep
// updating; the canvas shows candle colours; the default symbol's tiny
// prices are written readably (0.0₇28852) on the axis, in the legend and in
// the event rows, with the exact string the server sent as hover text;
// events stream in, and every field of every row (qty above all) is inside
// the row, not cut off, at a desktop width and at narrow ones; a filter for
// `payment` leaves only payments; switching symbol and interval re-draws;
// a chat line comes back in the chat log; a second visitor sees it as an
// earlier message and both visitors list each other as members, until the
// second one leaves. With --reconnect it then prints
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

// A tiny price as the page writes it: "0.0", the count of zeros after the
// point as subscript digits, then the significant digits.
const TINY_PRICE = /^0\.0([₀-₉]+)([1-9][0-9]*)$/;
const SUBSCRIPT = "₀₁₂₃₄₅₆₇₈₉";

// The decimal a tiny price's text stands for: 0.0₇28852 -> 0.000000028852.
function expandTiny(text) {
  const m = TINY_PRICE.exec(text);
  if (!m) return null;
  const zeros = Number([...m[1]].map((c) => SUBSCRIPT.indexOf(c)).join(""));
  return `0.${"0".repeat(zeros)}${m[2]}`;
}

// Checks that `shown` is a readable rounding of `exact`, the string the
// server sent (one of `sent`): subscript form, at most 5 significant
// digits, within half a unit of its last digit.
function checkTinyPrice(where, shown, exact, sent) {
  if (!sent.has(exact)) throw new Error(`${where}: the hover text ${JSON.stringify(exact)} is not a price the server sent (digits lost or changed?)`);
  const expanded = expandTiny(shown);
  if (!expanded) throw new Error(`${where}: ${JSON.stringify(shown)} is not written as a tiny price (0.0₇28852) though the server sent ${exact}`);
  const digits = TINY_PRICE.exec(shown)[2];
  if (digits.length > 5) throw new Error(`${where}: ${shown} shows ${digits.length} significant digits, expected at most 5`);
  const unit = 10 ** -(expanded.length - 2); // one in the last shown place
  const error = Math.abs(Number(expanded) - Number(exact));
  if (error > unit / 2 * 1.0001) throw new Error(`${where}: ${shown} (${expanded}) is not ${exact} rounded`);
}

// Every event row's fields must lie inside the row, none cut off, and the
// log must not scroll sideways. Returns the problems found and how many
// rows and trade quantities were looked at.
const eventLayout = () => {
  const log = document.getElementById("event-log");
  const problems = [];
  const page = document.documentElement;
  if (page.scrollWidth > window.innerWidth) problems.push(`the page scrolls sideways (${page.scrollWidth}px in a ${window.innerWidth}px window)`);
  if (log.scrollWidth > log.clientWidth + 1) problems.push(`#event-log scrolls sideways (${log.scrollWidth} > ${log.clientWidth})`);
  const rows = [...log.querySelectorAll("li")].slice(0, 40);
  let qty = 0;
  for (const [i, li] of rows.entries()) {
    const box = li.getBoundingClientRect();
    const style = getComputedStyle(li);
    const left = box.left + parseFloat(style.paddingLeft) - 0.5;
    const right = box.right - parseFloat(style.paddingRight) + 0.5;
    if (li.scrollWidth > li.clientWidth + 1) problems.push(`row ${i} (${li.dataset.type}) overflows: scrollWidth ${li.scrollWidth} > clientWidth ${li.clientWidth}`);
    if (box.right > window.innerWidth + 0.5) problems.push(`row ${i} ends at x ${box.right.toFixed(1)}, past the window's ${window.innerWidth}`);
    // Every field of the event (the row's hover text) has its key=value.
    const event = JSON.parse(li.title);
    const shown = [...li.querySelectorAll(".field")].map((f) => f.dataset.field);
    const missing = Object.keys(event).filter((k) => k !== "type" && k !== "ts" && !shown.includes(k));
    if (missing.length) problems.push(`row ${i}: fields not shown: ${missing.join(", ")}`);
    // A shortened value (an id) keeps the whole of it as its hover text.
    for (const v of li.querySelectorAll(".field .v")) {
      const key = v.parentElement.dataset.field;
      if (v.textContent.includes("…") && v.title !== String(event[key])) problems.push(`row ${i}: ${key} shows ${v.textContent} with hover text ${JSON.stringify(v.title)}, not the whole value`);
    }
    for (const field of li.querySelectorAll(".field")) {
      const r = field.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) problems.push(`row ${i}: field ${field.dataset.field} has no size`);
      else if (r.left < left || r.right > right) problems.push(`row ${i}: field ${field.dataset.field} spans x ${r.left.toFixed(1)}-${r.right.toFixed(1)}, outside the row's ${left.toFixed(1)}-${right.toFixed(1)}`);
      if (field.scrollWidth > field.clientWidth + 1) problems.push(`row ${i}: field ${field.dataset.field} is clipped (scrollWidth ${field.scrollWidth} > ${field.clientWidth})`);
    }
    if (li.dataset.type === "trade") {
      const q = li.querySelector('.field[data-field="qty"]');
      if (!q) problems.push(`row ${i}: a trade without a qty field`);
      else if (!q.textContent.startsWith("qty=") || q.textContent.length <= 4) problems.push(`row ${i}: qty shows ${JSON.stringify(q.textContent)}`);
      else qty++;
    }
  }
  return { problems, rows: rows.length, qty, width: log.clientWidth };
};

async function checkEventLayout(page, label) {
  await waitFor(page, `${label}: trades in the event log`, () => document.querySelectorAll('#event-log li[data-type="trade"]').length >= 2);
  const layout = await page.evaluate(eventLayout);
  if (layout.problems.length) throw new Error(`${label}: event rows cut off: ${layout.problems.slice(0, 5).join("; ")}`);
  if (!layout.qty) throw new Error(`${label}: no trade row with a qty to look at`);
  log(`${label}: ${layout.rows} event row(s) in a ${layout.width}px log, every field inside its row (${layout.qty} qty)`);
}

const members = () => [...document.querySelectorAll("#chat-members .member")].map((m) => m.dataset.nick).sort().join(",");

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
  // The exact price strings the server sent, to check the hover texts by.
  const sent = { kline: new Set(), trade: new Set() };
  page.on("websocket", (ws) => ws.on("framereceived", ({ payload }) => {
    if (typeof payload !== "string") return;
    let msg;
    try { msg = JSON.parse(payload); } catch { return; }
    if (msg.type === "kline") for (const k of ["open", "high", "low", "close"]) sent.kline.add(msg[k]);
    else if (msg.type === "match" && msg.event && msg.event.type === "trade") sent.trade.add(msg.event.price);
  }));

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

  // --- tiny prices, readable, exact on hover ---
  // fanout's default symbol, PUMP-SOL, trades near 0.000000029.
  const defaultInfo = await page.textContent("#chart-info");
  if (!defaultInfo.startsWith("PUMP-SOL ")) throw new Error(`the chart starts on ${defaultInfo}, expected the default symbol PUMP-SOL`);
  const legend = await page.$$eval("#legend [data-field]", (spans) => spans.map((s) => ({ field: s.dataset.field, text: s.textContent, title: s.title })));
  const missingLegend = ["open", "high", "low", "close"].filter((f) => !legend.some((l) => l.field === f));
  if (missingLegend.length) throw new Error(`the legend has no ${missingLegend.join(", ")} value (#legend [data-field]): ${await page.textContent("#legend")}`);
  for (const { field, text, title } of legend.filter((l) => l.field !== "volume")) checkTinyPrice(`legend ${field}`, text, title, sent.kline);
  const close = legend.find((l) => l.field === "close");
  log(`legend: close ${close.text}, hover text ${close.title}`);
  const labels = JSON.parse(await page.getAttribute("#chart", "data-price-labels") || "[]");
  if (labels.length < 2) throw new Error(`the price axis has ${labels.length} label(s): ${labels}`);
  const unreadable = labels.filter((l) => !expandTiny(l));
  if (unreadable.length) throw new Error(`price axis labels not written as tiny prices: ${unreadable.join(", ")}`);
  log(`price axis: ${labels.join("  ")}`);
  // The writing rules at their edges: rounding that carries into the
  // zeros, exponent forms (a publisher's JSON number), signs, separators.
  const rules = await page.evaluate(() => [
    ["0.000000028851789330", formatDecimal("0.000000028851789330").text, "0.0₇28852"],
    ["0.00000002999999", formatDecimal("0.00000002999999").text, "0.0₇3"],
    ["0.0000999996", formatDecimal("0.0000999996").text, "0.0001"],
    ["0.000123", formatDecimal("0.000123").text, "0.000123"],
    ["2.8e-8 (number)", formatDecimal(2.8e-8).text, "0.0₇28"],
    ["-0.0000000123456", formatDecimal("-0.0000000123456").text, "-0.0₇12346"],
    ["45012.37", formatDecimal("45012.37").text, "45012.37"],
    ["3626169.039305", formatDecimal("3626169.039305").text, "3,626,169.04"],
    ["tick 2.9e-8, 10 decimals", tickLabel(2.9e-8, 10), "0.0₇290"],
    ["last price on a 12-decimal axis", formatPrice(2.807e-8, "0.000000028069981505", 12), "0.0₇2806998"],
    ["last price on a 10-decimal axis", formatPrice(2.807e-8, "0.000000028069981505", 10), "0.0₇2807"],
    ["45012.3 on a 1-decimal axis", formatPrice(45012.3, "45012.30", 1), "45012.3"],
    ["45012.37 on a 0-decimal axis", formatPrice(45012.37, "45012.37", 0), "45012.37"],
    ["exact of 0.000000028851789330", formatDecimal("0.000000028851789330").exact, "0.000000028851789330"],
  ]);
  const broken = rules.filter(([, got, want]) => got !== want);
  if (broken.length) throw new Error(`price writing: ${broken.map(([what, got, want]) => `${what} -> ${got}, expected ${want}`).join("; ")}`);
  // Hovering a candle puts its exact prices in the canvas's hover text.
  const canvasBox = await page.locator("#chart-canvas").boundingBox();
  const lastX = await page.evaluate(() => chart.drawn[chart.drawn.length - 1].x);
  await page.mouse.move(canvasBox.x + lastX, canvasBox.y + canvasBox.height / 3);
  const hoverText = await waitFor(page, "the hovered candle's exact prices in the canvas's title",
    () => document.getElementById("chart-canvas").title, null, 5000);
  const hoverPrices = hoverText.split("\n").filter((l) => /^[OHLC] /.test(l)).map((l) => l.slice(2));
  const notSent = hoverPrices.filter((p) => !sent.kline.has(p));
  if (hoverPrices.length !== 4 || notSent.length) throw new Error(`canvas hover text ${JSON.stringify(hoverText)}: expected the candle's four exact prices as the server sent them`);
  log(`canvas hover: ${hoverText.replace(/\n/g, " | ")}`);
  await page.mouse.move(5, 5);

  // --- the event stream ---
  await waitFor(page, "events in #event-log", () => document.querySelectorAll("#event-log li").length >= 5);
  const mixed = await page.evaluate(eventTypes);
  log(`event log: ${mixed.length} row(s), types ${[...new Set(mixed)].join(", ")}`);

  // A PUMP-SOL trade's price, written like the chart's, exact on hover.
  const pumpTrade = await waitFor(page, "a PUMP-SOL trade in the event log", () => {
    for (const li of document.querySelectorAll('#event-log li[data-type="trade"]')) {
      const symbol = li.querySelector('[data-field="symbol"] .v');
      const price = li.querySelector('[data-field="price"] .v');
      if (symbol && price && symbol.textContent === "PUMP-SOL") return { text: price.textContent, title: price.title };
    }
    return null;
  });
  checkTinyPrice("event row price", pumpTrade.text, pumpTrade.title, sent.trade);
  log(`event row: price ${pumpTrade.text}, hover text ${pumpTrade.title}`);

  // Every field visible (qty was cut off once), at a desktop width, at the
  // narrowest two-column one (the events panel at its 400px minimum) and at
  // a phone's (one column).
  await checkEventLayout(page, "1400px wide");
  for (const [width, height] of [[1000, 760], [420, 900]]) {
    await page.setViewportSize({ width, height });
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    await checkEventLayout(page, `${width}px wide`);
  }
  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-narrow.png") });
  await page.setViewportSize({ width: 1400, height: 860 });

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
  const nick1 = await page.textContent("#me");
  log(`chat: "${line}" echoed as ${nick1}`);
  await waitFor(page, `${nick1} alone in the member list`, (n) => document.getElementById("chat-members").dataset.count === "1"
    && document.querySelector("#chat-members .member.me")?.dataset.nick === n, nick1, 5000);

  // A second visitor sees that line as an earlier message, and the two
  // list each other as members.
  const page2 = await browser.newPage({ viewport: { width: 1400, height: 860 } });
  page2.on("pageerror", (e) => pageErrors.push(`second visitor: ${e}`));
  await page2.goto(url, { waitUntil: "load", timeout: 15000 });
  await waitFor(page2, "the second visitor's nick", () => document.getElementById("me").textContent !== "…");
  const nick2 = await page2.textContent("#me");
  const earlier = await waitFor(page2, `"${line}" as an earlier message in the second visitor's chat`, (t) => {
    const li = [...document.querySelectorAll("#chat-log li.history")].find((l) => l.textContent.includes(t));
    const divider = [...document.querySelectorAll("#chat-log li.divider")].map((d) => d.textContent);
    return li && { text: li.textContent, title: li.title, divider };
  }, line, 10000);
  if (!earlier.divider.some((d) => d.includes("earlier messages"))) throw new Error(`no "earlier messages" divider above the history: ${earlier.divider}`);
  const both = [nick1, nick2].sort().join(",");
  await waitFor(page2, `the second visitor's member list to be ${both}`, (want) => [...document.querySelectorAll("#chat-members .member")].map((m) => m.dataset.nick).sort().join(",") === want, both, 5000)
    .catch(async (e) => { throw new Error(`${e.message}: it shows ${await page2.evaluate(members)}`); });
  await waitFor(page, `${nick2} in the first visitor's member list`, (want) => [...document.querySelectorAll("#chat-members .member")].map((m) => m.dataset.nick).sort().join(",") === want, both, 5000)
    .catch(async (e) => { throw new Error(`${e.message}: it shows ${await page.evaluate(members)}`); });
  const ownJoin = await page2.evaluate((n) => [...document.querySelectorAll("#chat-log li")].filter((l) => l.textContent.endsWith(`${n} joined`)).map((l) => l.className), nick2);
  if (ownJoin.length !== 1 || ownJoin[0].includes("history")) throw new Error(`the second visitor's own join line: ${JSON.stringify(ownJoin)}, expected one live line`);
  log(`second visitor ${nick2}: sees "${earlier.text}" as an earlier message (${earlier.divider.join(" / ")}); members ${both} on both pages`);
  await page2.close();
  await waitFor(page, `${nick2} gone from the first visitor's member list`, (n) => !document.querySelector(`#chat-members .member[data-nick="${n}"]`), nick2, 5000);
  log(`second visitor left: members ${await page.evaluate(members)}`);

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
