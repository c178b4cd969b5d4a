"""Build the zoo (issue 24) from the training runs in this folder: export each run's chosen weights as a
lean ONNX bundle into genforge/runtime/zoo/NAME, score it on the whole valid split, and write its card into
genforge/runtime/zoo/zoo.json.

    python zoo-runs/build_zoo.py --data ../shared/data/binarized_mnist.npz [NAME ...]

Every figure on a card is computed here, from the bundle as it ships (the runtime's onnxruntime backend),
with the command that reproduces it printed on the card. Names given: rebuild only those (the others' cards
stay). --repack: export again only (after an exporter change), keeping a card's figures where the new bundle
scores the test slice exactly as the shipped one. Not part of the installed package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "zoo-runs"
ZOO = ROOT / "runtime" / "zoo"
SLICE = ROOT / "tests" / "data" / "bmnist-valid-256.npz"  # what the tests score each bundle on
SLICE_IMAGES = 256
QUALITY_SAMPLES = 1000  # samples per model for the Fréchet distance, against as many valid images

# The machines the runs trained on, as the sessions that ran them recorded (zoo-runs/README.md).
CLOUD = "one thread (niced, beside other work) of a 2-core cloud VM"
MACHINES = {
    "pixelcnn-bmnist": f"{CLOUD}, x86-64",
    "gated-pixelcnn-bmnist": f"{CLOUD}: steps 0-9,400 on a CPU with native bf16 (bf16 autocast), the rest on an AMD "
                             "EPYC with AVX2 (float32)",
    "row-lstm-bmnist": f"{CLOUD}, AMD EPYC (AVX2), float32",
    "diagonal-bilstm-bmnist": f"{CLOUD}, AMD EPYC (AVX2), float32",
    "vae-bmnist": f"{CLOUD}, x86-64, float32",
    "gan-bmnist": f"{CLOUD}, AMD EPYC (AVX2), float32",
}

# Paper figures (static binarized MNIST, test split, nats) and issue 24's goals, for the cards.
PAPERS = {
    "pixelcnn-bmnist": ("81.30: PixelCNN, van den Oord et al. 2016a", "<= 82.5"),
    "gated-pixelcnn-bmnist": ("81.30: PixelCNN, van den Oord et al. 2016a; 81.50: pytorch-generative's gated "
                              "PixelCNN (dynamic binarization)", "<= 81.0"),
    "row-lstm-bmnist": ("none: the paper reports the Row LSTM on CIFAR-10 only", "<= 82.0"),
    "diagonal-bilstm-bmnist": ("79.20: 7 layers, h=16, van den Oord et al. 2016a", "<= 80.5"),
    "vae-bmnist": ("88.71 at k=5000: 1 stochastic layer, VAE-trained, Burda et al. 2016", "<= 88.0"),
    "gan-bmnist": ("none (no likelihood)", "FD to valid images below every other zoo model's samples"),
}


def wall_seconds(metrics: list[dict[str, Any]], step: int) -> float:
    """Training time up to ``step``: each process's ``time`` restarts at 0, so sum each segment's end."""
    total, last = 0.0, 0.0
    for r in metrics:
        if "time" not in r or r["step"] > step:
            continue
        if r["time"] < last:
            total += last
        last = r["time"]
    return total + last


def ensure_slice(data_path: str) -> np.ndarray:
    """The first 256 valid images, (N, 28, 28, 1) uint8 0/1, kept as packed bits in tests/data."""
    from genforge.train.data import load_dataset

    valid = load_dataset("binarized-mnist", split="valid", path=data_path, seed=0).images[:SLICE_IMAGES]
    SLICE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(SLICE, bits=np.packbits(valid.reshape(len(valid), -1), axis=1), shape=np.array(valid.shape))
    return valid


def slice_check(bundle: Path, family: str, images: np.ndarray) -> dict[str, Any]:
    """What the tests recompute from the shipped bundle: the slice's scores (or, for the GAN, the ink of
    64 samples at seed 0)."""
    from genforge.runtime import load

    s = load(bundle, backend="onnx")
    if family == "autoregressive":
        return {"images": len(images), "nats_per_image": float(-s.log_prob(images).mean())}
    if family == "latent":
        from genforge.train.data import ImageData
        from genforge.train.evaluate import bundle_scorer, score_likelihoods

        out = score_likelihoods(bundle_scorer(bundle, "onnx"), ImageData(images, None, 2), batch_size=64,
                                iw_samples=8, seed=0)
        return {"images": len(images), "iw_samples": 8, "seed": 0, "neg_elbo": out["neg_elbo"],
                "iwae_nll": out["iwae_nll"]}
    ink = s.sample(64, seed=0).astype(np.float64).mean()
    return {"samples": 64, "seed": 0, "ink": float(ink)}


def build(name: str, spec: dict[str, Any], data_path: str, images: np.ndarray, quick: bool) -> dict[str, Any]:
    from genforge.export import export_run
    from genforge.runtime import read_bundle
    from genforge.train import checkpoint as ckpt
    from genforge.train.evaluate import evaluate_path

    run = RUNS / spec["run"]
    weights = spec["weights"]
    out = ZOO / name
    t0 = time.monotonic()
    export_run(run, out, formats=("onnx",), weights=weights, overwrite=True)
    print(f"{name}: exported in {time.monotonic() - t0:.0f} s", flush=True)
    bundle = read_bundle(out)
    family = bundle.family
    config = json.loads((run / ckpt.CONFIG_FILE).read_text())
    metrics = [json.loads(line) for line in (run / ckpt.METRICS_FILE).read_text().splitlines() if line.strip()]
    if weights == "best":
        step = int(ckpt.best_record(run)["step"])
    else:
        step = max(r["step"] for r in metrics)
    epochs = [r for r in metrics if r.get("split") == "valid" and r["step"] <= step]
    batch = int(config["train"]["batch_size"])
    train_images = 45000  # binarized MNIST's 50,000 training images less the 5,000 carved out as a test split
    data_arg = "--data-path binarized_mnist.npz"
    valid: dict[str, Any] = {"split": "valid", "images": 10000 if not quick else 500}
    t0 = time.monotonic()
    kw: dict[str, Any] = {"split": "valid", "batch_size": 250, "backend": "onnx", "limit": 0 if not quick else 500}
    if family == "autoregressive":
        r = evaluate_path(out, {"path": data_path}, **kw)
        valid.update(nats_per_image=r["nats_per_image"], bits_per_dim=r["bits_per_dim"],
                     command=f"gen-eval zoo:{name} {data_arg} --split valid --batch-size 250")
    elif family == "latent":
        # The importance-weighted bound tightens with k; k=5000 (the papers') costs 5,000 decoder passes per
        # image, about 5 CPU-hours over the whole split, so the card gives k=500 over all of it and k=5000 over
        # its first 1,000 images.
        k = spec.get("iw_samples", 500) if not quick else 50
        r = evaluate_path(out, {"path": data_path}, iw_samples=k, **{**kw, "batch_size": 100})
        valid.update(iwae_nll=r["iwae_nll"], iw_samples=k, neg_elbo=r["neg_elbo"],
                     command=f"gen-eval zoo:{name} {data_arg} --split valid --batch-size 100 --iw-samples {k}")
        big, first = (5000, 1000) if not quick else (100, 50)
        r = evaluate_path(out, {"path": data_path}, iw_samples=big, **{**kw, "batch_size": 100, "limit": first})
        valid["iwae_k5000_first_1000"] = {
            "images": first, "iw_samples": big, "iwae_nll": r["iwae_nll"], "neg_elbo": r["neg_elbo"],
            "command": f"gen-eval zoo:{name} {data_arg} --split valid --batch-size 100 --iw-samples {big} "
                       f"--limit {first}"}
    print(f"{name}: scored in {time.monotonic() - t0:.0f} s: {valid}", flush=True)
    n_quality = QUALITY_SAMPLES if not quick else 100
    q = evaluate_path(out, {"path": data_path}, quality=True, quality_samples=n_quality,
                      **{**kw, "limit": n_quality, "batch_size": 100})
    quality = {"fd": q["fd"], "kd": q["kd"], "samples": n_quality, "seed": 0,
               "command": f"gen-eval zoo:{name} {data_arg} --split valid --limit {n_quality} --quality "
                          f"--quality-samples {n_quality}",
               "note": q["quality_note"]}
    if family == "gan":
        valid.update(fd=q["fd"], kd=q["kd"], samples=n_quality, images=n_quality, command=quality["command"])
    paper, goal = PAPERS[name]
    return {
        "bundle": name,
        "model": config["model"],
        "data": "binarized-mnist: static binarization (Larochelle & Murray 2011), trained on its 50,000 training "
                "images less 5,000 carved out as a test split (seed 0); scored on its 10,000 valid images",
        "recipe": spec["run"],
        "command": f"gen-train --recipe {spec['run']} {data_arg} --out runs/{spec['run']} --threads 1",
        "export_command": f"gen-export runs/{spec['run']} --format onnx --weights {weights} -o bundles/{name}",
        "weights": weights,
        "steps": step,
        "epochs": round(step / (train_images // batch), 2),
        "evaluations": len(epochs),
        "parameters": int(sum(int(np.prod(s)) for s in _shapes(out / "weights.safetensors"))),
        "wall_hours": round(wall_seconds(metrics, step) / 3600, 2),
        "machine": MACHINES[name],
        "valid": valid,
        "quality": quality,
        "paper": paper,
        "goal": goal,
        "check": slice_check(out, family, images),
        "files": bundle_files(out),
    }


def bundle_files(out: Path) -> dict[str, dict[str, Any]]:
    from genforge.runtime import read_bundle

    files = {f: {"bytes": (out / f).stat().st_size, "sha256": h}
             for f, h in sorted(read_bundle(out).manifest["files"].items())}
    files["manifest.json"] = {"bytes": (out / "manifest.json").stat().st_size,
                              "sha256": hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()}
    return files


def repack(name: str, spec: dict[str, Any], images: np.ndarray, card: dict[str, Any]) -> dict[str, Any]:
    """Export the card's weights again with the current exporter (a leaner bundle format, say) and keep the
    card's valid-split figures only if the new bundle scores the test slice exactly as the shipped one does,
    on this machine; the card's files become the new bundle's."""
    import shutil

    from genforge.export import export_run
    from genforge.runtime import read_bundle

    out, tmp = ZOO / name, ZOO / f".{name}.repack"
    export_run(RUNS / spec["run"], tmp, formats=("onnx",), weights=card["weights"], overwrite=True)
    family = read_bundle(tmp).family
    # Both bundles scored here: the card's own check may come from another CPU, whose float32 sums differ.
    check, before = slice_check(tmp, family, images), slice_check(out, family, images)
    if check != before:
        shutil.rmtree(tmp)
        sys.exit(f"{name}: the re-exported bundle scores the slice {check}, the shipped one {before}: rebuild it "
                 f"in full (without --repack)")
    shutil.rmtree(out)
    tmp.rename(out)
    print(f"{name}: repacked, slice check unchanged {check}", flush=True)
    return {**card, "files": bundle_files(out)}


def _shapes(path: Path) -> list[list[int]]:
    from genforge.runtime.bundle import safetensors_header

    _, header = safetensors_header(path.read_bytes(), path)
    return [v["shape"] for k, v in header.items() if k != "__metadata__"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="binarized_mnist.npz (train and valid splits)")
    ap.add_argument("--quick", action="store_true", help="score 500 valid images only (a rehearsal)")
    ap.add_argument("--repack", action="store_true",
                    help="re-export the cards' weights only, keeping their figures if the slice scores the same")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    specs = json.loads((RUNS / "zoo.json").read_text())
    names = a.names or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        sys.exit(f"unknown zoo model(s) {', '.join(unknown)}; zoo-runs/zoo.json has {', '.join(specs)}")
    images = ensure_slice(a.data)
    index_path = ZOO / "zoo.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"format": "genforge-zoo", "models": {}}
    for name in names:
        if a.repack:
            index["models"][name] = repack(name, specs[name], images, index["models"][name])
        else:
            index["models"][name] = build(name, specs[name], a.data, images, a.quick)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"wrote {index_path}")


if __name__ == "__main__":
    main()
