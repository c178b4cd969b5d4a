"""Recipes and the zoo: each recipe is the command that trained its zoo model, and each zoo bundle ships
inside the package, loads by name, samples deterministically and scores on valid images what its card says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import genforge.train
from genforge.cli.common import RECIPE_NAMES, recipes_dir
from genforge.cli.main import train_command
from genforge.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ZOO_RUNS = ROOT / "zoo-runs"


def recipe_run(name: str, monkeypatch: pytest.MonkeyPatch, *extra: str) -> dict[str, Any]:
    """What ``gen-train --recipe NAME`` passes to train_run (nothing trains)."""
    seen: dict[str, Any] = {}

    def capture(**kw: Any) -> Any:
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(genforge.train, "train_run", capture)
    result = CliRunner().invoke(train_command, ["--recipe", name, "--data-path", "data.npz", *extra])
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_each_recipe_is_the_command_that_trained_its_zoo_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_config = ZOO_RUNS / name / "config.json"
    assert run_config.exists(), f"recipe {name} has no run in zoo-runs/"
    run = json.loads(run_config.read_text())
    kw = recipe_run(name, monkeypatch)
    assert kw["model"] == run["model"]
    for key, value in kw["model_overrides"].items():
        assert run["model_config"][key] == value, key
    recorded = {**TrainConfig().to_dict(), **run["train"]}
    assert kw["train"].to_dict() == recorded
    assert kw["data"].name == run["data"]["name"]
    assert {k: v for k, v in kw["objective"].items() if k in run["objective"]} == run["objective"]


def test_a_recipe_is_a_config_file_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    kw = recipe_run("gated-pixelcnn-bmnist", monkeypatch, "--steps", "7", "--set", "layers=2")
    assert kw["train"].steps == 7 and kw["model_overrides"]["layers"] == 2 and kw["model_overrides"]["hidden"] == 64
    seen: dict[str, Any] = {}

    def capture(**k: Any) -> Any:
        seen.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(genforge.train, "train_run", capture)
    path = str(recipes_dir() / "gated-pixelcnn-bmnist.json")
    assert CliRunner().invoke(train_command, ["--config", path, "--data-path", "d.npz"]).exit_code == 0
    assert seen["train"].to_dict() == kw["train"].to_dict() | {"steps": 12000}


def test_an_unknown_recipe_is_refused_naming_the_choices() -> None:
    result = CliRunner().invoke(train_command, ["--recipe", "pixelcnn-cifar"])
    assert result.exit_code == 2 and "gated-pixelcnn-bmnist" in result.output
