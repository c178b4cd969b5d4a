"""What the browser page costs: load time and images/s of each decoder (sample.onnx in one call, or the row/step
graphs driven from JavaScript), in headless Chromium on onnxruntime-web, for one bundle.

    python benchmarks/web_page.py BUNDLE [--batch 1 --batch 16] [-o benchmarks/results/web_page.json]

Needs node, chromium and examples/web's packages (npm ci). The page is served by gen-demo's server in this
process; examples/web/drive.mjs loads it (cold, no cache), samples, completes, then times each decoder on each
batch size (one warm-up request, then one timed), and times genforge.runtime (onnx backend, CPU) on the same
batches for comparison. Run it with nothing else busy: the browser's WebAssembly
threads share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from genforge.cli.demo import serve, serve_in_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes to time (default 1 and 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3, help="page loads (each times every batch size)")
    ap.add_argument("--threads", type=int, default=None, help="the page's WebAssembly threads (default: its own)")
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()
    batches = args.batch or [1, 16]
    server = serve(args.bundle, port=0)
    serve_in_thread(server)
    bundle_bytes = sum(len(v) for v in server.files.values())
    runs = []
    try:
        for _ in range(args.runs):
            job = {"n": 4, "seed": args.seed, "rows": server.manifest["image"]["height"] // 2, "strokes": [],
                   "threads": args.threads, "time": [{"n": b, "seed": args.seed, "start": 0} for b in batches]}
            r = subprocess.run(["node", "drive.mjs", server.url, json.dumps(job)], cwd=ROOT / "examples" / "web",
                               capture_output=True, text=True, check=True, env={**os.environ})
            report = json.loads(r.stdout)
            runs.append({"ep": report["ep"], "threads": report["threads"], "page_load_ms": report["page_load_ms"],
                         "timing": report["timing"]})
    finally:
        server.shutdown()
        server.server_close()

    def best(decoder: str, batch: int) -> float:
        return min(t[decoder] for run in runs for t in run["timing"] if t["n"] == batch and decoder in t)

    # The Python runtime on the same bundle and batches, in the same run, for the ratio (best of 3 after a warm-up).
    from genforge.runtime import load

    sampler = load(args.bundle, backend="onnx", device="cpu")
    python_ms = {}
    for decoder in ("graph", "cached"):
        for b in batches:
            sampler.sample(b, seed=args.seed, decoder=decoder, batch_size=b)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                sampler.sample(b, seed=args.seed, decoder=decoder, batch_size=b)
                times.append(time.perf_counter() - t)
            python_ms[f"{decoder}@{b}"] = round(1000 * min(times) / b, 3)

    decoders = sorted({d for run in runs for t in run["timing"] for d in t if d in ("graph", "steps")})
    summary = {
        "bundle": str(args.bundle), "model": server.manifest["model"], "image": server.manifest["image"],
        "bundle_bytes_served": bundle_bytes, "ep": runs[0]["ep"],
        "page_load_ms_best": min(r["page_load_ms"] for r in runs),
        "ms_per_image_best": {f"{d}@{b}": round(best(d, b), 3) for d in decoders for b in batches},
        "python_runtime_ms_per_image_best": python_ms,
        "images_per_s_best": {f"{d}@{b}": round(1000 / best(d, b), 1) for d in decoders for b in batches},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "chromium": subprocess.run([os.environ.get("CHROMIUM") or shutil.which("chromium") or "chromium",
                                                "--version"], capture_output=True, text=True).stdout.strip()},
        "command": "python benchmarks/web_page.py " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
