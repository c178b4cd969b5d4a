"""Naive, cached, graph and parallel autoregressive decoding, timed in one run on each available backend.

Two binarized-MNIST-sized PixelCNNs (28x28x1, Bernoulli head, 64 features, 8 residual blocks): one with random
weights, and one trained inside the benchmark on binarized MNIST (``--train-steps``, ~1.5 min; kept in
``--work-dir`` for the next run), since how fast parallel decoding converges depends on the model. Each is
exported with ONNX and TorchScript graphs. For each model, backend and batch size:

- cached: a whole image decoded by the runtime's cached loop (one ``step`` per sub-pixel, one ``row`` per row;
  on ONNX a batch of 256 or more split between threads, one per core, also timed on one thread in the same
  rounds: ``cached_threads``, ``cached_one_thread_s`` in the JSON);
- graph (ONNX only): the same cached loop run inside the bundle's ``sample.onnx`` (ONNX Loop), one call;
- parallel: what ``decoder="parallel"`` runs, windowed parallel decoding (runtime/decoding.window_decode: the
  fixed-point iteration over a few rows at a time through the bundle's ``window`` graph), with its pass count
  (the slowest image of the batch sets it) and forward-pass equivalents per image (rows computed / height);
- parallel (forward graph): the whole forward graph iterated to its fixed point (decoding.parallel_decode),
  what families without a window graph run, up to ``--forward-parallel-max-batch``;
- window rows: windowed parallel decoding with 1-8 rows per window, at batch 1 and 16 (``WINDOW_DEPTH``);
- naive: every step is the same full forward pass, so it is timed over the first ``--naive-rows`` rows and
  extrapolated linearly to the whole image (said as such in the table).

- auto: what ``decoder="auto"`` runs, batch after batch (``AutoregressiveSampler._decode_auto``,
  runtime/policy.py): from batch 9
  to 128 it times windowed parallel against cached decoding on its first two batches and then runs the
  faster (``DecoderTuner``), so its first two calls (the warm-up round and the first timed round) include the
  slower decoder once; elsewhere the rule's pick.

Cached, graph, parallel, auto and forward-graph parallel are timed interleaved (``timed_interleaved``: rounds that
run each in turn, medians over ``--repeats`` rounds, at least 9 up to batch 16, after a warm-up round; a
decoder whose warm-up took over 5 s is timed by that run alone); naive runs the forward graph that earlier
rows already warmed, timed once where a run takes over 5 s.
Writes JSON and a Markdown table, with the decoder ``decoder="auto"`` settled on at each batch. The JSON keys
keep the names of the committed runs: ``parallel_iterations``, ``parallel_forward_iterations`` and the sweep's
``iterations`` are passes (``last_stats["passes"]``), and the sweep's ``rows`` is the window depth.

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
from genforge.runtime.decoding import (
    WINDOW_DEPTH,
    cached_decode,
    naive_decode,
    parallel_decode,
    split_cached_decode,
    window_decode,
)
from genforge.runtime.files import atomic_write_json
from genforge.runtime.policy import (
    PARALLEL_MAX_BATCH,
    TUNE_MAX_BATCH,
    WINDOW_PARALLEL_MAX_BATCH,
    auto_decoder,
    cached_threads,
    tuned,
)
from genforge.runtime.progress import Progress
from genforge.runtime.randomness import uniforms
from genforge.runtime.strategies import DecodeRequest, WindowParallel
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


def timed_adaptive(fn: Any, repeats: int) -> float:
    """The median of ``repeats`` runs, or the first run alone when it takes over 5 s (no separate warm-up:
    the graphs these time were warmed by earlier rows)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > 5.0:
        return first
    return timed(fn, repeats)


def windowed(sampler: Any, u: np.ndarray, rows: int = WINDOW_DEPTH, stats: dict | None = None) -> np.ndarray:
    """Windowed parallel decoding as the sampler runs it, starting caches included."""
    fmt = sampler.backend.graph_format
    start = WindowParallel.start_caches(sampler, fmt, len(u), None)
    return window_decode(WindowParallel.window_fn(sampler, fmt), start, u, levels=sampler.levels, depth=rows,
                         stats=stats)


def timed_interleaved(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds that call each in turn, after a warm-up
    round; a function whose warm-up took over 5 s is timed by that run alone. Interleaving puts the
    machine's slow spells (seen here to last seconds, and to move one timing 2-3x) on every contender alike,
    so the ratios hold better than those of back-to-back blocks."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    once: dict[str, float] = {}
    for k, fn in fns.items():
        t = time.perf_counter()
        fn()
        if (first := time.perf_counter() - t) > 5.0:
            once[k] = first
    for _ in range(repeats):
        for k, fn in fns.items():
            if k in once:
                continue
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: once.get(k) or statistics.median(times[k]) for k in fns}


def bench(bundle: Path, backend: str, batch: int, naive_rows: int, repeats: int, model: str,
          forward_parallel_max_batch: int) -> dict[str, Any]:
    sampler = load(bundle, backend=backend, device="cpu")
    h, w, c = sampler.image_shape
    u = uniforms(0, 0, batch, (h, w, c))
    stats: dict[str, Any] = {}
    fstats: dict[str, Any] = {"passes": None, "forward_passes_per_image": None}
    # What decoder="cached" runs: on ONNX a large batch split between threads (sampler.cached_threads).
    steppers = [sampler.backend.stepper() for _ in range(cached_threads(batch, backend, "cpu"))]
    contenders = {"cached": lambda: split_cached_decode(steppers, u, levels=sampler.levels),
                  "parallel": lambda: windowed(sampler, u, stats=stats)}
    # What decoder="auto" runs, as sample() runs it batch by batch: where its tuner times both decoders, its
    # first call (the warm-up round) runs the rule's pick and its second the other, later ones the faster.
    off = Progress(0, "auto", enabled=False)
    contenders["auto"] = lambda: sampler._decode_auto(DecodeRequest(u, None, sampler.levels), off)
    if len(steppers) > 1:  # the split's gain, timed in the same rounds
        contenders["cached_one_thread"] = lambda: cached_decode(steppers[0], u, levels=sampler.levels)
    if batch <= forward_parallel_max_batch:
        contenders["forward"] = lambda: parallel_decode(sampler.forward, u, levels=sampler.levels, stats=fstats)
    if backend == "onnx":  # sample.onnx: the same cached loop inside one graph (ONNX Loop)
        feed = {"uniforms": u, "prefix": np.zeros((batch, h, w, c), np.uint8), "start_row": np.array([0])}
        contenders["graph"] = lambda: sampler.backend.run("sample", feed)
    # Small batches take milliseconds and the noise is relatively largest there: more rounds.
    secs = timed_interleaved(contenders, max(repeats, 9) if batch <= 16 else repeats)
    cached_s, parallel_s, forward_s = secs["cached"], secs["parallel"], secs.get("forward")
    # Naive over the first rows: the same loop, stopped early by giving it a shorter image of uniforms would
    # change the graph's input shape, so time forward passes of the full image instead: exactly what each
    # naive step runs.
    x = np.zeros((batch, c, h, w), dtype=np.float32)
    steps = naive_rows * w * c

    def naive_part() -> None:
        for _ in range(steps):
            sampler.forward(x, None)

    naive_part_s = timed_adaptive(naive_part, 1)
    rule = auto_decoder(sampler.offered_decoders, batch, backend, "cpu", windowed=True)
    naive_s = naive_part_s * (h * w * c) / steps
    row = {
        "model": model, "backend": backend, "batch": batch, "cached_s": cached_s,
        "naive_s_extrapolated": naive_s, "naive_rows_timed": naive_rows, "speedup": naive_s / cached_s,
        "cached_images_per_s": batch / cached_s, "naive_images_per_s": batch / naive_s,
        "parallel_s": parallel_s, "parallel_images_per_s": parallel_s and batch / parallel_s,
        "parallel_iterations": stats["passes"], "parallel_forward_passes_per_image":
            stats["forward_passes_per_image"], "parallel_vs_cached": cached_s / parallel_s,
        "parallel_window_rows": WINDOW_DEPTH,
        "parallel_forward_s": forward_s, "parallel_forward_iterations": fstats["passes"],
        "parallel_forward_vs_cached": forward_s and cached_s / forward_s,
        "auto_rule": rule, "auto_s": secs["auto"], "auto_tuned": tuned(batch, backend, "cpu", windowed=True,
                                                                  candidates=set(sampler.offered_decoders)),
        # What auto settled on: the faster of its timings, or the rule's pick where it does not time.
        "auto": sampler.tuner.faster((batch, 0, False)) or rule,
        "auto_vs_best_of_parallel_and_cached": secs["auto"] / min(parallel_s, cached_s),
    }
    if "graph" in secs:
        row.update(graph_s=secs["graph"], graph_images_per_s=batch / secs["graph"])
    if "cached_one_thread" in secs:
        row.update(cached_threads=len(steppers), cached_one_thread_s=secs["cached_one_thread"],
                   cached_split_vs_one_thread=secs["cached_one_thread"] / cached_s)
    return row


def window_sweep(bundle: Path, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Windowed parallel decoding on ONNX with 1 to 8 rows per window: the data behind ``WINDOW_DEPTH``."""
    sampler = load(bundle, backend="onnx", device="cpu")
    u = uniforms(0, 0, batch, sampler.image_shape)
    depths = (1, 2, 3, 4, 6, 8)
    stats: dict[int, dict[str, Any]] = {rows: {} for rows in depths}
    secs = timed_interleaved({str(rows): (lambda rows=rows: windowed(sampler, u, rows, stats[rows]))
                              for rows in depths}, max(repeats, 9))
    return [{"batch": batch, "rows": rows, "seconds": secs[str(rows)], "iterations": stats[rows]["passes"],
             "forward_passes_per_image": stats[rows]["forward_passes_per_image"]} for rows in depths]


def trained_bundle(work: Path, out: Path, steps: int, hidden: int, layers: int, data_path: str) -> tuple[Path, dict]:
    """A PixelCNN trained on binarized MNIST (the run is kept in ``work`` and reused by later runs), exported
    afresh into ``out`` so that the figures are always those of the current exporter; and its final metrics."""
    run_dir = work / f"trained-h{hidden}-l{layers}-s{steps}-run"
    metrics = run_dir.with_name(run_dir.name + "-metrics.json")
    if not metrics.is_file():
        from genforge.train import DataSpec, TrainConfig, train_run

        run = train_run(model="pixelcnn", data=DataSpec("binarized-mnist", path=data_path),
                        model_overrides={"hidden": hidden, "layers": layers, "output_hidden": hidden},
                        train=TrainConfig(steps=steps, n_samples=0, eval_limit=500), out=run_dir, overwrite=True,
                        progress=False)
        metrics.write_text(json.dumps(run.metrics))
    bundle = export_run(run_dir, out, formats=("onnx", "torchscript"))
    return bundle, json.loads(metrics.read_text())


def check_equal(bundle: Path) -> bool:
    """A guard for the figures: naive, cached, graph and parallel decoding give the same images on this model
    (2 images, both backends)."""
    s = load(bundle, backend="onnx", device="cpu")
    h, w, c = s.image_shape
    u = uniforms(5, 0, 2, (h, w, c))
    cached = cached_decode(s.backend.stepper(), u, levels=2)
    graph = s.backend.run("sample", {"uniforms": u, "prefix": np.zeros((2, h, w, c), np.uint8),
                                     "start_row": np.array([0])})[0]
    ts = load(bundle, backend="torchscript", device="cpu")
    same = [naive_decode(s.forward, u, levels=2), graph, parallel_decode(s.forward, u, levels=2), windowed(s, u),
            cached_decode(ts.backend.stepper(), u, levels=2), parallel_decode(ts.forward, u, levels=2),
            windowed(ts, u)]
    return all(np.array_equal(cached, other) for other in same)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,8,16,32,64,128,256")
    ap.add_argument("--backends", default="torchscript,onnx")
    ap.add_argument("--models", default="trained,random")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--naive-rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=400)
    # Whole-forward parallel decoding costs (passes x a forward pass of the batch): 20-30 s a batch at 256.
    ap.add_argument("--forward-parallel-max-batch", type=int, default=16)
    ap.add_argument("--data-path", default=str(Path(__file__).resolve().parents[2] / "shared/data/binarized_mnist.npz"))
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "genforge-decoding-bench"))
    ap.add_argument("--out", default="benchmarks/results/decoding-cpu")
    args = ap.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows, same, trained_metrics, sweep = [], {}, None, []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if model == "trained":
                bundle, trained_metrics = trained_bundle(work, Path(tmp) / "trained", args.train_steps,
                                                         args.hidden, args.layers, args.data_path)
            else:
                bundle = make_bundle(Path(tmp), args.hidden, args.layers, args.size)
            same[model] = check_equal(bundle)
            if model == "trained":
                sweep = [*window_sweep(bundle, 1, args.repeats), *window_sweep(bundle, 16, args.repeats)]
            for n in args.batches.split(","):
                for b in args.backends.split(","):
                    rows.append(bench(bundle, b, int(n), args.naive_rows, args.repeats, model,
                                      args.forward_parallel_max_batch))
                    r = rows[-1]
                    print(f"{model} {b} batch {n}: cached {r['cached_s']:.3f} s, parallel {r['parallel_s']:.3f} s "
                          f"({r['parallel_iterations']} passes), forward parallel {r['parallel_forward_s']} s",
                          flush=True)
    import onnxruntime

    result = {
        "benchmark": "naive vs cached vs graph vs parallel decoding",
        "command": "python benchmarks/decoding.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("work_dir", "data_path")),
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "onnxruntime_threads": "1 per run of row, step, step_updates (cached decoding splits a batch "
                                          "between threads: cached_threads); default for the others"},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "model": {"name": "pixelcnn", "image": [args.size, args.size, 1], "hidden": args.hidden,
                  "layers": args.layers, "likelihood": "bernoulli",
                  "trained": f"{args.train_steps} steps on binarized MNIST", "trained_metrics": trained_metrics},
        "all_decoders_equal": same,  # naive, cached, graph and parallel images, per model
        "parallel_max_batch_for_auto": PARALLEL_MAX_BATCH,
        "window_parallel_max_batch_for_auto": WINDOW_PARALLEL_MAX_BATCH,
        "auto_timed_batches": f"above window_parallel_max_batch_for_auto up to {TUNE_MAX_BATCH}",
        "window_rows_sweep_onnx_trained": sweep,
        "rows": rows,
    }
    write(result, Path(args.out))
    print(f"all decoders give the same images: {same}")


def with_auto(result: dict[str, Any]) -> dict[str, Any]:
    """Runs before auto was timed (no ``auto_s``) get the ``auto`` column from the rule alone
    (runtime/sampler.auto_decoder) on their measured times; ``--rerender`` re-renders a run's table."""
    for r in result["rows"]:
        if "auto_s" in r:
            continue
        have = ["naive", "cached", "graph", "parallel"]
        r["auto"] = auto_decoder(have, r["batch"], r["backend"], "cpu", windowed=True)
        auto_s = r["parallel_s"] if r["auto"] == "parallel" else r["cached_s"]
        r["auto_vs_best_of_parallel_and_cached"] = auto_s / min(r["parallel_s"], r["cached_s"])
    result.setdefault("window_parallel_max_batch_for_auto", WINDOW_PARALLEL_MAX_BATCH)
    result.setdefault("parallel_max_batch_for_auto", PARALLEL_MAX_BATCH)
    return result


def write(result: dict[str, Any], out: Path) -> None:
    result = with_auto(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    naive_rows = result["rows"][0]["naive_rows_timed"] if result["rows"] else 1
    lines = [
        f"| model | backend | batch | naive s/batch (from {naive_rows} row) | cached s/batch | cached images/s | "
        "graph images/s | parallel s/batch | parallel passes | parallel vs cached | parallel (forward graph) "
        "vs cached, passes | auto | auto vs best |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in result["rows"]:
        graph = f"{r['graph_images_per_s']:.1f}" if "graph_s" in r else "-"
        auto = r["auto"] + (" (timed)" if r.get("auto_tuned") else "")
        par = f"{r['parallel_s']:.3f} | {r['parallel_iterations']} | {r['parallel_vs_cached']:.2f}x"
        fwd = (f"{r['parallel_forward_vs_cached']:.2f}x, {r['parallel_forward_iterations']}"
               if r["parallel_forward_s"] is not None else "-")
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['naive_s_extrapolated']:.2f} | {r['cached_s']:.3f} | "
            f"{r['cached_images_per_s']:.1f} | {graph} | {par} | {fwd} | {auto} | "
            f"{r['auto_vs_best_of_parallel_and_cached']:.2f} |")
    lines += ["", "Window rows (ONNX, trained model): " + "; ".join(
        f"batch {w['batch']} rows {w['rows']}: {w['seconds']:.3f} s, {w['iterations']} passes"
        for w in result["window_rows_sweep_onnx_trained"])]
    split = [r for r in result["rows"] if "cached_one_thread_s" in r]
    if split:
        lines += ["", "Cached decoding split between threads (ONNX) against one thread, same rounds: " + "; ".join(
            f"{r['model']} batch {r['batch']}: {r['cached_threads']} threads {r['cached_s']:.3f} s, one "
            f"{r['cached_one_thread_s']:.3f} s ({r['cached_split_vs_one_thread']:.2f}x)" for r in split)]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--rerender":  # python benchmarks/decoding.py --rerender OUT.json
        path = Path(sys.argv[2])
        write(json.loads(path.read_text()), path.with_suffix(""))
    else:
        main()
