// Sample images from a genforge bundle in Node.js, following docs/bundle.md (the spec it was first written from).
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

// The randomness, the rule, the reader's checks and both protocols are the module the browser page runs too.
import {
  checkBinding, checkManifest, logProb, sampleGraph, sampleSteps,
} from "../../runtime/web/genforge.mjs";

export { philox4x32, uniforms } from "../../runtime/web/genforge.mjs";

function readManifest(dir) {
  const m = checkManifest(JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")), dir);
  if (m.version >= 7) checkBinding(m, new Uint8Array(readFileSync(join(dir, m.weights))), dir);
  return m;
}

// From the file's path, onnxruntime finds its external data (v8: weights.safetensors, onnx.data) beside it.
const sessions = (dir, m) => (name) => ort.InferenceSession.create(join(dir, m.graphs[`${name}.onnx`].file));

async function main() {
  const args = process.argv.slice(2);
  const opt = (name, dflt) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1] : dflt);
  const dir = args[0];
  const n = Number(opt("n", 4)), seed = Number(opt("seed", 0)), start = Number(opt("start", 0));
  const decoder = opt("decoder", "graph");
  const m = readManifest(dir);
  const session = sessions(dir, m);
  const images = await (decoder === "graph" ? sampleGraph : sampleSteps)(ort, session, m, { n, seed, start });
  const { height: H, width: W, channels: C } = m.image;
  const log_prob = await logProb(ort, session, m, images, { n, start });
  const result = { shape: [n, H, W, C], images: Array.from(images), log_prob };
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
