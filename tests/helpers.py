"""Test helpers shared by several test files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd.functional import jacobian

TINY: dict[str, Any] = {"hidden": 6, "layers": 2, "output_hidden": 6}


def tiny_config(channels: int = 1, height: int = 5, width: int = 5, levels: int = 4,
                likelihood: str = "categorical", **extra: Any) -> dict[str, Any]:
    return {"channels": channels, "height": height, "width": width, "levels": levels,
            "likelihood": likelihood, "n_mix": 2, **TINY, **extra}


def dependency_matrix(model: torch.nn.Module, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """D[s, t] = True where the output at sub-pixel s depends on the input at sub-pixel t.

    Sub-pixels are numbered in generation order: t = (row * W + col) * C + channel. The input is a float64
    image of random real-valued levels, and each output's K log-probabilities are projected on a random
    vector, so a dependency shows up as a non-zero Jacobian entry.
    """
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, c.channels, c.height, c.width, generator=g, dtype=torch.float64) * (c.levels - 1)
    proj = torch.randn(c.levels, generator=g, dtype=torch.float64)
    model = model.double().eval()

    def f(inp: torch.Tensor) -> torch.Tensor:
        return (model(inp, labels) * proj).sum(-1)  # (1, C, H, W)

    jac = jacobian(f, x)[0, :, :, :, 0]  # (C, H, W, C, H, W)
    n = c.channels * c.height * c.width
    # (C, H, W) -> (H, W, C) on both sides, then flatten into generation order.
    jac = jac.permute(1, 2, 0, 4, 5, 3).reshape(n, n)
    return jac.abs() > 0


def causality_violations(dep: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (s, t) with t >= s where output s depends on input t."""
    upper = torch.triu(torch.ones_like(dep), diagonal=0)
    return [tuple(p) for p in (dep & upper).nonzero().tolist()]


def edited_bundle(bundle: Path, dest: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of ``bundle`` at ``dest`` whose manifest ``edit`` changed in place (the files stay as they are)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes: what "nothing changed" compares."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def unavailable(why: str) -> None:
    """Skip a test whose outside tool (node, a compiler, a browser) is missing, or fail it where
    GENFORGE_REQUIRE_CLIENTS=1 (.ci/run installs them all, so there a missing tool is a broken CI)."""
    import os

    import pytest

    if os.environ.get("GENFORGE_REQUIRE_CLIENTS") == "1":
        pytest.fail(f"GENFORGE_REQUIRE_CLIENTS=1 but {why}")
    pytest.skip(why)
