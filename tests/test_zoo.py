"""Recipes and the zoo: each recipe is the command that trained its zoo model, and each zoo bundle ships
inside the package, loads by name, samples deterministically and scores on valid images what its card says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
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


# ---------------------------------------------------------------- the zoo

from genforge.runtime import BundleError, load, read_bundle, zoo  # noqa: E402
from genforge.runtime.bundle import sha256_file  # noqa: E402

SLICE = Path(__file__).parent / "data" / "bmnist-valid-256.npz"
ZOO_NAMES = zoo.zoo_names()


def valid_slice() -> np.ndarray:
    """The first 256 images of binarized MNIST's valid split, (N, 28, 28, 1) uint8 (zoo-runs/build_zoo.py)."""
    with np.load(SLICE) as f:
        shape = tuple(int(v) for v in f["shape"])
        return np.unpackbits(f["bits"], axis=1)[:, : int(np.prod(shape[1:]))].reshape(shape)


def test_the_zoo_ships_every_model_of_the_issue() -> None:
    assert set(ZOO_NAMES) >= {"pixelcnn-bmnist", "gated-pixelcnn-bmnist", "vae-bmnist"}
    for name in ZOO_NAMES:
        assert zoo.card(name)["recipe"] in RECIPE_NAMES


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_a_zoo_bundle_is_whole_and_as_its_card_lists(name: str) -> None:
    card = zoo.card(name)
    bundle = read_bundle(f"zoo:{name}")  # the reader's own checks: schema, hashes, wiring
    assert bundle.path == zoo.ZOO_DIR / card["bundle"] and bundle.manifest["model"] == card["model"]
    for file, want in card["files"].items():
        path = bundle.path / file
        assert path.stat().st_size == want["bytes"] and sha256_file(path) == want["sha256"], file
    listed = {*bundle.manifest["files"], "manifest.json"}
    assert set(card["files"]) == listed == {p.name for p in bundle.path.iterdir()}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_a_zoo_model_samples_deterministically_and_scores_what_its_card_says(name: str) -> None:
    card = zoo.card(name)
    s = load(f"zoo:{name}", backend="onnx")
    a = s.sample(6, seed=11, batch_size=6)
    b = s.sample(6, seed=11, batch_size=4)
    assert a.shape == (6, 28, 28, 1) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, s.sample(6, seed=12, batch_size=6))
    check = card["check"]
    if "nats_per_image" in check:  # exact NLL; 1e-3 nats of float32 summation order across CPUs
        got = -s.log_prob(valid_slice()[: check["images"]]).mean()
        assert abs(got - check["nats_per_image"]) < 1e-3, (got, check)
    elif "iwae_nll" in check:
        from genforge.train.data import ImageData
        from genforge.train.evaluate import bundle_scorer, score_likelihoods

        out = score_likelihoods(bundle_scorer(zoo.resolve(f"zoo:{name}"), "onnx"),
                                ImageData(valid_slice()[: check["images"]], None, 2), batch_size=64,
                                iw_samples=check["iw_samples"], seed=check["seed"])
        for key in ("neg_elbo", "iwae_nll"):
            assert abs(out[key] - check[key]) < 1e-3, (key, out[key], check)
    else:  # a GAN: the share of ink in its first samples
        ink = s.sample(check["samples"], seed=check["seed"]).astype(np.float64).mean()
        assert abs(ink - check["ink"]) < 5e-4, (ink, check)


def test_gen_eval_and_gen_sample_take_a_zoo_name(tmp_path: Path) -> None:
    from genforge.cli.main import eval_command
    from genforge.cli.sample import sample_command

    name = "pixelcnn-bmnist"
    images = valid_slice()[:, :, :, 0]
    data = tmp_path / "bmnist.npz"
    np.savez(data, train=images, valid=images)
    r = CliRunner().invoke(eval_command, [f"zoo:{name}", "--data-path", str(data), "--split", "valid", "--quiet"])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(r.output)["nats_per_image"] - zoo.card(name)["check"]["nats_per_image"]) < 1e-3
    out = tmp_path / "s.png"
    r = CliRunner().invoke(sample_command, [f"zoo:{name}", "-n", "4", "-o", str(out), "--quiet"])
    assert r.exit_code == 0 and out.exists(), r.output


def test_gen_zoo_lists_the_cards_and_prints_one() -> None:
    from genforge.cli.zoo import zoo_command

    r = CliRunner().invoke(zoo_command, [])
    assert r.exit_code == 0
    for name in ZOO_NAMES:
        assert f"zoo:{name}" in r.output
    r = CliRunner().invoke(zoo_command, [f"zoo:{ZOO_NAMES[0]}", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["recipe"] == zoo.card(ZOO_NAMES[0])["recipe"]


@pytest.mark.parametrize("bad", ["zoo:nope", "zoo:../zoo", "zoo:", "zoo:pixelcnn-bmnist/../x"])
def test_an_unknown_zoo_name_is_one_clear_error(bad: str) -> None:
    from genforge.cli.sample import sample_command

    with pytest.raises(BundleError, match="unknown zoo model"):
        load(bad)
    r = CliRunner().invoke(sample_command, [bad, "-o", "x.png"])
    assert r.exit_code == 1 and "unknown zoo model" in r.output and len(r.output.strip().splitlines()) == 1
