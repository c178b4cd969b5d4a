"""One call that trains a model end to end: ``gen-train`` parses its options and calls ``train_run``."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genforge.models import get_spec
from genforge.models.base import ConfigError
from genforge.runtime.files import LOCK_FILE, atomic_write_json, exclusive_lock

from . import checkpoint as ckpt
from .data import DataError, ImageData, load_dataset
from .distributed import from_env, init
from .errors import UsageError
from .objectives import objective_for, objective_options
from .trainer import TrainConfig, Trainer, TrainingError, choose_threads, resolve_device


@dataclass
class DataSpec:
    name: str = "digits"
    path: str | None = None
    split: str = "train"
    eval_split: str = "valid"
    levels: int | None = None
    image_size: int | None = None  # the folder data set only (default 32)
    channels: int | None = None  # the folder data set only (default 3)
    conditional: bool = False  # pass class labels to models that take them

    def __post_init__(self) -> None:
        # A run records what it used: the folder-only fields stay None for the data sets they do not apply to.
        if self.name == "folder":
            self.image_size = 32 if self.image_size is None else self.image_size
            self.channels = 3 if self.channels is None else self.channels
        else:
            self.image_size = self.channels = None

    def load(self, split: str, seed: int) -> ImageData:
        return load_dataset(
            self.name, split=split, path=self.path, levels=self.levels, seed=seed,
            image_size=self.image_size or 32, channels=self.channels or 3,
        )


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: Path | None = None


def default_model_config(name: str, data: ImageData, conditional: bool) -> dict[str, Any]:
    """The fields a data set fixes: image shape, levels, classes; and the natural likelihood."""
    c, h, w = data.shape
    cfg: dict[str, Any] = {"channels": c, "height": h, "width": w, "levels": data.levels}
    fields = get_spec(name).config_cls.__dataclass_fields__
    if "likelihood" in fields:
        cfg["likelihood"] = "bernoulli" if data.levels == 2 else "categorical"
    if conditional:
        if not data.num_classes:
            raise UsageError("--conditional needs a data set with class labels")
        cfg["num_classes"] = data.num_classes
    return cfg


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values are parsed as JSON when they can be (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    """Empty ``out`` for a new run (it must be a run itself to be replaced); its lock file stays, held."""
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if entries:
        if not overwrite:
            raise UsageError(f"{out}: output directory exists and is not empty (pass --overwrite or --resume)")
        if not (out / ckpt.CONFIG_FILE).exists():
            raise UsageError(f"{out}: refusing to overwrite a directory that is not a genforge run")
        for p in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# gen-train options a resumed run may change: how long it trains and what it records, not what it learns
# from or how. Any other option given with --resume must agree with the run's config.json.
RESUME_MUTABLE = ("epochs", "steps", "eval_limit", "log_every", "checkpoint_every", "n_samples")
_DATA_OPTIONS = {"data": "name", "data_path": "path", "split": "split", "eval_split": "eval_split",
                 "levels": "levels", "image_size": "image_size", "channels": "channels",
                 "conditional": "conditional"}


def same_path(a: str | None, b: str | None) -> bool:
    """Two recorded data paths name the same file (or both are unset)."""
    if a is None or b is None:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _flag(option: str) -> str:
    return "--" + {"n_samples": "samples"}.get(option, option).replace("_", "-")


def check_resume_options(
    run: ckpt.RunConfig, explicit: set[str], *, model: str, data: DataSpec, train: TrainConfig,
    overrides: dict[str, Any], objective: dict[str, Any],
) -> dict[str, Any]:
    """Compare the options given with --resume against the run; returns the changes it may take (the
    RESUME_MUTABLE ones), and raises a UsageError naming the first option that contradicts the run."""
    changes: dict[str, Any] = {}
    requested_train = train.to_dict()
    for option in sorted(explicit):
        if option == "model":
            want, have = model, run.model
        elif option in _DATA_OPTIONS:
            key = _DATA_OPTIONS[option]
            want, have = vars(data)[key], run.data.get(key)
            if key == "path" and same_path(want, have):
                want = have
        elif option in requested_train:
            want, have = requested_train[option], run.train.get(option)
            if option in RESUME_MUTABLE:
                changes[option] = want
                continue
        elif option in run.objective:
            want, have = objective.get(option), run.objective[option]
        else:
            continue  # not part of the run (--device, --quiet, --out, ...)
        if want != have:
            raise UsageError(f"{_flag(option)} {want} disagrees with the run's recorded value {have}: a resumed run "
                             f"keeps its config (only {', '.join(map(_flag, RESUME_MUTABLE))} may change)")
    for key, value in overrides.items():
        if key not in run.model_config or run.model_config[key] != value:
            raise UsageError(f"--set {key}={value} disagrees with the run's model config "
                             f"({key}={run.model_config.get(key)}): a resumed run keeps its model")
    return changes


def next_run_dir(root: Path, stem: str) -> Path:
    i = 1
    while (root / f"{stem}-{i}").exists():
        i += 1
    return root / f"{stem}-{i}"


def train_run(
    *,
    model: str = "pixelcnn",
    data: DataSpec | None = None,
    model_overrides: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    extend: dict[str, int] | None = None,
    explicit: set[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    objective: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``model`` on ``data`` into a run directory, holding its lock (a second writer is refused).

    With ``resume``, continue the run in ``out`` from its own config.json. ``explicit`` names the options
    the caller set on purpose (gen-train: the flags typed); each must agree with the run, except
    RESUME_MUTABLE ones, which are applied (so a finished run can be trained further). ``extend``
    (``epochs``/``steps``) and ``model_overrides`` are always explicit. ``threads``: torch's CPU threads,
    0 to choose from the cores and the load (trainer.choose_threads), None to leave torch's setting alone.
    ``objective``: the family's own training options (objectives.OBJECTIVE_OPTIONS; others are ignored).
    """
    if threads is not None:
        n, why = choose_threads(threads)
        torch.set_num_threads(n)
        if progress and from_env().is_main:
            print(f"torch threads: {why}", file=sys.stderr, flush=True)
    try:
        if resume:
            if out is None:
                raise UsageError("--resume needs --out RUN_DIR")
            run = ckpt.read_run_config(out)
            changes = check_resume_options(
                run, set(explicit or ()), model=model, data=data or DataSpec(), train=train or TrainConfig(),
                overrides=model_overrides or {}, objective=objective or {})
            return _resume(Path(out), run, {**changes, **(extend or {})}, device, progress)
        return _start(model, data or DataSpec(), model_overrides or {}, train or TrainConfig(), objective or {},
                      out, device, overwrite, progress)
    except (ConfigError, DataError) as e:
        raise UsageError(str(e)) from None


def _start(
    model_name: str, data: DataSpec, overrides: dict[str, Any], tcfg: TrainConfig, objective: dict[str, Any],
    out: str | Path | None, device: str, overwrite: bool, progress: bool,
) -> RunResult:
    tcfg.validate()
    train_data = data.load(data.split, tcfg.seed)
    model_cfg = {**default_model_config(model_name, train_data, data.conditional), **overrides}
    model_cfg = get_spec(model_name).config_cls.from_dict(model_cfg).to_dict()
    info = from_env()
    if info.enabled and out is None:
        raise UsageError("distributed runs need --out (every process must name the same run directory)")
    run_dir = Path(out) if out is not None else next_run_dir(Path("runs"), f"{model_name}-{data.name}")
    options = objective_options(get_spec(model_name).family, objective)
    run = ckpt.RunConfig(model_name, model_cfg, vars(data), tcfg.to_dict(), options)
    if not info.is_main:  # the other ranks only read the run directory that rank 0 prepares
        return _fit(run, run_dir, train_data, device, progress, resume=False)
    with run_lock(run_dir):
        prepare_out_dir(run_dir, overwrite=overwrite)
        atomic_write_json(run_dir / ckpt.CONFIG_FILE, run.to_json())
        return _fit(run, run_dir, train_data, device, progress, resume=False)


def run_lock(run_dir: Path) -> Any:
    """The run directory's exclusive lock (training, resuming): a second writer gets a LockError."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a directory")
    return exclusive_lock(run_dir / LOCK_FILE, f"run directory {run_dir}")


def _resume(run_dir: Path, run: ckpt.RunConfig, changes: dict[str, Any], device: str, progress: bool) -> RunResult:
    data = DataSpec(**run.data)
    train_data = data.load(data.split, int(run.train["seed"]))
    if not from_env().is_main:
        return _fit(run, run_dir, train_data, device, progress, resume=True)
    with run_lock(run_dir):
        if any(run.train.get(k) != v for k, v in changes.items()):
            run.train.update(changes)
            atomic_write_json(run_dir / ckpt.CONFIG_FILE, run.to_json())
        return _fit(run, run_dir, train_data, device, progress, resume=True)


def _fit(
    run: ckpt.RunConfig, run_dir: Path, train_data: ImageData, device: str, progress: bool, *, resume: bool
) -> RunResult:
    tcfg = TrainConfig(**run.train)
    data = DataSpec(**run.data)
    dev = resolve_device(device)
    info = from_env()
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    info = init(dev)
    torch.manual_seed(tcfg.seed)
    net, config = ckpt.model_from_config(run, run_dir / ckpt.CONFIG_FILE)
    valid_data = data.load(data.eval_split, tcfg.seed) if data.eval_split else None
    for split_name, d in (("training", train_data), ("held-out", valid_data)):
        if d is not None:
            check_data_matches(config.to_dict(), d, split_name)
    objective = objective_for(net, run.objective, lr=tcfg.lr, train_data=train_data)
    trainer = Trainer(net, objective, train_data, valid_data, run_dir, tcfg, device=dev, progress=progress,
                      dist_info=info)
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    samples = sorted((run_dir / "samples").glob("epoch_*.png"))
    return RunResult(run_dir, trainer.step, metrics, samples[-1] if samples else None)


def check_data_matches(model_cfg: dict[str, Any], data: ImageData, split: str) -> None:
    c, h, w = data.shape
    want = (model_cfg["channels"], model_cfg["height"], model_cfg["width"])
    if (c, h, w) != want:
        raise UsageError(f"the {split} data has images of shape (C, H, W) = {(c, h, w)}, the model expects {want}")
    if data.levels != model_cfg["levels"]:
        raise UsageError(f"the {split} data has {data.levels} levels, the model expects {model_cfg['levels']}")
    if model_cfg.get("num_classes") and data.labels is None:
        raise UsageError(f"the model is class-conditional but the {split} data has no labels")
    if model_cfg.get("num_classes") and data.labels is not None and data.labels.max() >= model_cfg["num_classes"]:
        raise UsageError(f"the {split} data has labels >= the model's {model_cfg['num_classes']} classes")


__all__ = ["DataSpec", "RunResult", "TrainingError", "UsageError", "train_run"]
