// The page gen-demo serves: samples, a class picker and live completion, computed in the browser by
// onnxruntime-web from the bundle's ONNX graphs. The randomness, the sampling rule and both decoding protocols
// are genforge.mjs, the module the Node client runs too, so a seed gives genforge.runtime's images.
//
// URL parameters: ep=wasm|webgpu (default: webgpu where the browser has an adapter, else wasm; see openBundle for
// what runs on it), decode_ep, decoder=auto|graph|steps, n, seed, start. window.demo exposes the same calls
// to scripts (the page's test drives it).
import * as ort from "/ort/ort.all.min.mjs";
import {
  checkBinding, checkManifest, defaultLabels, logProb, sampleGraph, sampleSteps, stepLogProbs, toNchw,
} from "./genforge.mjs";

ort.env.wasm.wasmPaths = "/ort/";
ort.env.logLevel = "error"; // nor its warnings about which nodes run on the CPU (logSeverityLevel below): noise to a user
const params = new URLSearchParams(location.search);
// WebAssembly threads: every core (at most 8) where the page is cross-origin isolated (gen-demo's headers), not
// onnxruntime-web's half of them: on 2 cores sample.onnx took 83 ms an image at batch 16 with 2 threads, 108 ms
// with its default 1 (benchmarks/web_page.py --threads). threads=N chooses.
ort.env.wasm.numThreads = params.has("threads") ? Number(params.get("threads"))
  : self.crossOriginIsolated ? Math.min(8, navigator.hardwareConcurrency || 1) : 1;
const $ = (id) => document.getElementById(id);

async function fetchBytes(name) {
  const r = await fetch(`bundle/${name}`);
  if (!r.ok) throw new Error(`bundle/${name}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function webgpuAdapter() {
  try {
    return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter()));
  } catch {
    return false;
  }
}

// The bundle: its manifest (checked as docs/bundle.md says), and a session per ONNX graph on first use.
async function openBundle() {
  const t0 = performance.now();
  const m = checkManifest(await (await fetch("bundle/manifest.json")).json(), "bundle");
  const weights = await fetchBytes(m.weights);
  checkBinding(m, weights, "bundle");
  // Format 8 graphs keep their tensors in weights.safetensors and onnx.data (external data); in a page there is
  // no directory beside the model, so the files' bytes go with each session.
  const externalData = [];
  if (m.version >= 8) {
    externalData.push({ path: m.weights, data: weights });
    if (m.files["onnx.data"]) externalData.push({ path: "onnx.data", data: await fetchBytes("onnx.data") });
  }
  const ep = params.get("ep") ?? ((await webgpuAdapter()) ? "webgpu" : "wasm");
  // Decoding runs on WebAssembly whatever `ep` says, WebGPU serving the forward graph (log-likelihoods) alone:
  // onnxruntime-web 1.30.0 has no WebGPU kernel for Loop, and with sample.onnx's loop body on WebGPU around a
  // WebAssembly Loop it fails in the body's ScatterElements; the row/step graphs run on WebGPU but their
  // log-probabilities were up to 0.026 nats off the forward graph's (on SwiftShader; 2.4e-7 on WebAssembly and for
  // the forward graph on WebGPU), enough to draw other images (tests/test_web.py). decode_ep=webgpu tries anyway.
  const decodeEp = params.get("decode_ep") ?? "wasm";
  const providers = (name) => ((name === "forward" ? ep : name === "sample" ? "wasm" : decodeEp) === "webgpu"
    ? ["webgpu", "wasm"] : ["wasm"]);
  const made = {};
  const session = (name) => {
    made[name] ??= (async () => {
      const graph = m.graphs[`${name}.onnx`];
      if (!graph) throw new Error(`the bundle has no ${name}.onnx`);
      return ort.InferenceSession.create(await fetchBytes(graph.file),
        { executionProviders: providers(name), externalData, logSeverityLevel: 3 });
    })();
    return made[name];
  };
  // One at a time: onnxruntime-web initialises each backend on its first session, and refuses two at once.
  for (const name of ["forward", "row", "step"]) await session(name);
  return { m, session, ep, decodeEp, loadMs: performance.now() - t0 };
}

// ---- drawing images ------------------------------------------------------------------------------------------
function paint(canvas, images, n, m, { scale, columns = n, dimBelow = null }) {
  const { height: H, width: W, channels: C } = m.image;
  const rows = Math.ceil(n / columns), gap = 1;
  canvas.width = columns * (W * scale + gap) + gap;
  canvas.height = rows * (H * scale + gap) + gap;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#446";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const top = m.levels - 1;
  for (let b = 0; b < n; b++) {
    const x0 = gap + (b % columns) * (W * scale + gap), y0 = gap + Math.floor(b / columns) * (H * scale + gap);
    for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) {
      const p = ((b * H + i) * W + j) * C;
      const v = (k) => Math.round((255 * images[p + (C === 3 ? k : 0)]) / top);
      const dim = dimBelow !== null && i >= dimBelow ? 0.35 : 1;
      ctx.fillStyle = `rgb(${v(0) * dim},${v(1) * dim},${v(2) * dim})`;
      ctx.fillRect(x0 + j * scale, y0 + i * scale, scale, scale);
    }
  }
}

const scaleFor = (m, target) => Math.max(2, Math.floor(target / Math.max(m.image.height, m.image.width)));

// ---- the page ------------------------------------------------------------------------------------------------
async function main() {
  const bundle = await openBundle();
  const { m, session, ep, decodeEp } = bundle;
  const { height: H, width: W, channels: C } = m.image;
  const preferred = { graph: 0, steps: 0 }; // ms per image as timed by "Time both" (0: not yet)
  // Measured in headless Chromium on WebAssembly (README, "In the browser"): one sample.onnx call beats the
  // row/step protocol, which pays a JavaScript -> WebAssembly round trip per sub-pixel.
  const autoDecoder = () => (preferred.graph && preferred.steps ? (preferred.graph <= preferred.steps ? "graph" : "steps")
    : m.graphs["sample.onnx"] ? "graph" : "steps");
  $("about").textContent = `${m.model} bundle (format ${m.version}): ${H}x${W}x${C}, ${m.levels} levels` +
    `${m.num_classes ? `, ${m.num_classes} classes` : ""}; onnxruntime-web ${ort.env.versions?.web ?? ""}: decoding on ` +
    `${decodeEp}, log-likelihoods on ${ep}; ` +
    `loaded in ${bundle.loadMs.toFixed(0)} ms`;
  if (m.num_classes) {
    $("class-label").hidden = false;
    $("class").add(new Option("index mod classes", ""));
    for (let c = 0; c < m.num_classes; c++) $("class").add(new Option(String(c), String(c)));
  }
  for (let l = m.levels - 1; l >= 1; l--) $("ink").add(new Option(`level ${l}`, String(l)));
  if (!m.graphs["sample.onnx"]) $("decoder").querySelector("option[value=graph]").disabled = true;
  for (const k of ["n", "seed", "start"]) if (params.has(k)) $(k).value = params.get(k);
  if (params.has("decoder")) $("decoder").value = params.get("decoder");
  $("rows").max = String(H);
  $("rows").value = String(Math.floor(H / 2));

  const labelsFor = (n, start) => {
    if (!m.num_classes) return null;
    const c = $("class").value;
    return c === "" ? defaultLabels(m, n, start) : new Array(n).fill(Number(c));
  };

  // One request through the decoder asked for; returns the images and the time they took.
  async function run(decoder, opts) {
    const which = decoder === "auto" ? autoDecoder() : decoder;
    const t0 = performance.now();
    const images = await (which === "graph" ? sampleGraph : sampleSteps)(ort, session, m, opts);
    return { images, decoder: which, ms: performance.now() - t0 };
  }

  let lastSamples = null;
  async function sample({ n, seed, start, decoder = $("decoder").value, labels = labelsFor(n, start) }) {
    const r = await run(decoder, { n, seed, start, labels });
    lastSamples = { ...r, n, seed, start, labels };
    const columns = Math.min(n, Math.max(1, Math.round(Math.sqrt(n * 1.5))));
    paint($("grid"), r.images, n, m, { scale: scaleFor(m, 64), columns });
    $("sample-status").textContent = `${n} images (seed ${seed}, indices ${start} to ${start + n - 1}) in ` +
      `${r.ms.toFixed(0)} ms: ${(r.ms / n).toFixed(1)} ms per image, ${((1000 * n) / r.ms).toFixed(1)} images/s ` +
      `(${r.decoder === "graph" ? "sample.onnx on wasm" : `row/step graphs on ${decodeEp}`})`;
    return { images: Array.from(r.images), decoder: r.decoder, ms: r.ms, labels };
  }

  // The drawing: (1, H, W, C) levels; rows at and below "rows kept" are shown dimmed (the model replaces them).
  const drawing = new Uint8Array(H * W * C);
  const drawScale = scaleFor(m, 240);
  const rowsKept = () => Math.max(0, Math.min(H, Math.floor(Number($("rows").value))));
  const repaint = () => paint($("draw"), drawing, 1, m, { scale: drawScale, dimBelow: rowsKept() });
  function ink(event) {
    const box = $("draw").getBoundingClientRect();
    const j = Math.floor((event.clientX - box.left - 1) / drawScale), i = Math.floor((event.clientY - box.top - 1) / drawScale);
    if (i < 0 || i >= H || j < 0 || j >= W) return;
    const level = event.buttons & 2 || event.shiftKey ? 0 : Number($("ink").value);
    drawing.fill(level, (i * W + j) * C, (i * W + j + 1) * C);
    repaint();
  }
  $("draw").addEventListener("pointerdown", (e) => { e.preventDefault(); ink(e); });
  $("draw").addEventListener("pointermove", (e) => { if (e.buttons) ink(e); });
  $("draw").addEventListener("contextmenu", (e) => e.preventDefault());
  $("rows").addEventListener("input", repaint);
  $("clear").addEventListener("click", () => { drawing.fill(0); repaint(); });
  $("grid").addEventListener("click", (e) => { // copy the clicked sample into the drawing
    if (!lastSamples) return;
    const box = $("grid").getBoundingClientRect(), s = scaleFor(m, 64);
    const columns = Math.min(lastSamples.n, Math.max(1, Math.round(Math.sqrt(lastSamples.n * 1.5))));
    const b = Math.floor((e.clientY - box.top) / (H * s + 1)) * columns + Math.floor((e.clientX - box.left) / (W * s + 1));
    if (b >= lastSamples.n) return;
    drawing.set(lastSamples.images.subarray(b * H * W * C, (b + 1) * H * W * C));
    repaint();
  });
  repaint();

  // Completes the drawing's top `rows` rows as images seed/start..start+count-1 (each its own uniforms), and
  // scores what was drawn: log p(the kept rows), which the causal model gives from one forward pass.
  async function complete({ rows = rowsKept(), count = 4, seed = Number($("seed").value), start = 0,
    decoder = $("decoder").value, labels = labelsFor(count, start), prefix = drawing } = {}) {
    const prefixes = new Uint8Array(count * H * W * C);
    for (let b = 0; b < count; b++) prefixes.set(prefix, b * H * W * C);
    const r = await run(decoder, { n: count, seed, start, labels, prefix: prefixes, startRow: rows });
    const drawn = await logProb(ort, session, m, prefix, { n: 1, labels: labels ? [labels[0]] : null, rows });
    const full = await logProb(ort, session, m, r.images, { n: count, start, labels });
    paint($("completed"), r.images, count, m, { scale: scaleFor(m, 120), columns: count });
    $("complete-status").textContent = `log p(the ${rows} drawn rows${labels ? ` | class ${labels[0]}` : ""}) = ` +
      `${drawn[0].toFixed(2)} nats; ${count} completions in ${r.ms.toFixed(0)} ms (${(r.ms / count).toFixed(1)} ms ` +
      `per image, ${r.decoder === "graph" ? "sample.onnx" : "row/step graphs"}); log p of each: ` +
      full.map((v) => v.toFixed(1)).join(", ");
    return { images: Array.from(r.images), prefix: Array.from(prefix), rows, seed, start, labels, decoder: r.decoder,
      ms: r.ms, log_prob_drawn: drawn[0], log_prob: full };
  }

  // Times both decoders on the current request; "auto" then runs the faster.
  async function timeBoth({ n = Number($("n").value), seed = Number($("seed").value), start = Number($("start").value) } = {}) {
    const out = {};
    for (const d of ["graph", "steps"]) {
      if (d === "graph" && !m.graphs["sample.onnx"]) continue;
      await run(d, { n, seed, start, labels: labelsFor(n, start) }); // warm-up: first runs allocate
      const r = await run(d, { n, seed, start, labels: labelsFor(n, start) });
      out[d] = preferred[d] = r.ms / n;
    }
    $("sample-status").textContent = Object.entries(out).map(([d, ms]) => `${d}: ${ms.toFixed(2)} ms per image`).join("; ") +
      ` at batch ${n} (decoding on ${decodeEp}); auto runs ${autoDecoder()}`;
    return out;
  }

  const guard = (fn) => async () => {
    $("error").textContent = "";
    try {
      await fn();
    } catch (e) {
      $("error").textContent = `error: ${e.message}`;
    }
  };
  const fromForm = () => ({ n: Number($("n").value), seed: Number($("seed").value), start: Number($("start").value) });
  $("sample").addEventListener("click", guard(() => sample(fromForm()).then((r) => { window.demo.last = r; })));
  $("complete").addEventListener("click", guard(() => complete().then((r) => { window.demo.last = r; })));
  $("time-both").addEventListener("click", guard(() => timeBoth()));
  for (const b of ["sample", "complete", "time-both"]) $(b).disabled = false;
  // The forward graph's log_probs (n, C, H, W, K) for images (n, H, W, C): what the page's sampling rule reads.
  async function forward({ images, n, labels = null }) {
    const feeds = { x: new ort.Tensor("float32", toNchw(images, n, H, W, C), [n, C, H, W]) };
    if (m.num_classes) feeds.labels = new ort.Tensor("int64", BigInt64Array.from((labels ?? defaultLabels(m, n, 0)).map(BigInt)), [n]);
    return Array.from((await (await session("forward")).run(feeds)).log_probs.data);
  }
  const steps = async ({ images, n, labels = null }) => Array.from(await stepLogProbs(ort, session, m, { images, n, labels }));
  Object.assign(window.demo, { manifest: m, ep, decodeEp, threads: ort.env.wasm.numThreads, loadMs: bundle.loadMs, sample, complete, timeBoth, forward, steps,
    drawing, drawScale });
  await sample(fromForm());
}

// state: "loading", then "ready" or "failed" (the error is on the page).
window.demo = { state: "loading" };
main().then(() => { window.demo.state = "ready"; }, (e) => {
  $("error").textContent = `error: ${e.message}`;
  window.demo.state = "failed";
});
