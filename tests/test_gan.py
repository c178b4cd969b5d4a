"""GAN: losses, Algorithm 1's k, fixed-noise grids, NaN/collapse stops, exact resume, the offline sample
quality metric, export and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genforge.cli.main import sample_command
from genforge.export import export_run
from genforge.runtime import GANSampler, load
from genforge.train import DataSpec, TrainConfig, Trainer, TrainingError, load_dataset, load_run, train_run
from genforge.train import checkpoint as ckpt
from genforge.train.objectives import GANObjective, generator_loss
from genforge.train.quality import frechet_distance, kernel_distance, sample_quality, train_feature_net

SMALL = {"latent_size": 8, "hidden": 8}


def gan_train(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 32, "lr": 2e-4, "n_samples": 4, "log_every": 1,
                          "checkpoint_every": 2, "eval_limit": 32, **kw})


def test_minimax_gradient_vanishes_where_non_saturating_does_not() -> None:
    logits = torch.tensor([-8.0, -8.0], requires_grad=True)  # D confidently rejects the fakes
    (g_mm,) = torch.autograd.grad(generator_loss(logits, "minimax"), logits)
    (g_ns,) = torch.autograd.grad(generator_loss(logits, "non-saturating"), logits)
    assert g_mm.abs().max() < 1e-3 and g_ns.abs().min() > 0.4
    with pytest.raises(ValueError, match="unknown generator loss"):
        generator_loss(logits, "wasserstein")


def test_k_discriminator_steps_per_generator_step(tmp_path: Path) -> None:
    r = train_run(model="gan", model_overrides=SMALL, train=gan_train(steps=4), objective={"gan_k": 3},
                  out=tmp_path / "g", progress=False)
    state = ckpt.load_state(r.run_dir / ckpt.STATE_FILE)["objective"]
    d_steps = next(iter(state["opt_d"]["state"].values()))["step"]
    g_steps = next(iter(state["opt_g"]["state"].values()))["step"]
    assert (float(d_steps), float(g_steps)) == (12.0, 4.0)
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [x for x in recs if "d_loss" in x]
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(train_recs[0])
    assert any("fd" in x and "kd" in x for x in recs)  # the sample-quality metric each epoch


def test_fixed_noise_grid_every_epoch(tmp_path: Path) -> None:
    r = train_run(model="gan", data=DataSpec(conditional=True), model_overrides=SMALL,
                  train=gan_train(steps=44, batch_size=64), out=tmp_path / "g", progress=False)
    assert sorted(p.name for p in (r.run_dir / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]


def test_gan_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = train_run(model="gan", model_overrides=SMALL, train=gan_train(), objective={"gan_k": 2}, out=tmp_path / "a",
                     progress=False)
    original = Trainer.batch

    def dying(self, counter):  # step 3's batches: after the checkpoint at step 2
        if counter == 6:
            raise KeyboardInterrupt
        return original(self, counter)

    monkeypatch.setattr(Trainer, "batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_run(model="gan", model_overrides=SMALL, train=gan_train(), objective={"gan_k": 2}, out=tmp_path / "b",
                  progress=False)
    monkeypatch.setattr(Trainer, "batch", original)
    resumed = train_run(out=tmp_path / "b", resume=True, progress=False)

    def losses(d: Path) -> list:
        recs = map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        return [(x["step"], x["d_loss"], x["g_loss"]) for x in recs if "d_loss" in x]

    assert losses(resumed.run_dir) == losses(full.run_dir)
    a, _ = load_run(full.run_dir)
    b, _ = load_run(resumed.run_dir)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_nan_and_collapse_stop_with_the_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_run(model="gan", model_overrides=SMALL, train=gan_train(steps=2), out=tmp_path / "g", progress=False)
    state = (tmp_path / "g" / ckpt.STATE_FILE).read_bytes()
    from genforge.models import GAN

    real_generate = GAN.generate
    monkeypatch.setattr(GAN, "generate", lambda self, z, labels=None: real_generate(self, z, labels) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite at step 2"):
        train_run(out=tmp_path / "g", resume=True, extend={"steps": 4}, progress=False)
    assert (tmp_path / "g" / ckpt.STATE_FILE).read_bytes() == state
    monkeypatch.setattr(GAN, "generate", lambda self, z, labels=None: real_generate(self, z, labels) * 0.0)
    with pytest.raises(TrainingError, match=r"mode collapse .*\(spread \d"):  # the spread itself, formatted
        train_run(out=tmp_path / "g", resume=True, extend={"steps": 80}, progress=False)


def test_distances_on_known_features() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4000, 3))
    shift = np.array([1.0, -2.0, 0.5])
    assert abs(frechet_distance(f, f)) < 1e-6
    assert frechet_distance(f, f + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    g = rng.normal(size=(4000, 3)) * 2.0  # covariance 4I vs I: trace term 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(f, g) == pytest.approx(3.0, abs=0.3)
    assert abs(kernel_distance(f, rng.normal(size=(4000, 3)))) < 0.05 < kernel_distance(f, f + shift)


def test_quality_metric_separates_real_from_a_half_trained_generator(tmp_path: Path) -> None:
    train = load_dataset("digits", split="train")
    valid, test = load_dataset("digits", split="valid"), load_dataset("digits", split="test")
    net = train_feature_net(train, epochs=3)
    r = train_run(model="gan", train=gan_train(steps=60, n_samples=0, eval_limit=8), out=tmp_path / "g",
                  progress=False)
    model, _ = load_run(r.run_dir)
    generated = GANObjective(model).sample(model, 180, 0, None)
    real = sample_quality(net, test.images, valid.images, 17)
    fake = sample_quality(net, generated, valid.images, 17)
    assert fake.fd > 3 * real.fd and fake.kd > 3 * max(real.kd, 0.01)
    # Unlabelled data: the feature network trains on rotations instead, and still separates them.
    unlabelled = load_dataset("digits", split="train")
    unlabelled.labels = None
    net2 = train_feature_net(unlabelled, epochs=3)
    real2 = sample_quality(net2, test.images, valid.images, 17)
    assert sample_quality(net2, generated, valid.images, 17).fd > 3 * real2.fd


def test_export_and_sampling(tmp_path: Path, fresh_seed: int) -> None:
    for cond in (False, True):
        run = train_run(model="gan", data=DataSpec(conditional=cond), model_overrides=SMALL,
                        train=gan_train(steps=4), out=tmp_path / f"g{cond}", progress=False).run_dir
        bundle = export_run(run, tmp_path / f"b{cond}", formats=("onnx", "torchscript"))
        model, _ = load_run(run)
        g = torch.Generator().manual_seed(fresh_seed)
        z = torch.randn(5, 8, generator=g)
        labels = torch.randint(0, 10, (5,), generator=g) if cond else None
        with torch.no_grad():
            eager = model.generate(z, labels).numpy()
        feed = {"z": z.numpy(), **({"labels": labels.numpy()} if cond else {})}
        for backend in ("onnx", "torchscript"):
            s = load(bundle, backend=backend)
            assert isinstance(s, GANSampler)
            np.testing.assert_allclose(s.backend.run("generate", feed)[0], eager, atol=1e-4, rtol=0)
        a = load(bundle, backend="onnx").sample(6, seed=2, batch_size=4)
        np.testing.assert_array_equal(a, load(bundle, backend="torchscript").sample(6, seed=2, batch_size=6))
        assert a.shape == (6, 8, 8, 1) and a.max() <= 16
    res = CliRunner().invoke(sample_command, [str(bundle), "-n", "4", "--labels", "3", "--quiet",
                                              "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output


def test_inception_features_from_a_user_weights_file(tmp_path: Path) -> None:
    """With torchvision-named weights supplied (random here: nothing is downloaded), gen-eval reports the
    distances in Inception-v3 feature space too; a foreign file is refused cleanly."""
    from safetensors.torch import save_file

    from genforge.cli.main import eval_command
    from genforge.train.inception import InceptionV3Features, load_inception

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in InceptionV3Features().state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's extra keys are accepted and ignored
    save_file(state, str(tmp_path / "inception.safetensors"))
    net = load_inception(tmp_path / "inception.safetensors")
    feats = net.features(net.prepare(np.zeros((1, 8, 8, 1), np.uint8), 17))
    assert feats.shape == (1, 2048)
    run = train_run(model="gan", model_overrides=SMALL, train=gan_train(steps=2, n_samples=0), out=tmp_path / "g",
                    progress=False).run_dir
    res = CliRunner().invoke(eval_command, [str(run), "--split", "valid", "--limit", "3", "--quality-samples", "3",
                                            "--inception-weights", str(tmp_path / "inception.safetensors"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert np.isfinite(out["inception_fd"]) and "inception_kd" in out and "fd" in out
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    res = CliRunner().invoke(eval_command, [str(run), "--limit", "4", "--quality-samples", "4", "--quiet",
                                            "--inception-weights", str(tmp_path / "foreign.safetensors")])
    assert res.exit_code == 1 and "not torchvision Inception-v3 weights" in res.output


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantized_real_images_stay_in_the_generators_range_and_round_back(levels: int) -> None:
    """D's real inputs lie in [-1, 1] like the generator's tanh, and the sampling rule (rounding) maps each back to
    its level; the noise spans one 8-bit step (a whole level at 256 levels, 1/255 of the range for binary)."""
    from genforge.runtime.latent import levels_from_mean
    from genforge.train.objectives import dequantize

    torch.manual_seed(0)
    x = torch.randint(0, levels, (64, 1, 16, 16))
    v = dequantize(x, levels)
    normalized = v * (2.0 / (levels - 1)) - 1.0
    assert normalized.min() >= -1.0 and normalized.max() <= 1.0
    back = levels_from_mean(normalized.double().numpy(), levels)  # (B, H, W, C)
    np.testing.assert_array_equal(back.transpose(0, 3, 1, 2), x.numpy())
    spread = (v - x).abs().max()
    step = min(1.0, (levels - 1) / 255)
    assert step / 2 * 0.95 < spread <= step / 2
