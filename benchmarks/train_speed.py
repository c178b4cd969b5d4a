"""Training speed per family (issue 24, part 1): training images per second of each zoo recipe's model and
batch, one optimizer step as the trainer runs it (the family's loss, backward, gradient clipping, AdamW; the
GAN's k=1 discriminator and generator updates), in each way the trainer can run it:

- ``eager``: float32, as before this benchmark;
- ``compile``: ``gen-train --compile`` (torch.compile of the loss; the GAN's step is not compiled);
- ``bf16`` and ``compile+bf16``: ``--cpu-bf16``, only where the CPU computes bfloat16 natively (elsewhere
  autocast emulates it and is slower, so the trainer leaves it off and so does this table).

Ways are timed interleaved, round after round, in one process (medians), after a warm-up that includes the
compilation (reported on its own). Inputs are random binary 28x28 images (the step's cost does not depend on
their content).

``--curves`` also trains the PixelCNN recipe's model for a few hundred steps eagerly with two seeds and
compiled (and bf16 where native) with the first, scoring 1,000 valid images of binarized MNIST every 50
steps: the compiled run must stay within the two eager seeds' distance of each other.

    python benchmarks/train_speed.py --threads 1 --out benchmarks/results/train-speed-cpu
    python benchmarks/train_speed.py --threads 1 --curves --data ../shared/data/binarized_mnist.npz \
        --out benchmarks/results/train-speed-cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "train" / "recipes"
FAMILIES = ["pixelcnn-bmnist", "gated-pixelcnn-bmnist", "row-lstm-bmnist", "diagonal-bilstm-bmnist", "vae-bmnist",
            "gan-bmnist"]


def recipe(name: str) -> dict[str, Any]:
    return json.loads((RECIPES / f"{name}.json").read_text())


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    from genforge.models import build_model
    from genforge.train.objectives import objective_for

    r = recipe(name)
    cfg = {"channels": 1, "height": 28, "width": 28, "levels": 2, **r.get("model_config", {})}
    if r["model"] not in ("gan",):
        cfg.setdefault("likelihood", "bernoulli")
    torch.manual_seed(seed)
    model = build_model(r["model"], cfg)
    options = {k: r[k] for k in ("kl_warmup_steps", "iw_samples", "gan_k", "gan_loss") if k in r}
    return model, objective_for(model, options, lr=r["lr"]), r


def stepper(name: str, way: str) -> tuple[Any, int]:
    """A function running one training step of the recipe's model in ``way``, and the batch size."""
    model, objective, r = build(name)
    batch = int(r["batch_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (batch, 1, 28, 28), generator=g)
    bf16 = "bf16" in way
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if r["model"] == "gan":
        if way != "eager":
            return None, batch
        model.train()
        return (lambda: objective.players_step(model, [(x, None)], 0, r["lr"])), batch
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"])
    loss_fn = torch.compile(objective.loss) if "compile" in way else objective.loss
    model.train()

    def step() -> None:
        with autocast():
            loss, _ = loss_fn(model, x, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, batch


def speed(names: list[str], ways: list[str], rounds: int, steps: int, eager_only: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        fns: dict[str, Any] = {}
        warm: dict[str, float] = {}
        batch = 0
        for way in ways:
            if way != "eager" and name in eager_only:
                continue
            fn, batch = stepper(name, way)
            if fn is None:
                continue
            t = time.perf_counter()
            fn()
            fn()
            warm[way] = time.perf_counter() - t
            fns[way] = fn
        times: dict[str, list[float]] = {w: [] for w in fns}
        for _ in range(rounds):
            for way, fn in fns.items():
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[way].append((time.perf_counter() - t) / steps)
        base = statistics.median(times["eager"])
        for way, ts in times.items():
            med = statistics.median(ts)
            rows.append({"recipe": name, "way": way, "batch": batch, "seconds_per_step": med,
                         "images_per_second": batch / med, "speedup_vs_eager": base / med,
                         "first_two_steps_seconds": warm[way], "rounds": [round(v, 4) for v in ts]})
            print(f"{name:24s} {way:14s} {batch / med:8.1f} images/s  {base / med:5.2f}x  "
                  f"(warm-up {warm[way]:.1f} s)", flush=True)
    return rows


def curves(data_path: str, ways: list[str], steps: int, every: int) -> dict[str, Any]:
    """Valid NLL (1,000 images) every ``every`` steps for eager seeds 0 and 1 and the other ways at seed 0."""
    import numpy as np

    from genforge.train.data import load_dataset

    train = load_dataset("binarized-mnist", split="train", path=data_path, seed=0)
    valid = load_dataset("binarized-mnist", split="valid", path=data_path, seed=0).images[:1000]
    xv = torch.from_numpy(np.ascontiguousarray(valid.transpose(0, 3, 1, 2))).long()
    runs = [("eager", 0), ("eager", 1)] + [(w, 0) for w in ways if w != "eager"]
    out: dict[str, Any] = {}
    for way, seed in runs:
        model, objective, r = build("pixelcnn-bmnist", seed)
        batch, lr = int(r["batch_size"]), float(r["lr"])
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        loss_fn = torch.compile(objective.loss) if "compile" in way else objective.loss
        bf16 = "bf16" in way
        rng = np.random.default_rng(seed)
        points = []
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            idx = rng.integers(0, len(train), batch)
            x = torch.from_numpy(np.ascontiguousarray(train.images[idx].transpose(0, 3, 1, 2))).long()
            for gr in opt.param_groups:
                gr["lr"] = lr * min(1.0, step / 50)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss, _ = loss_fn(model, x, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % every == 0:
                model.eval()
                with torch.no_grad():
                    nll = float(torch.cat([model.nll(xv[a:a + 250]) for a in range(0, len(xv), 250)]).mean())
                model.train()
                points.append((step, nll))
        key = f"{way} seed {seed}"
        out[key] = {"points": points, "seconds": time.perf_counter() - t0}
        print(key, " ".join(f"{s}:{v:.2f}" for s, v in points), flush=True)
    e0 = dict(out["eager seed 0"]["points"])
    e1 = dict(out["eager seed 1"]["points"])
    noise = max(abs(e0[s] - e1[s]) for s in e0 if s >= 2 * every)
    gaps = {k: max(abs(dict(v["points"])[s] - e0[s]) for s in e0 if s >= 2 * every)
            for k, v in out.items() if not k.startswith("eager")}
    return {"runs": out, "seed_noise_nats": noise, "gap_to_eager_seed_0_nats": gaps,
            "within_noise": {k: g <= noise for k, g in gaps.items()},
            "what": f"valid NLL of 1,000 images every {every} steps from step {2 * every}; noise = the largest "
                    "difference between eager seeds 0 and 1"}


def markdown(result: dict[str, Any]) -> str:
    """The README's table: images/s per recipe, eager (before) and the fastest way (after)."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in result["speed"]:
        by.setdefault(r["recipe"], {})[r["way"]] = r
    lines = ["| recipe (batch) | eager float32 (before), images/s | compiled, images/s | after | compilation |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, ways in by.items():
        eager = ways["eager"]
        comp = ways.get("compile")
        best = max(ways.values(), key=lambda r: r["images_per_second"])
        lines.append(f"| {name} ({eager['batch']}) | {eager['images_per_second']:.1f} | "
                     + (f"{comp['images_per_second']:.1f} ({comp['speedup_vs_eager']:.2f}x) | " if comp else "- | ")
                     + f"{best['images_per_second']:.1f} ({best['way']}) | "
                     + (f"{comp['first_two_steps_seconds']:.0f} s |" if comp else "- |"))
    return "\n".join(lines)


def main() -> None:
    from genforge.train.trainer import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per timing")
    ap.add_argument("--families", nargs="*", default=FAMILIES)
    ap.add_argument("--eager-only", nargs="*", default=[],
                    help="recipes timed eagerly only (the Diagonal BiLSTM's compilation took 754 s on 2 cores)")
    ap.add_argument("--curves", action="store_true")
    ap.add_argument("--curve-steps", type=int, default=300)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True, help="path stem: writes STEM.json")
    ap.add_argument("--markdown", action="store_true", help="print the table of STEM.json and stop")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(f"{a.out}.json").read_text())))
        return
    torch.set_num_threads(a.threads)
    native = cpu_has_bf16()
    ways = ["eager", "compile"] + (["bf16", "compile+bf16"] if native else [])
    result: dict[str, Any] = {
        "device": platform.processor() or platform.machine(), "cpu": _cpu_name(), "native_bf16": native,
        "threads": a.threads, "torch": torch.__version__, "ways": ways,
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
    }
    out = Path(f"{a.out}.json")
    previous = json.loads(out.read_text()) if out.exists() else {}
    if a.curves:
        if not a.data:
            ap.error("--curves needs --data binarized_mnist.npz")
        result["speed"] = previous.get("speed", [])
        result["curves"] = curves(a.data, ways, a.curve_steps, 50)
    else:
        result["speed"] = speed(a.families, ways, a.rounds, a.steps, a.eager_only)
        if "curves" in previous:
            result["curves"] = previous["curves"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
