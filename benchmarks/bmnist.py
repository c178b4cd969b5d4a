"""Reproduction on binarized MNIST: each autoregressive and latent model trained on the train split with a
stated budget, its NLL on the valid split, and the papers' figures beside it.

Each row is ``gen-train <args>`` then ``gen-eval`` on the valid split (the test split is not shipped in
../shared/data; see its README). Budgets are optimizer steps; the defaults are minutes of one CPU core each,
far from the papers' full training, so the gap to the paper column is expected. Existing run directories
are reused (``--runs DIR/NAME``), so rows can be trained separately and collected here.

    python benchmarks/bmnist.py --data ../shared/data/binarized_mnist.npz --runs runs/bmnist \\
        --models gated-pixelcnn,vae --out benchmarks/results/bmnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name: (gen-train arguments, gen-eval arguments, paper NLL in nats on the test split, source)
ROWS: dict[str, tuple[list[str], list[str], float | None, str]] = {
    "pixelcnn": (["--model", "pixelcnn", "--set", "hidden=32", "--set", "layers=5", "--set", "output_hidden=32",
                  "--steps", "600", "--batch-size", "64", "--lr", "3e-3"], [], 81.30,
                 "PixelCNN, van den Oord et al. 2016a (as commonly cited)"),
    "gated-pixelcnn": (["--model", "gated-pixelcnn", "--set", "hidden=32", "--set", "layers=5",
                        "--set", "output_hidden=32", "--steps", "2400", "--batch-size", "64", "--lr", "3e-3"], [],
                       None, "no binarized-MNIST figure in van den Oord et al. 2016b"),
    "row-lstm": (["--model", "row-lstm", "--set", "hidden=16", "--set", "layers=2", "--set", "output_hidden=32",
                  "--steps", "400", "--batch-size", "32", "--lr", "3e-3"], [], None,
                 "the PixelRNN paper reports no Row LSTM figure on binarized MNIST"),
    "diagonal-bilstm": (["--model", "diagonal-bilstm", "--set", "hidden=16", "--set", "layers=2",
                         "--set", "output_hidden=32", "--steps", "900", "--batch-size", "32", "--lr", "3e-3"], [],
                        79.20, "Diagonal BiLSTM (7 layers, h=16), van den Oord et al. 2016a"),
    "vae": (["--model", "vae", "--set", "latent_size=32", "--set", "hidden=32", "--set", "depth=2", "--steps", "3000",
             "--batch-size", "128", "--lr", "1e-3", "--kl-warmup-steps", "500", "--iw-samples", "0"],
            ["--iw-samples", "50"], 86.76, "VAE, 1 stochastic layer, k=50 IWAE estimate (Burda et al. 2016)"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="binarized_mnist.npz")
    ap.add_argument("--runs", default="runs/bmnist")
    ap.add_argument("--models", default=",".join(ROWS))
    ap.add_argument("--out", default="benchmarks/results/bmnist")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for name in args.models.split(","):
        train_args, eval_args, paper, source = ROWS[name]
        run = Path(args.runs) / name
        common = ["--data", "binarized-mnist", "--data-path", args.data]
        train_cmd = ["gen-train", *train_args, *common, "--eval-limit", "2000", "--samples", "16", "--quiet",
                     "--out", str(run)]
        if not (run / "model.safetensors").exists():
            subprocess.run([sys.executable, "-m", "genforge.cli", "train", *train_cmd[1:]], check=True, env=env)
        eval_cmd = ["gen-eval", str(run), *common, "--split", "valid", "--batch-size", "250", "--quiet", *eval_args]
        out = subprocess.run([sys.executable, "-m", "genforge.cli", "eval", *eval_cmd[1:]], check=True, env=env,
                             capture_output=True, text=True).stdout
        result = json.loads(out)
        nll = result.get("iwae_nll", result.get("nats_per_image"))
        rows.append({"model": name, "valid_nll": nll, "result": result, "paper_test_nll": paper, "paper": source,
                     "train_command": " ".join(train_cmd), "eval_command": " ".join(eval_cmd)})
        print(json.dumps(rows[-1]), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | budget | valid NLL (nats) | paper (test) |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        budget = " ".join(a for a in r["train_command"].split() if a.isdigit() or a.startswith("--steps"))
        paper = f"{r['paper_test_nll']:.2f}" if r["paper_test_nll"] else "—"
        lines.append(f"| {r['model']} | {budget} | {r['valid_nll']:.2f} | {paper} |")
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
