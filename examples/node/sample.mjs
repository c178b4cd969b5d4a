// Sample images from a genforge bundle in Node.js, written from docs/bundle.md alone.
//
//   node sample.mjs BUNDLE [--n 4] [--seed 0] [--start 0] [--decoder graph|steps] [--out result.json]
//
// graph: one call of sample.onnx (uniforms in, uint8 images out). steps: the row/step protocol, with the
// caches paired as the manifest's "state" says and the inverse-CDF rule applied here. Either way the
// uniforms come from the bundle's randomness scheme (Philox4x32-10), so the images equal
// genforge.runtime.load(BUNDLE).sample(n, seed=seed, start=start). The result also holds each image's
// log-probability from forward.onnx.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import ort from "onnxruntime-node";

// ---- randomness (docs/bundle.md, "Randomness") --------------------------------------------------------------
const M0 = 0xd2511f53, M1 = 0xcd9e8d57, W0 = 0x9e3779b9, W1 = 0xbb67ae85;

// High and low 32 bits of a 32x32-bit product, exactly, in doubles (every partial product < 2^53).
function mulhilo(a, b) {
  const lo = a * (b & 0xffff);
  const hi = a * (b >>> 16);
  const carry = Math.floor(((hi % 65536) * 65536 + lo) / 4294967296);
  return [Math.floor(hi / 65536) + carry, Math.imul(a, b) >>> 0];
}

export function philox4x32(c, k) {
  let [c0, c1, c2, c3] = c;
  let [k0, k1] = k;
  for (let r = 0; r < 10; r++) {
    const [hi0, lo0] = mulhilo(M0, c0);
    const [hi1, lo1] = mulhilo(M1, c2);
    [c0, c1, c2, c3] = [(hi1 ^ c1 ^ k0) >>> 0, lo1, (hi0 ^ c3 ^ k1) >>> 0, lo0];
    k0 = (k0 + W0) >>> 0;
    k1 = (k1 + W1) >>> 0;
  }
  return [c0, c1, c2, c3];
}

const unit = (hi, lo) => (hi * 2097152 + (lo >>> 11)) * 2 ** -53; // exact: < 2^53 before the scaling

// `count` uniforms of image `image` (BigInt seed and image: both may exceed 2^53).
export function uniforms(seed, image, count, stream = 0) {
  const key = [Number(seed & 0xffffffffn), Number(seed >> 32n)];
  const ilo = Number(image & 0xffffffffn), ihi = Number(image >> 32n);
  const out = new Float64Array(count);
  for (let b = 0; 2 * b < count; b++) {
    const w = philox4x32([b, ilo, ihi, stream], key);
    out[2 * b] = unit(w[0], w[1]);
    if (2 * b + 1 < count) out[2 * b + 1] = unit(w[2], w[3]);
  }
  return out;
}

// ---- the sampling rule (docs/bundle.md, "Sampling rule") ---------------------------------------------------
// log_probs of one sub-pixel (K float32) and its uniform -> the level.
function inverseCdf(logProbs, offset, K, u) {
  let max = -Infinity;
  for (let l = 0; l < K; l++) max = Math.max(max, logProbs[offset + l]);
  const cdf = new Float64Array(K);
  let acc = 0;
  for (let l = 0; l < K; l++) cdf[l] = acc += Math.exp(logProbs[offset + l] - max);
  const target = u * cdf[K - 1];
  let level = 0;
  for (let l = 0; l < K - 1; l++) if (cdf[l] <= target) level++;
  return level;
}

// ---- the bundle ----------------------------------------------------------------------------------------------
function readManifest(dir) {
  const m = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"));
  if (m.format !== "genforge-bundle") throw new Error(`${dir}: not a genforge bundle`);
  if (![4, 5, 6, 7, 8].includes(m.version)) throw new Error(`${dir}: bundle format version ${m.version}; this client reads 4 to 8`);
  const r = m.randomness;
  if (r.name !== "philox4x32-10" || r.version !== 1) throw new Error(`unknown randomness ${JSON.stringify(r)}`);
  if (m.family !== "autoregressive") throw new Error(`this client samples autoregressive bundles, not ${m.family}`);
  checkBinding(dir, m);
  return m;
}

// Version 7: the weights' safetensors metadata keeps the manifest's bound fields as exported (docs/bundle.md,
// "Bound fields"); a manifest that contradicts them was edited.
const BOUND = ["family", "model", "model_config", "image", "levels", "num_classes", "likelihood", "latent_size",
  "prior", "caches"];
const canonical = (v) => JSON.stringify(v ?? null, (_, x) =>
  x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x);
function checkBinding(dir, m) {
  if (m.version < 7) return;
  const raw = readFileSync(join(dir, m.weights));
  const size = Number(raw.readBigUInt64LE(0));
  if (size > raw.length - 8) throw new Error(`${dir}: ${m.weights} is not a safetensors file`);
  const meta = JSON.parse(raw.subarray(8, 8 + size).toString("utf8")).__metadata__ ?? {};
  if (typeof meta["genforge.manifest"] !== "string") throw new Error(`${dir}: the weights lack the bound fields`);
  const bound = JSON.parse(meta["genforge.manifest"]);
  for (const k of BOUND) {
    if (canonical(m[k]) !== canonical(bound[k])) {
      throw new Error(`${dir}: manifest field ${k} contradicts the weights (the manifest was edited)`);
    }
  }
}

// From the file's path, onnxruntime finds its external data (v8: weights.safetensors, onnx.data) beside it.
const session = (dir, m, name) => ort.InferenceSession.create(join(dir, m.graphs[`${name}.onnx`].file));
const f32 = (data, dims) => new ort.Tensor("float32", data, dims);
const i64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), dims);

// Uniforms of images start..start+n-1, (n, H, W, C) in row-major order, and their labels (image i: i mod classes).
function draws(m, n, seed, start) {
  const { height: H, width: W, channels: C } = m.image;
  const u = new Float64Array(n * H * W * C);
  for (let b = 0; b < n; b++) u.set(uniforms(BigInt(seed), BigInt(start + b), H * W * C), b * H * W * C);
  const labels = m.num_classes ? Array.from({ length: n }, (_, b) => (start + b) % m.num_classes) : null;
  return { u, labels };
}

async function sampleGraph(dir, m, n, seed, start) {
  const { height: H, width: W, channels: C } = m.image;
  const { u, labels } = draws(m, n, seed, start);
  const feeds = {
    uniforms: new ort.Tensor("float64", u, [n, H, W, C]),
    prefix: new ort.Tensor("uint8", new Uint8Array(n * H * W * C), [n, H, W, C]),
    start_row: i64([0], [1]),
  };
  if (labels) feeds.labels = i64(labels, [n]);
  const out = await (await session(dir, m, "sample")).run(feeds);
  return Uint8Array.from(out.images.data);
}

async function sampleSteps(dir, m, n, seed, start) {
  const { height: H, width: W, channels: C } = m.image;
  const K = m.levels;
  const { u, labels } = draws(m, n, seed, start);
  const row = await session(dir, m, "row"), step = await session(dir, m, "step");
  const caches = {}; // cache name -> tensor, zeros at the start
  for (const c of m.caches) {
    const dims = c.shape.map((d) => (d === "batch" ? n : d));
    caches[c.name] = f32(new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
  }
  // Run a cached graph: feed what its "state" says it reads, keep what it writes.
  async function call(sess, graph, feeds) {
    for (const s of graph.state) if (s.input) feeds[s.input] = caches[s.cache];
    if (labels) feeds.labels = i64(labels, [n]);
    const out = await sess.run(feeds);
    for (const s of graph.state) caches[s.cache] = out[s.output];
    return out;
  }
  const x = new Float32Array(n * C * H * W); // (n, C, H, W) levels
  const rowOf = (i) => {
    const r = new Float32Array(n * C * W);
    for (let b = 0; b < n; b++) for (let k = 0; k < C; k++)
      r.set(x.subarray(((b * C + k) * H + i) * W, ((b * C + k) * H + i + 1) * W), (b * C + k) * W);
    return f32(r, [n, C, W]);
  };
  for (let i = 0; i < H; i++) {
    const prev = i > 0 ? rowOf(i - 1) : f32(new Float32Array(n * C * W), [n, C, W]);
    await call(row, m.graphs["row.onnx"], { x_prev_row: prev, has_prev: f32(Float32Array.of(i > 0 ? 1 : 0), [1]) });
    for (let j = 0; j < W; j++) for (let k = 0; k < C; k++) {
      const out = await call(step, m.graphs["step.onnx"], { x_row: rowOf(i), j: i64([j], [1]) });
      const lp = out.log_probs.data; // (n, C, K)
      for (let b = 0; b < n; b++) {
        const level = inverseCdf(lp, (b * C + k) * K, K, u[((b * H + i) * W + j) * C + k]);
        x[((b * C + k) * H + i) * W + j] = level;
      }
    }
  }
  const images = new Uint8Array(n * H * W * C); // (n, H, W, C)
  for (let b = 0; b < n; b++) for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) for (let k = 0; k < C; k++)
    images[((b * H + i) * W + j) * C + k] = x[((b * C + k) * H + i) * W + j];
  return images;
}

// log p(image) from forward.onnx: the sum over sub-pixels of log_probs at the image's levels.
async function logProb(dir, m, images, n, start) {
  const { height: H, width: W, channels: C } = m.image;
  const K = m.levels;
  const x = new Float32Array(n * C * H * W);
  for (let b = 0; b < n; b++) for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) for (let k = 0; k < C; k++)
    x[((b * C + k) * H + i) * W + j] = images[((b * H + i) * W + j) * C + k];
  const feeds = { x: f32(x, [n, C, H, W]) };
  if (m.num_classes) feeds.labels = i64(Array.from({ length: n }, (_, b) => (start + b) % m.num_classes), [n]);
  const lp = (await (await session(dir, m, "forward")).run(feeds)).log_probs.data; // (n, C, H, W, K)
  const out = new Array(n).fill(0);
  for (let b = 0; b < n; b++) for (let p = 0; p < C * H * W; p++) out[b] += lp[(b * C * H * W + p) * K + x[b * C * H * W + p]];
  return out;
}

async function main() {
  const args = process.argv.slice(2);
  const opt = (name, dflt) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1] : dflt);
  const dir = args[0];
  const n = Number(opt("n", 4)), seed = Number(opt("seed", 0)), start = Number(opt("start", 0));
  const decoder = opt("decoder", "graph");
  const m = readManifest(dir);
  const images = decoder === "graph" ? await sampleGraph(dir, m, n, seed, start) : await sampleSteps(dir, m, n, seed, start);
  const { height: H, width: W, channels: C } = m.image;
  const result = { shape: [n, H, W, C], images: Array.from(images), log_prob: await logProb(dir, m, images, n, start) };
  const out = opt("out", null);
  if (out) writeFileSync(out, JSON.stringify(result));
  else console.log(JSON.stringify(result));
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((e) => {
    console.error(`error: ${e.message}`);
    process.exit(1);
  });
}
