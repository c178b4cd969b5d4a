"""Bundle size per format against the weights, and (given two bundles of one run) whether they compute the
same: python benchmarks/bundle_size.py BUNDLE [OTHER_BUNDLE]

Prints JSON: per bundle the bytes of each format's files, the weights' tensor bytes and the ratios; with two
bundles, the largest log-probability difference and whether each decoder draws the same images, on both
backends, with the load-plus-first-sample time of each (one run: a ratio, not a benchmark of load time).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def sizes(bundle: Path) -> dict[str, float]:
    from safetensors.numpy import load_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    by_format: dict[str, int] = {}
    for g in manifest["graphs"].values():
        by_format[g["format"]] = by_format.get(g["format"], 0) + (bundle / g["file"]).stat().st_size
    weights = sum(a.nbytes for a in load_file(str(bundle / manifest["weights"])).values())
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {"weights_mb": weights / 1e6, "total_mb": total / 1e6,
            **{f"{k}_mb": v / 1e6 for k, v in by_format.items()},
            **{f"{k}_over_weights": v / weights for k, v in by_format.items()}, "total_over_weights": total / weights}


def compare(a_path: Path, b_path: Path) -> dict[str, object]:
    from genforge.runtime import load

    out: dict[str, object] = {}
    for backend in ("onnx", "torchscript"):
        loaded, seconds = [], []
        for p in (a_path, b_path):
            t0 = time.perf_counter()
            s = load(p, backend=backend)
            s.sample(1, decoder="cached")
            seconds.append(time.perf_counter() - t0)
            loaded.append(s)
        a, b = loaded
        h, w, c = a.image_shape
        x = np.random.default_rng(0).integers(0, a.levels, (4, h, w, c)).astype(np.uint8)
        decoders = ["cached", "parallel"] + (["graph"] if backend == "onnx" else [])
        out[backend] = {
            "max_abs_log_prob_diff": float(np.abs(a.log_prob(x) - b.log_prob(x)).max()),
            "same_images": {d: bool(np.array_equal(a.sample(4, seed=3, batch_size=4, decoder=d),
                                                   b.sample(4, seed=3, batch_size=4, decoder=d))) for d in decoders},
            "load_and_first_sample_s": [round(t, 3) for t in seconds],
        }
    return out


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv]
    report: dict[str, object] = {str(p): sizes(p) for p in paths}
    if len(paths) == 2:
        report["comparison"] = compare(*paths)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
