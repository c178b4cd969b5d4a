"""Training and sampling across 2 CPU processes (torchrun, gloo) equal a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # multi-process runs (torchrun-style), tens of seconds each

CLI = ["-m", "genforge.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ARGS = ["--set", "hidden=8", "--set", "layers=1", "--set", "output_hidden=8", "--steps", "8", "--batch-size", "16",
        "--samples", "4", "--eval-limit", "16", "--log-every", "1", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_two_process_training_equals_one_process(tmp_path: Path) -> None:
    subprocess.run([sys.executable, *CLI, "train", *ARGS, "--out", str(tmp_path / "one")], check=True, env=_env(),
                   timeout=300)
    subprocess.run([*TORCHRUN, *CLI, "train", *ARGS, "--out", str(tmp_path / "two")], check=True, env=_env(),
                   timeout=300)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))  # rank 0 alone logs
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))


def test_two_process_sampling_equals_one_process(tmp_path: Path) -> None:
    subprocess.run([sys.executable, *CLI, "train", *ARGS, "--conditional", "--out", str(tmp_path / "run")],
                   check=True, env=_env(), timeout=300)
    subprocess.run([sys.executable, *CLI, "export", str(tmp_path / "run"), "-o", str(tmp_path / "b")], check=True,
                   env=_env(), timeout=300)
    common = ["sample", str(tmp_path / "b"), "-n", "5", "--seed", "3", "--quiet"]
    subprocess.run([sys.executable, *CLI, *common, "-o", str(tmp_path / "one.npz")], check=True, env=_env(),
                   timeout=300)
    subprocess.run([*TORCHRUN, *CLI, *common, "-o", str(tmp_path / "two.npz")], check=True, env=_env(), timeout=300)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
