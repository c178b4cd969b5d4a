"""``gen-eval``: score a run directory or a bundle on a data split, one JSON object out.

- Autoregressive models: the exact NLL, ``nats_per_image`` and ``bits_per_dim``.
- VAE: ``neg_elbo`` (its two terms) and the k-sample importance-weighted NLL estimate ``iwae_nll``.
- Autoencoder: ``l2_per_image``.
- Any model that samples: ``fd`` and ``kd``, the offline sample-quality distances (train/quality.py).

A run and the bundle exported from it give the same numbers: both go through the same numpy code below,
fed by the eager model or by the runtime, and the VAE's importance samples for image i come from
(seed, i) alone, as the runtime's randomness does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genforge.runtime import zoo
from genforge.runtime.bundle import MANIFEST
from genforge.runtime.progress import Progress, chunks

from . import scores
from .checkpoint import CONFIG_FILE, load_run, read_run_config
from .data import ImageData, binarized_once
from .objectives import eager_latent_functions, objective_for
from .quality import sample_quality, train_feature_net
from .run import DataSpec, UsageError, check_data_matches, same_path


@dataclass
class Scorer:
    """What evaluation needs from a model, as numpy functions (eager or exported)."""

    family: str
    config: dict[str, Any]
    log_probs: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None  # x (B,C,H,W) -> (B,C,H,W,K)
    encode: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]] | None = None
    decode: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None  # z -> log-probs or x_mean
    sample: Callable[[int, int, np.ndarray | None], np.ndarray] | None = None  # (n, seed, labels) -> images
    is_vae: bool = False
    bundle_source: dict[str, Any] = field(default_factory=dict)  # a bundle's record of its run (data, seed)


def eager_scorer(run_dir: Path, weights: str = "last") -> Scorer:
    """The Scorer of a run directory's model (its ``weights``: last, ema or best), in float32 as a bundle is."""
    model, _ = load_run(run_dir, weights=weights)  # float32, as the bundle computes
    cfg = model.config.to_dict()
    family = type(model).family

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        if a is None:
            return None
        a = np.asarray(a)
        return torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a)

    objective = objective_for(model)

    def sample(n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        return objective.sample(model, n, seed, labels)

    if family == "autoregressive":
        def log_probs(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
            with torch.no_grad():
                return model(t(x), t(y)).numpy()

        return Scorer(family, cfg, log_probs=log_probs, sample=sample)
    if family == "latent":
        encode, decode = eager_latent_functions(model)
        return Scorer(family, cfg, encode=encode, decode=decode, sample=sample, is_vae=model.variational)
    return Scorer(family, cfg, sample=sample)


def bundle_scorer(path: Path, backend: str) -> Scorer:
    """The Scorer of a bundle (or ``zoo:NAME``) through the runtime's ``backend``."""
    from genforge.runtime import AutoregressiveSampler, LatentSampler, load

    s = load(path, backend=backend)
    cfg = dict(s.bundle.manifest["model_config"])
    family = s.bundle.family

    def sample(n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        return s.sample(n, seed=seed, labels=labels)  # type: ignore[attr-defined]

    src = dict(s.bundle.manifest.get("source") or {})
    if isinstance(s, AutoregressiveSampler):
        return Scorer(family, cfg, log_probs=lambda x, y: s.forward(x.astype(np.float32), y), sample=sample,
                      bundle_source=src)
    if isinstance(s, LatentSampler):
        def encode(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            return s.encode(x.transpose(0, 2, 3, 1).astype(np.uint8), labels=y)

        def decode(z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
            feed = {"z": z.astype(np.float32), **({"labels": y} if y is not None else {})}
            return s.backend.run("decode", feed)[0]

        return Scorer(family, cfg, encode=encode, decode=decode, sample=sample, is_vae=s.is_vae, bundle_source=src)
    return Scorer(family, cfg, sample=sample, bundle_source=src)


def score_likelihoods(scorer: Scorer, data: ImageData, *, batch_size: int = 64, iw_samples: int = 0,
                      seed: int = 0, progress: bool = False) -> dict[str, float]:
    c = scorer.config
    dims = c["channels"] * c["height"] * c["width"]
    labels_needed = bool(c.get("num_classes"))
    totals: dict[str, float] = {}
    n = len(data)
    with Progress(n, "eval", enabled=progress) as bar:
        for a, b in chunks(n, batch_size):
            x = np.ascontiguousarray(data.images[a:b].transpose(0, 3, 1, 2))  # (B, C, H, W) levels
            y = data.labels[a:b] if labels_needed and data.labels is not None else None
            if scorer.family == "autoregressive" and scorer.log_probs is not None:
                scores.add(totals, "nll", -scores.picked_log_prob(scorer.log_probs(x, y), x).sum())
            elif scorer.family == "latent" and scorer.encode is not None and scorer.decode is not None:
                scores.latent_totals(scorer.encode, scorer.decode, x, y, variational=scorer.is_vae,
                                     levels=int(c["levels"]), first=a, seed=seed, iw_samples=iw_samples,
                                     totals=totals)
            bar.update(b - a)
    return scores.summarize(totals, n, dims=dims, iw_samples=iw_samples)


def evaluate_path(
    path: str | Path,
    data: dict[str, Any] | None = None,
    *,
    split: str = "test",
    batch_size: int = 64,
    iw_samples: int = 0,
    quality: bool = False,
    quality_samples: int = 500,
    limit: int = 0,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = False,
    inception_weights: str | Path | None = None,
    weights: str = "last",
) -> dict[str, Any]:
    """Evaluate a run directory or a bundle on ``split`` of its data.

    ``data``: DataSpec fields to use instead of the ones the model records (``name``, ``path``, ``levels``,
    ``image_size``, ``channels``); by default the data set the model was trained on. Splits a data set
    lacks are carved with the training seed the model records, so the scored split is exactly the one the
    model was trained without. ``seed`` drives the VAE's importance samples and the quality samples only.
    ``inception_weights``: also the distances in Inception-v3 feature space (implies ``quality``). ``weights``:
    a run directory's last, ema or best weights (train.checkpoint.weights_file)."""
    p = Path(zoo.resolve(path))
    if (p / MANIFEST).is_file():
        if weights != "last":
            raise UsageError(f"{p}: --weights {weights} chooses a run directory's weights; a bundle holds one set")
        scorer, kind = bundle_scorer(p, backend), "bundle"
        source = scorer.bundle_source
    elif (p / CONFIG_FILE).is_file():
        scorer, kind = eager_scorer(p, weights), "run"
        run = read_run_config(p)
        source = {"data": run.data, "seed": run.train.get("seed"),
                  "dynamic_binarize": bool(run.train.get("dynamic_binarize"))}
    else:
        raise UsageError(f"{p}: neither a run directory (config.json) nor a bundle (manifest.json)")
    given = dict(data or {})
    recorded = (source.get("data") or {}) if kind == "bundle" else {}
    if kind == "bundle" and recorded.get("path") is not None and "path" not in given:
        # A downloaded bundle's manifest is not the user's word: its data path is shown, never opened.
        raise UsageError(f"{p}: the bundle was trained on {recorded.get('name')!r} data at {recorded['path']!r} "
                         "(as its manifest says); pass --data-path to score it (bundles name no files to open)")
    spec, split_seed, trained_on = eval_data(source, given, seed, f"{p}")
    levels = int(scorer.config["levels"])
    dynamic = bool(source.get("dynamic_binarize")) and levels == 2
    if spec.levels is None and not dynamic:  # a dynamically binarized model is scored on a draw of grey data
        spec.levels = levels
    ds = spec.load(split, split_seed)
    if dynamic and ds.levels > 2:
        ds = binarized_once(ds, split_seed)  # the draw the run's own evaluations scored
    check_data_matches(scorer.config, ds, split)
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    out: dict[str, Any] = {"path": str(path), "kind": kind, "family": scorer.family, "data": spec.name,
                           "split": split, "split_origin": ds.origin, "split_seed": split_seed, "images": len(ds)}
    if trained_on:  # where the carving seed came from: a bundle's is its manifest's word, which nothing checks
        out["split_seed_from"] = ("the bundle's manifest (source.seed; trusted, see docs/bundle.md)"
                                  if kind == "bundle" else "the run's config.json")
    if trained_on and split == source["data"].get("split", "train"):
        out["warning"] = f"the model was trained on this split ({split}): these are not held-out scores"
    out.update(score_likelihoods(scorer, ds, batch_size=batch_size, iw_samples=iw_samples, seed=seed,
                                 progress=progress))
    if quality or inception_weights is not None:
        if scorer.sample is None:
            raise UsageError("this model does not sample: no sample-quality metric")
        train = spec.load("train", split_seed)
        n = min(quality_samples, len(ds))
        labels = ds.labels[:n] if scorer.config.get("num_classes") and ds.labels is not None else None
        generated = scorer.sample(n, seed, labels)
        report = sample_quality(train_feature_net(train, seed=seed), generated, ds.images[:n], levels)
        out.update({**report.to_dict(), "quality_samples": n,
                    "quality_note": "features of a small classifier trained here; not comparable to Inception FID"})
        if inception_weights is not None:
            from .inception import load_inception

            out.update(sample_quality(load_inception(inception_weights), generated, ds.images[:n],
                                      levels).to_dict("inception_"))
    return out


_DATA_FIELDS = ("name", "path", "levels", "image_size", "channels")


def eval_data(source: dict[str, Any], given: dict[str, Any], seed: int, what: str) -> tuple[DataSpec, int, bool]:
    """The data to score and the seed its missing splits are carved with; True when it is the data set the
    model was trained on (then the training seed carves, whatever ``seed`` is)."""
    recorded = source.get("data")
    unknown = sorted(set(given) - set(_DATA_FIELDS))
    if unknown:
        raise UsageError(f"unknown data field(s) {', '.join(unknown)}; known: {', '.join(_DATA_FIELDS)}")
    if not recorded:
        if "name" not in given:
            raise UsageError(f"{what} does not record the data it was trained on: pass --data (and --data-path)")
        return DataSpec(**given), seed, False
    name = given.get("name", recorded["name"])
    path = given.get("path", recorded.get("path"))
    same = name == recorded["name"] and same_path(path, recorded.get("path"))
    fields = {"name": name, **({k: recorded.get(k) for k in _DATA_FIELDS} if same else {}), **given}
    train_seed = source.get("seed")
    if same and train_seed is None:
        raise UsageError(f"{what} does not record its training seed, so its held-out split cannot be rebuilt")
    return DataSpec(**fields), int(train_seed) if same else seed, same

