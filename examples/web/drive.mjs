// Drives the gen-demo page in the system's Chromium, headless (puppeteer-core: no browser download), the way
// a person would: samples for a seed with each decoder, picks a class, draws the top rows of an image with the
// mouse and asks for their completion; then times both decoders, takes a screenshot and reports what the
// page computed and showed, as JSON, for tests/test_web.py to compare with genforge.runtime.
//
//   node drive.mjs URL '{"n": 6, "seed": 1, "rows": 3, "strokes": [[[0, 1], [2, 6]]], "screenshot": "p.png"}'
//
// ep, decode_ep: the page's execution providers (default: its own choice); threads: WebAssembly threads; browser_args: Chromium's flags instead of
// --disable-gpu (e.g. SwiftShader's software WebGPU, see tests/test_web.py). strokes: lines drawn with the left button, each [[row, col], [row, col]] in image pixels. CHROMIUM names the
// browser (default /usr/bin/chromium).
import puppeteer from "puppeteer-core";

const [url, raw] = process.argv.slice(2);
const job = JSON.parse(raw ?? "{}");
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", ...(job.browser_args ?? ["--disable-gpu"])],
});
const report = { console: [] };
try {
  const page = await browser.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") report.console.push(msg.text()); });
  page.on("pageerror", (e) => report.console.push(String(e)));
  await page.setViewport({ width: 1200, height: 1000 });
  const t0 = Date.now();
  await page.goto(`${url}?n=${job.n}&seed=${job.seed}${job.ep ? `&ep=${job.ep}` : ""}${job.decode_ep ? `&decode_ep=${job.decode_ep}` : ""}${job.threads ? `&threads=${job.threads}` : ""}`, { waitUntil: "load" });
  await page.waitForFunction(() => window.demo && window.demo.state !== "loading", { timeout: 120000 });
  if ((await page.evaluate(() => window.demo.state)) === "failed") {
    throw new Error(`the page failed: ${await page.$eval("#error", (e) => e.textContent)}`);
  }
  report.load_ms = Date.now() - t0;
  report.page_load_ms = await page.evaluate(() => window.demo.loadMs);
  report.ep = await page.evaluate(() => window.demo.ep);
  report.decode_ep = await page.evaluate(() => window.demo.decodeEp);
  report.threads = await page.evaluate(() => window.demo.threads);
  report.error = await page.$eval("#error", (e) => e.textContent);

  const { n, seed } = job;
  // The forward graph on random images: the log-probabilities every decoder's draws come from.
  if (job.forward) report.forward = await page.evaluate((f) => window.demo.forward(f), job.forward);
  if (job.forward) report.step_log_probs = await page.evaluate((f) => window.demo.steps(f), job.forward);
  report.graph = await page.evaluate((n, seed) => window.demo.sample({ n, seed, start: 0, decoder: "graph" }), n, seed);
  report.steps = await page.evaluate((n, seed) => window.demo.sample({ n, seed, start: 3, decoder: "steps" }), n, seed);

  // Through the form, as a person would: a class (conditional bundles), then the Sample button.
  const conditional = await page.evaluate(() => Boolean(window.demo.manifest.num_classes));
  if (conditional) await page.select("#class", String(job.class ?? 1));
  await page.evaluate(() => { window.demo.last = null; });
  await page.click("#sample");
  await page.waitForFunction(() => window.demo.last || document.querySelector("#error").textContent, { timeout: 60000 });
  report.form = await page.evaluate(() => window.demo.last);
  if (conditional) await page.select("#class", ""); // back to index mod classes for the completion

  // Draw with the mouse on the drawing canvas: each stroke a line of pixel centres, left button held.
  const box = await (await page.$("#draw")).boundingBox();
  const scale = await page.evaluate(() => window.demo.drawScale);
  const at = ([i, j]) => [box.x + 1 + (j + 0.5) * scale, box.y + 1 + (i + 0.5) * scale];
  for (const [from, to] of job.strokes ?? []) {
    await page.mouse.move(...at(from));
    await page.mouse.down();
    await page.mouse.move(...at(to), { steps: 24 });
    await page.mouse.up();
  }
  await page.$eval("#rows", (e, rows) => { e.value = String(rows); e.dispatchEvent(new Event("input")); }, job.rows);
  await page.evaluate(() => { window.demo.last = null; });
  await page.click("#complete");
  await page.waitForFunction(() => window.demo.last || document.querySelector("#error").textContent, { timeout: 60000 });
  report.completion = await page.evaluate(() => window.demo.last);

  // time: one request, or a list of them; each gives ms per image of every decoder the bundle has.
  if (Array.isArray(job.time)) {
    report.timing = [];
    for (const t of job.time) report.timing.push({ ...t, ...(await page.evaluate((t) => window.demo.timeBoth(t), t)) });
  } else if (job.time) report.timing = await page.evaluate((t) => window.demo.timeBoth(t), job.time);
  report.error = await page.$eval("#error", (e) => e.textContent);
  // What each canvas shows: the number of distinct colours (a blank canvas has one or two).
  report.colours = await page.evaluate(() => Object.fromEntries([...document.querySelectorAll("canvas")].map((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let p = 0; p < d.length; p += 4) seen.add((d[p] << 16) | (d[p + 1] << 8) | d[p + 2]);
    return [c.id, seen.size];
  })));
  if (job.screenshot) await page.screenshot({ path: job.screenshot, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
