"""Bundle size per format against the weights, and (given two bundles of one run) whether they compute the
same: python benchmarks/bundle_size.py [--rounds N] BUNDLE [OTHER_BUNDLE]

Prints JSON: per bundle the bytes of each format's files (its graph files and the external data they read,
the weights file apart), the weights' tensor bytes and the ratios; with two bundles, per backend the largest
log-probability difference, whether each decoder draws the same images, and both bundles' load time (load()
and the first one-image sample), cached-decoding time (16 images) and log p of 64 images, each the best of N
(3) runs alternating between the two bundles, so that the ratio is of one run on one machine.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def sizes(bundle: Path) -> dict[str, float]:
    from safetensors.numpy import load_file

    from genforge.runtime.onnx_scan import external_tensors

    manifest = json.loads((bundle / "manifest.json").read_text())
    files: dict[str, set[str]] = {}
    for g in manifest["graphs"].values():
        names = files.setdefault(g["format"], set())
        names.add(g["file"])
        if g["format"] == "onnx":
            names |= {t.location for t in external_tensors((bundle / g["file"]).read_bytes())}
    by_format = {fmt: sum((bundle / f).stat().st_size for f in names - {manifest.get("weights")})
                 for fmt, names in files.items()}
    weights = sum(a.nbytes for a in load_file(str(bundle / manifest["weights"])).values())
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {"weights_mb": weights / 1e6, "total_mb": total / 1e6,
            **{f"{k}_mb": v / 1e6 for k, v in by_format.items()},
            **{f"{k}_over_weights": v / weights for k, v in by_format.items()}, "total_over_weights": total / weights}


def compare(a_path: Path, b_path: Path, rounds: int = 3) -> dict[str, object]:
    from genforge.runtime import load

    out: dict[str, object] = {}
    formats = [{g["format"] for g in json.loads((p / "manifest.json").read_text())["graphs"].values()}
               for p in (a_path, b_path)]
    for backend in ("onnx", "torchscript"):
        if not all(backend in f for f in formats):
            continue
        load_s: list[list[float]] = [[], []]
        decode_s: list[list[float]] = [[], []]
        log_prob_s: list[list[float]] = [[], []]
        loaded: list[Any] = [None, None]
        for _ in range(rounds):
            for i, p in enumerate((a_path, b_path)):
                # Collect the previous rounds' samplers first: a collection inside a timed load would charge
                # one bundle with tearing down the other's sessions (1.5x swings on TorchScript loads).
                s = None
                gc.collect()
                t0 = time.perf_counter()
                s = load(p, backend=backend)
                s.sample(1, decoder="cached")
                load_s[i].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s.sample(16, seed=1, batch_size=16, decoder="cached")
                decode_s[i].append(time.perf_counter() - t0)
                h, w, c = s.image_shape
                x = np.random.default_rng(0).integers(0, s.levels, (64, h, w, c)).astype(np.uint8)
                t0 = time.perf_counter()
                s.log_prob(x, batch_size=64)
                log_prob_s[i].append(time.perf_counter() - t0)
                loaded[i] = s
        a, b = loaded
        h, w, c = a.image_shape
        x = np.random.default_rng(0).integers(0, a.levels, (4, h, w, c)).astype(np.uint8)
        decoders = ["cached", "parallel"] + (["graph"] if backend == "onnx" else [])
        out[backend] = {
            "max_abs_log_prob_diff": float(np.abs(a.log_prob(x) - b.log_prob(x)).max()),
            "same_images": {d: bool(np.array_equal(a.sample(4, seed=3, batch_size=4, decoder=d),
                                                   b.sample(4, seed=3, batch_size=4, decoder=d))) for d in decoders},
            "load_and_first_sample_s": [round(min(t), 3) for t in load_s],
            "cached_16_images_s": [round(min(t), 3) for t in decode_s],
            "log_prob_64_images_s": [round(min(t), 3) for t in log_prob_s],
            "second_over_first": {"load": round(min(load_s[1]) / min(load_s[0]), 3),
                                  "cached_decoding": round(min(decode_s[1]) / min(decode_s[0]), 3),
                                  "log_prob": round(min(log_prob_s[1]) / min(log_prob_s[0]), 3)},
        }
    return out


def main(argv: list[str]) -> None:
    rounds = 3
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    paths = [Path(p) for p in argv]
    report: dict[str, object] = {str(p): sizes(p) for p in paths}
    if len(paths) == 2:
        report["comparison"] = {"rounds": rounds, **compare(*paths, rounds)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
