// Checks this client's randomness against the repository's test vectors (runtime/randomness_vectors.json).
//   node check_vectors.mjs ../../runtime/randomness_vectors.json
import { readFileSync } from "node:fs";
import { philox4x32, uniforms } from "./sample.mjs";

const v = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failures = 0;
for (const c of v.philox4x32_10) {
  const got = philox4x32(c.counter, c.key);
  if (got.join() !== c.words.join()) { failures++; console.error(`philox ${c.counter}: ${got} != ${c.words}`); }
}
for (const c of v.uniforms) {
  const got = uniforms(BigInt(c.seed), BigInt(c.image), c.uniforms.length, c.stream);
  c.uniforms.forEach((want, i) => {
    if (got[i] !== want) { failures++; console.error(`seed ${c.seed} image ${c.image}: ${got[i]} != ${want}`); }
  });
}
console.log(JSON.stringify({ checked: v.philox4x32_10.length + v.uniforms.length, failures }));
process.exit(failures ? 1 : 0);
