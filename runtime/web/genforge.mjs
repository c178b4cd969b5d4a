// genforge's sampling in JavaScript, one module for every JavaScript client: the Node client
// (examples/node/sample.mjs, onnxruntime-node) and the browser page (runtime/web/app.mjs, onnxruntime-web).
// Written from docs/bundle.md: the randomness scheme (Philox4x32-10), the sampling rule (inverse CDF in
// float64), the reader's checks of a manifest, and the autoregressive protocols (sample.onnx in one call, or
// row/step), so images equal genforge.runtime's for the same seed bit for bit.
//
// Nothing here imports onnxruntime: the caller passes its `ort` (for ort.Tensor) and a `session(name)` that
// returns an InferenceSession for graph NAME.onnx, so the same code runs on either runtime.

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
// log_probs of one sub-pixel (K float32 from `offset`) and its uniform -> the level.
export function inverseCdf(logProbs, offset, K, u) {
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

// ---- the manifest (docs/bundle.md, "What a reader checks") -------------------------------------------------
export const READS = [4, 5, 6, 7, 8];

// Checks what this module relies on; `where` names the bundle in the one-line errors.
export function checkManifest(m, where) {
  if (m === null || typeof m !== "object" || m.format !== "genforge-bundle") {
    throw new Error(`${where}: not a genforge bundle`);
  }
  if (!READS.includes(m.version)) {
    throw new Error(`${where}: bundle format version ${m.version}; this client reads ${READS[0]} to ${READS.at(-1)}`);
  }
  const r = m.randomness ?? {};
  if (r.name !== "philox4x32-10" || r.version !== 1) throw new Error(`${where}: unknown randomness ${JSON.stringify(r)}`);
  if (m.family !== "autoregressive") throw new Error(`${where}: this client samples autoregressive bundles, not ${m.family}`);
  return m;
}

// Version 7 on: the weights' safetensors metadata keeps the manifest's bound fields as exported (docs/bundle.md,
// "Bound fields"); a manifest that contradicts them was edited. `weights`: the file's bytes (Uint8Array).
const BOUND = ["family", "model", "model_config", "image", "levels", "num_classes", "likelihood", "latent_size",
  "prior", "caches"];
const canonical = (v) => JSON.stringify(v ?? null, (_, x) =>
  x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x);

export function checkBinding(m, weights, where) {
  if (m.version < 7) return;
  const view = new DataView(weights.buffer, weights.byteOffset, weights.byteLength);
  const size = weights.byteLength >= 8 ? Number(view.getBigUint64(0, true)) : Infinity;
  if (size > weights.byteLength - 8) throw new Error(`${where}: ${m.weights} is not a safetensors file`);
  let meta;
  try {
    meta = JSON.parse(new TextDecoder().decode(weights.subarray(8, 8 + size))).__metadata__ ?? {};
  } catch {
    throw new Error(`${where}: ${m.weights} is not a safetensors file`);
  }
  if (typeof meta["genforge.manifest"] !== "string") throw new Error(`${where}: the weights lack the bound fields`);
  const bound = JSON.parse(meta["genforge.manifest"]);
  for (const k of BOUND) {
    if (canonical(m[k]) !== canonical(bound[k])) {
      throw new Error(`${where}: manifest field ${k} contradicts the weights (the manifest was edited)`);
    }
  }
}

// ---- layouts -------------------------------------------------------------------------------------------------
// Images are (n, H, W, C) uint8 levels, as genforge.runtime returns them; the graphs read (n, C, H, W) floats.
export function toNchw(images, n, H, W, C) {
  const x = new Float32Array(n * C * H * W);
  for (let b = 0; b < n; b++) for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) for (let k = 0; k < C; k++)
    x[((b * C + k) * H + i) * W + j] = images[((b * H + i) * W + j) * C + k];
  return x;
}

export function toNhwc(x, n, H, W, C) {
  const images = new Uint8Array(n * H * W * C);
  for (let b = 0; b < n; b++) for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) for (let k = 0; k < C; k++)
    images[((b * H + i) * W + j) * C + k] = x[((b * C + k) * H + i) * W + j];
  return images;
}

// The labels of images start..start+n-1 when none are given: image i gets class i mod num_classes.
export function defaultLabels(m, n, start) {
  return m.num_classes ? Array.from({ length: n }, (_, b) => (start + b) % m.num_classes) : null;
}

// Uniforms of images start..start+n-1, (n, H, W, C) in row-major order.
export function draws(m, n, seed, start) {
  const { height: H, width: W, channels: C } = m.image;
  const u = new Float64Array(n * H * W * C);
  for (let b = 0; b < n; b++) u.set(uniforms(BigInt(seed), BigInt(start + b), H * W * C), b * H * W * C);
  return u;
}

const i64 = (ort, values, dims) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), dims);

// ---- decoding ------------------------------------------------------------------------------------------------
// A request: n images, indexed start..start+n-1, with `seed`; `labels` (n class ids) for a conditional model,
// default image i's class i mod num_classes; for completion `prefix` (n*H*W*C uint8, (n, H, W, C)) and
// `startRow`, the number of its rows kept (the rows below are sampled; the prefix's values there are ignored).
function request(m, { n, seed = 0, start = 0, labels = null, prefix = null, startRow = 0 }) {
  const { height: H, width: W, channels: C } = m.image;
  if (!Number.isInteger(n) || n < 1) throw new Error(`n must be a positive integer, not ${n}`);
  if (!Number.isInteger(startRow) || startRow < 0 || startRow > H) throw new Error(`rows must be 0 to ${H}, not ${startRow}`);
  if (prefix && prefix.length !== n * H * W * C) throw new Error(`prefix holds ${prefix.length} levels, not ${n}x${H}x${W}x${C}`);
  if (labels && labels.length !== n) throw new Error(`${labels.length} labels for ${n} images`);
  if (labels && m.num_classes && labels.some((l) => !Number.isInteger(l) || l < 0 || l >= m.num_classes)) {
    throw new Error(`labels must be classes 0 to ${m.num_classes - 1}`);
  }
  return { n, seed, start, H, W, C, startRow, prefix: prefix ?? new Uint8Array(n * H * W * C),
    labels: m.num_classes ? labels ?? defaultLabels(m, n, start) : null };
}

// sample.onnx: the cached loop inside one graph, uniforms in, images out ((n, H, W, C) uint8).
export async function sampleGraph(ort, session, m, options) {
  const q = request(m, options);
  const dims = [q.n, q.H, q.W, q.C];
  const feeds = {
    uniforms: new ort.Tensor("float64", draws(m, q.n, q.seed, q.start), dims),
    prefix: new ort.Tensor("uint8", Uint8Array.from(q.prefix), dims),
    start_row: i64(ort, [q.startRow], [1]),
  };
  if (q.labels) feeds.labels = i64(ort, q.labels, [q.n]);
  const out = await (await session("sample")).run(feeds);
  return Uint8Array.from(out.images.data);
}

// The row/step protocol, with the caches paired as the manifest's "state" says and the rule applied here.
// `seen(i, j, k, logProbs)`, if given, is called with each step's log_probs (n, C, K) before sub-pixel k is drawn;
// `force` ((n, H, W, C) levels), if given, replaces each draw (teacher forcing, for stepLogProbs).
export async function sampleSteps(ort, session, m, options, { seen = null, force = null } = {}) {
  const q = request(m, options);
  const { n, H, W, C } = q;
  const K = m.levels;
  const u = draws(m, n, q.seed, q.start);
  const row = await session("row"), step = await session("step");
  const f32 = (data, dims) => new ort.Tensor("float32", data, dims);
  const caches = {}; // cache name -> tensor, zeros at the start
  for (const c of m.caches) {
    const dims = c.shape.map((d) => (d === "batch" ? n : d));
    caches[c.name] = f32(new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
  }
  const labels = q.labels ? i64(ort, q.labels, [n]) : null;
  // Run a cached graph: feed what its "state" says it reads, keep what it writes.
  async function call(sess, graph, feeds) {
    for (const s of graph.state) if (s.input) feeds[s.input] = caches[s.cache];
    if (labels) feeds.labels = labels;
    const out = await sess.run(feeds);
    for (const s of graph.state) caches[s.cache] = out[s.output];
    return out;
  }
  const x = toNchw(q.prefix, n, H, W, C); // (n, C, H, W) levels
  for (let b = 0; b < n; b++) for (let k = 0; k < C; k++) x.fill(0, ((b * C + k) * H + q.startRow) * W, (b * C + k + 1) * H * W);
  const rowOf = (i) => {
    const r = new Float32Array(n * C * W);
    for (let b = 0; b < n; b++) for (let k = 0; k < C; k++)
      r.set(x.subarray(((b * C + k) * H + i) * W, ((b * C + k) * H + i + 1) * W), (b * C + k) * W);
    return f32(r, [n, C, W]);
  };
  const rowGraph = m.graphs["row.onnx"], stepGraph = m.graphs["step.onnx"];
  for (let i = 0; i < H; i++) {
    const prev = i > 0 ? rowOf(i - 1) : f32(new Float32Array(n * C * W), [n, C, W]);
    await call(row, rowGraph, { x_prev_row: prev, has_prev: f32(Float32Array.of(i > 0 ? 1 : 0), [1]) });
    for (let j = 0; j < W; j++) {
      if (i < q.startRow) { // a kept row: step once per pixel so the caches hold it
        await call(step, stepGraph, { x_row: rowOf(i), j: i64(ort, [j], [1]) });
        continue;
      }
      for (let k = 0; k < C; k++) {
        const lp = (await call(step, stepGraph, { x_row: rowOf(i), j: i64(ort, [j], [1]) })).log_probs.data; // (n, C, K)
        if (seen) seen(i, j, k, lp);
        for (let b = 0; b < n; b++) {
          const p = ((b * H + i) * W + j) * C + k;
          x[((b * C + k) * H + i) * W + j] = force ? force[p] : inverseCdf(lp, (b * C + k) * K, K, u[p]);
        }
      }
    }
  }
  return toNhwc(x, n, H, W, C);
}

// The log-probabilities the row/step protocol reads on its way through `images` ((n, H, W, C) uint8), as
// (n, H, W, C, K) float32: what forward.onnx gives for those images, computed step by step (a test holds each
// execution provider's step graphs against the forward graph with it).
export async function stepLogProbs(ort, session, m, { images, n, labels = null }) {
  const { height: H, width: W, channels: C } = m.image;
  const K = m.levels;
  const out = new Float32Array(n * H * W * C * K);
  const seen = (i, j, k, lp) => {
    for (let b = 0; b < n; b++) out.set(lp.subarray((b * C + k) * K, (b * C + k + 1) * K), (((b * H + i) * W + j) * C + k) * K);
  };
  await sampleSteps(ort, session, m, { n, labels }, { seen, force: images });
  return out;
}

// log p(image) in nats from forward.onnx: the sum over sub-pixels of log_probs at the image's levels, in float64
// (for a conditional model log p(image | label), labels as in a request). `rows`: sum only the sub-pixels of the
// top `rows` rows, which (the model being causal) is log p(those rows) whatever the rows below hold.
export async function logProb(ort, session, m, images, { n, start = 0, labels = null, rows = null }) {
  const { height: H, width: W, channels: C } = m.image;
  const K = m.levels;
  const x = toNchw(images, n, H, W, C);
  const feeds = { x: new ort.Tensor("float32", x, [n, C, H, W]) };
  const l = m.num_classes ? labels ?? defaultLabels(m, n, start) : null;
  if (l) feeds.labels = i64(ort, l, [n]);
  const lp = (await (await session("forward")).run(feeds)).log_probs.data; // (n, C, H, W, K)
  const last = rows ?? H;
  const out = new Array(n).fill(0);
  for (let b = 0; b < n; b++) for (let k = 0; k < C; k++) for (let i = 0; i < last; i++) for (let j = 0; j < W; j++) {
    const p = ((b * C + k) * H + i) * W + j;
    out[b] += lp[p * K + x[p]];
  }
  return out;
}
