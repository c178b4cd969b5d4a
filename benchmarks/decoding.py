"""Naive vs cached (vs graph) autoregressive decoding, timed in one run on each available backend.

The model is a binarized-MNIST-sized PixelCNN (28x28x1, Bernoulli head, 64 features, 8 residual blocks) with
random weights, exported to a bundle with ONNX and TorchScript graphs. For each backend and batch size:

- cached: a whole image decoded by the runtime's cached loop (one ``step`` per pixel, one ``row`` per row);
- graph (ONNX only): the same cached loop run inside the bundle's ``sample.onnx`` (ONNX Loop), one call;
- naive: every step is the same full forward pass, so it is timed over the first ``--naive-rows`` rows and
  extrapolated linearly to the whole image (said as such in the table).

Each figure is the median over ``--repeats`` timed runs after a warm-up. Writes JSON and a Markdown table.

    python benchmarks/decoding.py --out benchmarks/results/decoding-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genforge.export import export_run
from genforge.models import build_model
from genforge.runtime import load
from genforge.runtime.decoding import cached_decode, naive_decode
from genforge.runtime.files import atomic_write_json
from genforge.runtime.randomness import uniforms
from genforge.train.checkpoint import RunConfig, save_weights


def make_bundle(root: Path, hidden: int, layers: int, size: int) -> Path:
    torch.manual_seed(0)
    cfg = {"channels": 1, "height": size, "width": size, "levels": 2, "likelihood": "bernoulli",
           "hidden": hidden, "layers": layers, "output_hidden": hidden}
    model = build_model("pixelcnn", cfg)
    run = root / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", RunConfig("pixelcnn", model.config.to_dict(), {}, {}).to_json())
    save_weights(run / "model.safetensors", model)
    return export_run(run, root / "bundle", formats=("onnx", "torchscript"))


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(bundle: Path, backend: str, batch: int, naive_rows: int, repeats: int) -> dict[str, Any]:
    sampler = load(bundle, backend=backend, device="cpu")
    h, w, c = sampler.image_shape
    u = uniforms(0, 0, batch, (h, w, c))
    cached_s = timed(lambda: cached_decode(sampler.backend.stepper(), u, levels=sampler.levels), repeats)
    # Naive over the first rows: the same loop, stopped early by giving it a shorter image of uniforms would
    # change the graph's input shape, so time forward passes of the full image instead: exactly what each
    # naive step runs.
    x = np.zeros((batch, c, h, w), dtype=np.float32)
    steps = naive_rows * w * c

    def naive_part() -> None:
        for _ in range(steps):
            sampler.forward(x, None)

    naive_part_s = timed(naive_part, repeats)
    naive_s = naive_part_s * (h * w * c) / steps
    row = {
        "backend": backend, "batch": batch, "cached_s": cached_s, "naive_s_extrapolated": naive_s,
        "naive_rows_timed": naive_rows, "speedup": naive_s / cached_s,
        "cached_images_per_s": batch / cached_s, "naive_images_per_s": batch / naive_s,
    }
    if backend == "onnx":  # sample.onnx: the same cached loop inside one graph (ONNX Loop)
        feed = {"uniforms": u, "prefix": np.zeros((batch, h, w, c), np.uint8), "start_row": np.array([0])}
        graph_s = timed(lambda: sampler.backend.run("sample", feed), repeats)
        row.update(graph_s=graph_s, graph_images_per_s=batch / graph_s)
    return row


def check_equal(bundle: Path) -> bool:
    """A guard for the figures: naive, cached and graph decoding give the same images on this model (2 images,
    the ONNX backend)."""
    s = load(bundle, backend="onnx", device="cpu")
    h, w, c = s.image_shape
    u = uniforms(5, 0, 2, (h, w, c))
    cached = cached_decode(s.backend.stepper(), u, levels=2)
    graph = s.backend.run("sample", {"uniforms": u, "prefix": np.zeros((2, h, w, c), np.uint8),
                                     "start_row": np.array([0])})[0]
    return bool(np.array_equal(naive_decode(s.forward, u, levels=2), cached) and np.array_equal(graph, cached))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--backends", default="torchscript,onnx")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--naive-rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/decoding-cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp), args.hidden, args.layers, args.size)
        same = check_equal(bundle)
        rows = [bench(bundle, b, int(n), args.naive_rows, args.repeats)
                for n in args.batches.split(",") for b in args.backends.split(",")]
    import onnxruntime

    result = {
        "benchmark": "naive vs cached decoding",
        "command": "python benchmarks/decoding.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "model": {"name": "pixelcnn", "image": [args.size, args.size, 1], "hidden": args.hidden,
                  "layers": args.layers, "likelihood": "bernoulli", "weights": "random"},
        "cached_equals_naive": same,  # and the graph decoder's images equal both
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| backend | batch | naive s/batch (extrapolated from {args.naive_rows} row) | cached s/batch | "
        "cached images/s | speedup | graph (sample.onnx) s/batch | graph images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        graph = (f"{r['graph_s']:.3f} | {r['graph_images_per_s']:.1f}" if "graph_s" in r else "- | -")
        lines.append(f"| {r['backend']} | {r['batch']} | {r['naive_s_extrapolated']:.2f} | {r['cached_s']:.3f} | "
                     f"{r['cached_images_per_s']:.1f} | {r['speedup']:.0f}x | {graph} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"naive == cached == graph on this model: {same}")


if __name__ == "__main__":
    main()
