"""Autoencoder and VAE: objectives, training on every data set, the encoder as a feature extractor, export
parity and the runtime's sample/encode/decode/reconstruct/interpolate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data import write_idx

from genforge.cli.main import sample_command
from genforge.export import export_run
from genforge.models import build_model
from genforge.runtime import LatentSampler, load
from genforge.train import DataSpec, TrainConfig, load_run, train_run
from genforge.train.finetune import finetune_classifier

SMALL = {"latent_size": 4, "hidden": 8, "depth": 2}


def test_kl_is_the_closed_form_and_iwae_tightens_the_bound() -> None:
    torch.manual_seed(0)
    model = build_model("vae", {"channels": 1, "height": 6, "width": 6, "levels": 2, **SMALL}).double()
    x = torch.randint(0, 2, (3, 1, 6, 6))
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(20000, *mu.shape, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    mc_kl = (log_q - log_p).mean(0)
    _, kl = model.elbo_terms(x)
    torch.testing.assert_close(kl, mc_kl, atol=0.05, rtol=0.02)


def test_iwae_bound_tightens_with_k(latent_runs) -> None:
    """On a trained VAE, the one IWAE estimate (train/scores.py, used by training and gen-eval): with k = 1
    it is the ELBO in expectation, and more samples lower the estimated NLL."""
    from genforge.train import load_dataset
    from genforge.train.scores import latent_totals

    run, _ = latent_runs["vae"]
    model, _ = load_run(run)
    model = model.double()
    x = load_dataset("digits", split="valid").images[:16].transpose(0, 3, 1, 2).copy()

    def encode(xs, y):
        with torch.no_grad():
            mean, logvar = model.encode(torch.from_numpy(xs))
        return mean.numpy(), logvar.numpy()

    def decode(z, y):
        with torch.no_grad():
            return model.decode(torch.from_numpy(z)).numpy()

    def totals(k: int, seeds: range) -> dict[str, float]:
        out: dict[str, float] = {}
        for seed in seeds:
            latent_totals(encode, decode, x, None, variational=True, levels=17, first=0, seed=seed, iw_samples=k,
                          totals=out)
        return {key: v / (16 * len(seeds)) for key, v in out.items()}

    k1, k64 = totals(1, range(200)), totals(64, range(2))
    assert abs(k1["iwae"] - (k1["rec"] + k1["kl"])) < 0.3  # nats per image: IWAE(1) and the ELBO agree
    assert k64["iwae"] < k1["iwae"] - 0.3


def test_gaussian_head_is_a_distribution_over_levels() -> None:
    from genforge.models.heads import make_head

    params = torch.randn(2, 2, 1, 3, 3, dtype=torch.float64)
    lp = make_head("gaussian", 7).log_probs(params)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 1, 3, 3, dtype=torch.float64))
    # With a scale well under the bin width (1/3), the most likely level is the bin that holds the mean.
    params[:, 1] = -4.0
    lp = make_head("gaussian", 7).log_probs(params)
    expected = torch.round((params[:, 0].clamp(-1, 1) + 1) * 3)
    assert torch.equal(lp.argmax(-1).double(), expected)


def _write_every_dataset(root: Path) -> dict[str, DataSpec]:
    """A tiny file of every supported format, and the DataSpec that reads it."""
    import pickle

    from PIL import Image

    rng = np.random.default_rng(0)
    np.savez(root / "bm.npz", train=rng.integers(0, 2, (40, 28, 28), dtype=np.uint8))
    (root / "mnist").mkdir()
    write_idx(root / "mnist" / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)), gz=True)
    write_idx(root / "mnist" / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40), gz=True)
    (root / "cifar").mkdir()
    with open(root / "cifar" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), b"labels": [0] * 40}, f)
    (root / "imgs").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    return {
        "digits": DataSpec("digits"),
        "binarized-mnist": DataSpec("binarized-mnist", path=str(root / "bm.npz")),
        "mnist": DataSpec("mnist", path=str(root / "mnist"), levels=4),
        "fashion-mnist": DataSpec("fashion-mnist", path=str(root / "mnist"), levels=16),
        "cifar10": DataSpec("cifar10", path=str(root / "cifar"), levels=8),
        "folder": DataSpec("folder", path=str(root / "imgs"), image_size=12, levels=4),
    }


@pytest.mark.parametrize("model", ["vae", "autoencoder"])
def test_trains_on_every_data_set(tmp_path: Path, model: str) -> None:
    for name, spec in _write_every_dataset(tmp_path).items():
        r = train_run(model=model, data=spec, model_overrides=SMALL, out=tmp_path / f"{model}-{name}",
                      train=TrainConfig(steps=2, batch_size=8, n_samples=4, eval_limit=8),
                      objective={"iw_samples": 2}, progress=False)
        keys = {"neg_elbo", "reconstruction_nats", "kl_nats", "iwae_nll", "iw_samples"} if model == "vae" else {
            "l2_per_image"}
        assert keys <= set(r.metrics), (name, r.metrics)
        assert model != "vae" or r.metrics["iw_samples"] == 2
        assert all(math.isfinite(v) for v in r.metrics.values()) and r.samples is not None


def test_vae_learns_and_kl_warmup_is_logged(tmp_path: Path) -> None:
    r = train_run(model="vae", model_overrides=SMALL, out=tmp_path / "v", progress=False,
                  train=TrainConfig(steps=60, batch_size=32, n_samples=0, log_every=1),
                  objective={"kl_warmup_steps": 20, "iw_samples": 4})
    import json

    recs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in recs if "beta" in rec]
    assert steps[0]["beta"] == pytest.approx(1 / 20) and steps[-1]["beta"] == 1.0
    assert np.mean([s["neg_elbo"] for s in steps[-10:]]) < np.mean([s["neg_elbo"] for s in steps[:10]]) - 10


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("latent")
    out = {}
    for name, extra in (("vae", {}), ("autoencoder", {}), ("vae-cond", {"conditional": True})):
        model = name.split("-")[0]
        run = train_run(model=model, data=DataSpec(conditional=bool(extra)), model_overrides=SMALL,
                        train=TrainConfig(steps=40, batch_size=32, n_samples=0, eval_limit=16),
                        objective={"iw_samples": 2},
                        out=root / name, progress=False).run_dir
        out[name] = (run, export_run(run, root / f"{name}-bundle", formats=("onnx", "torchscript")))
    return out


@pytest.mark.parametrize("name", ["vae", "autoencoder", "vae-cond"])
def test_export_parity_and_reproducible_sampling(latent_runs, name: str, fresh_seed: int) -> None:
    run, bundle = latent_runs[name]
    model, _ = load_run(run)
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randint(0, 17, (5, 1, 8, 8), generator=g)
    z = torch.randn(5, 4, generator=g)
    labels = torch.randint(0, 10, (5,), generator=g) if name == "vae-cond" else None
    lab_np = None if labels is None else labels.numpy()
    with torch.no_grad():
        enc = model.encode(x, labels)
        mean = (enc[0] if isinstance(enc, tuple) else enc).numpy()
        dec = model.decode(z, labels).numpy()
    for backend in ("onnx", "torchscript"):
        s = load(bundle, backend=backend)
        assert isinstance(s, LatentSampler)
        got_mean, logvar = s.encode(x.numpy().transpose(0, 2, 3, 1).astype(np.uint8), labels=lab_np)
        np.testing.assert_allclose(got_mean, mean, atol=1e-4, rtol=0)
        feed = {"z": z.numpy(), **({"labels": lab_np} if lab_np is not None else {})}
        np.testing.assert_allclose(s.backend.run("decode", feed)[0], dec, atol=1e-4, rtol=0)
        if name == "autoencoder":
            assert not logvar.any()
    a = load(bundle, backend="onnx").sample(6, seed=5, batch_size=4)
    b = load(bundle, backend="torchscript").sample(6, seed=5, batch_size=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(load(bundle).sample(3, seed=5, start=3), a[3:])
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8 and a.max() <= 16


def test_runtime_latent_api(latent_runs) -> None:
    _, bundle = latent_runs["vae"]
    s = load(bundle)
    images = s.sample(4, seed=0)
    rec = s.reconstruct(images)
    assert rec.shape == images.shape
    path = s.interpolate(images[:2], images[2:], steps=5)
    assert path.shape == (2, 5, 8, 8, 1)
    np.testing.assert_array_equal(path[:, 0], s.reconstruct(images[:2]))
    np.testing.assert_array_equal(path[:, -1], s.reconstruct(images[2:]))
    drawn = s.sample(4, seed=0, mode="sample")
    assert not np.array_equal(drawn, images) and np.array_equal(drawn, s.sample(4, seed=0, mode="sample"))
    from genforge.runtime import InputError

    with pytest.raises(InputError, match=r"latents of shape \(N, 4\)"):
        s.decode(np.zeros((2, 3)))


def test_gen_sample_on_latent_bundles(latent_runs, tmp_path: Path) -> None:
    _, bundle = latent_runs["autoencoder"]
    r = CliRunner()
    res = r.invoke(sample_command, [str(bundle), "-n", "3", "--steps", "4", "--interpolate", "digits",
                                    "-o", str(tmp_path / "i.npz"), "--quiet"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "i.npz") as z:
        assert z["images"].shape == (12, 8, 8, 1)
    res = r.invoke(sample_command, [str(bundle), "-n", "5", "-o", str(tmp_path / "s.png"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = r.invoke(sample_command, [str(bundle), "--complete", str(tmp_path / "i.npz"), "--rows", "2",
                                    "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 2 and "autoregressive" in res.output


def test_encoder_initializes_a_classifier_that_trains(latent_runs) -> None:
    for name in ("vae", "autoencoder"):
        run, _ = latent_runs[name]
        _, report = finetune_classifier(run, DataSpec("digits"), epochs=6)
        assert report.losses[-1] < report.losses[0] * 0.5
        assert report.accuracy > max(0.5, report.initial_accuracy + 0.3)


@pytest.mark.parametrize("model", ["vae", "autoencoder"])
def test_training_scores_are_gen_evals_scores(tmp_path: Path, model: str) -> None:
    """One estimate, one set of names: the last held-out record of a run equals gen-eval on the same split."""
    from genforge.train.evaluate import evaluate_path

    r = train_run(model=model, model_overrides=SMALL, out=tmp_path / "r", progress=False,
                  train=TrainConfig(steps=6, batch_size=16, n_samples=0, eval_limit=40), objective={"iw_samples": 3})
    ev = evaluate_path(r.run_dir, split="valid", iw_samples=3 if model == "vae" else 0, limit=40, batch_size=16)
    assert set(r.metrics) <= set(ev)
    for key, value in r.metrics.items():
        assert ev[key] == pytest.approx(value, rel=1e-5), key


def test_the_iwae_bound_is_the_importance_weighted_estimate_and_tightens_with_k() -> None:
    """VAE.iwae_bound against the formula of Burda et al. (2016) written out in float64 with the same noise;
    its mean over draws rises with k (k=1 is a sampled ELBO)."""
    torch.manual_seed(0)
    vae = build_model("vae", {"channels": 1, "height": 8, "width": 8, "levels": 2, "latent_size": 4,
                              "likelihood": "bernoulli"}).double().eval()
    x = torch.randint(0, 2, (5, 1, 8, 8))
    torch.manual_seed(3)
    got = vae.iwae_bound(x, 7)
    torch.manual_seed(3)
    mu, logvar = vae.encode(x)
    eps = torch.randn(7, *mu.shape, dtype=mu.dtype)
    want = []
    for b in range(5):
        logw = []
        for i in range(7):
            z = mu[b] + torch.exp(0.5 * logvar[b]) * eps[i, b]
            log_q = torch.distributions.Normal(mu[b], torch.exp(0.5 * logvar[b])).log_prob(z).sum()
            log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
            logw.append(vae.log_px(x[b : b + 1], z[None], None)[0] + log_p - log_q)
        want.append(torch.logsumexp(torch.stack(logw), 0) - math.log(7))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-9)
    with torch.no_grad():  # q(z|x) far from the posterior, so that more samples have something to correct
        vae.enc_out.bias[:4] += 2.0
    means = []
    for k in (1, 10, 100):
        torch.manual_seed(0)
        with torch.no_grad():
            means.append(float(torch.stack([vae.iwae_bound(x, k) for _ in range(20)]).mean()))
    assert means[0] < means[1] < means[2]


def test_iw_train_trains_the_iwae_and_refuses_the_kl_warmup(tmp_path: Path) -> None:
    from genforge.cli.main import train_command

    r = CliRunner().invoke(train_command, ["--model", "vae", "--steps", "30", "--iw-train", "5", "--samples", "0",
                                           "--iw-samples", "0", "--out", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [x["iwae_train_nats"] for x in recs if "iwae_train_nats" in x]
    assert len(train) == 3 and train[-1] < train[0]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["objective"]["iw_train"] == 5
    r = CliRunner().invoke(train_command, ["--model", "vae", "--iw-train", "5", "--kl-warmup-steps", "10",
                                           "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "exclude each other" in r.output
