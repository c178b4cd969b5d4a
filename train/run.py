"""One call that trains a model end to end: ``gen-train`` parses its options and calls ``train_run``."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genforge.models import get_spec
from genforge.models.base import ConfigError
from genforge.runtime.files import (
    LOCK_FILE,
    aside_name,
    atomic_write_json,
    clean_dead_siblings,
    exclusive_lock,
    remove_tree,
    replace_dir,
)

from . import checkpoint as ckpt
from .data import DataError, ImageData, binarized_once, load_dataset
from .distributed import from_env, init
from .errors import UsageError
from .objectives import objective_for, objective_options
from .trainer import TrainConfig, Trainer, TrainingError, choose_threads, resolve_device

MAX_IMAGE_SIDE = 1024  # models.base.FIELD_BOUNDS' height and width


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
            if not isinstance(self.image_size, int) or not 1 <= self.image_size <= MAX_IMAGE_SIDE:
                raise UsageError(f"--image-size must be an integer in [1, {MAX_IMAGE_SIDE}], got {self.image_size!r}")
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


RUN_ENTRIES = frozenset({ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE, ckpt.EMA_WEIGHTS_FILE, ckpt.BEST_WEIGHTS_FILE,
                         ckpt.STATE_FILE, ckpt.METRICS_FILE, "samples", "tb", LOCK_FILE})


def foreign_entries(out: Path) -> list[str]:
    """What in ``out`` a genforge run does not write (its files, samples/, tb/, its lock, atomic-write temps)."""
    return sorted(p.name for p in out.iterdir()
                  if p.name not in RUN_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def check_replaceable(out: Path) -> None:
    """``out`` may be replaced by a new run only if it is a genforge run and holds nothing else."""
    try:
        ckpt.read_run_config(out)
    except ckpt.CheckpointError:
        raise UsageError(f"{out}: refusing to overwrite a directory that is not a genforge run "
                         f"(no readable genforge {ckpt.CONFIG_FILE})") from None
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(f"{out}: refusing to overwrite: it holds files a genforge run does not write ({shown})")


def needs_replacing(out: Path, *, overwrite: bool) -> bool:
    """True when ``out`` holds a run that --overwrite will replace; False when it is new or empty."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if not entries:
        return False
    if not overwrite:
        raise UsageError(f"{out}: output directory exists and is not empty (pass --overwrite or --resume)")
    check_replaceable(out)
    return True


# gen-train options a resumed run may change: how long it trains and what it records, not what it learns
# from or how. Any other option given with --resume must agree with the run's config.json.
RESUME_MUTABLE = ("epochs", "steps", "eval_limit", "log_every", "checkpoint_every", "n_samples", "patience")
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
    defaults = default_model_config(model_name, train_data, data.conditional)
    if tcfg.dynamic_binarize:
        # Each step draws binary images from the grey ones: the model sees 2 levels whatever the data has.
        if train_data.levels <= 2:
            raise UsageError(f"--dynamic-binarize draws binary images from grey levels, but the {data.name} data "
                             f"has {train_data.levels} levels already (drop the flag, or pass grey data)")
        if overrides.get("levels", 2) != 2:
            raise UsageError(f"--dynamic-binarize trains a 2-level model; levels={overrides['levels']} contradicts "
                             "it")
        defaults["levels"] = 2
        if "likelihood" in defaults:
            defaults["likelihood"] = "bernoulli"
    model_cfg = {**defaults, **overrides}
    model_cfg = get_spec(model_name).config_cls.from_dict(model_cfg).to_dict()
    check_fits(model_name, model_cfg, tcfg.batch_size)
    info = from_env()
    if info.enabled and out is None:
        raise UsageError("distributed runs need --out (every process must name the same run directory)")
    if out is not None and not str(out).strip():
        raise UsageError("--out is empty (name a run directory)")
    run_dir = Path(out) if out is not None else next_run_dir(Path("runs"), f"{model_name}-{data.name}")
    options = objective_options(get_spec(model_name).family, objective)
    run = ckpt.RunConfig(model_name, model_cfg, vars(data), tcfg.to_dict(), options)
    if not info.is_main:  # the other ranks only read the run directory that rank 0 prepares
        return _fit(run, run_dir, train_data, device, progress, resume=False)
    lock_was_there = (run_dir / LOCK_FILE).exists()
    with run_lock(run_dir):
        clean_dead_siblings(run_dir)
        try:
            replace = needs_replacing(run_dir, overwrite=overwrite)
        except UsageError:
            if not lock_was_there:  # a directory that is not ours keeps no trace of the refusal
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
            raise
        if not replace:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / ckpt.CONFIG_FILE, run.to_json())
            return _fit(run, run_dir, train_data, device, progress, resume=False)
        # The old run stays whole until the new one has its first checkpoint: the new run trains in a staging
        # directory beside it, which then replaces it by renames (a run that fails before that leaves the old
        # one as it was).
        staging = aside_name(run_dir, "staging")
        staging.mkdir()
        try:
            with exclusive_lock(staging / LOCK_FILE, f"run directory {staging}"):
                atomic_write_json(staging / ckpt.CONFIG_FILE, run.to_json())

                def publish(trainer: Trainer) -> None:
                    replace_dir(staging, run_dir)
                    trainer.run_dir = run_dir

                try:
                    return _fit(run, staging, train_data, device, progress, resume=False,
                                on_first_checkpoint=publish)
                except TrainingError as e:
                    if not staging.exists():  # failed after it replaced the old run: its checkpoint is named
                        raise
                    first = str(e).split("; no checkpoint had been written yet")[0]
                    raise TrainingError(f"{first}; {run_dir} still holds the run it held before") from None
        finally:
            if staging.exists():
                remove_tree(staging)


MAX_PARAMETERS = 1 << 31


def check_fits(model_name: str, model_cfg: dict[str, Any], batch: int) -> None:
    """Refuse a model or batch that cannot train in this machine's memory, before anything is allocated:
    float32 weights, gradients and Adam's two moments (16 bytes a parameter), plus the activations a step
    keeps for its backward pass, counted on the meta device (estimate_size)."""
    from genforge.models.registry import estimate_size
    from genforge.runtime.sampler import available_memory

    params, activations = estimate_size(model_name, model_cfg, batch)
    if params > MAX_PARAMETERS:
        raise UsageError(f"the model would have {params:,} parameters (more than {MAX_PARAMETERS:,}); "
                         "lower --set hidden/layers")
    need = 16 * params + 2 * activations
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(f"training this model at batch {batch} needs about {need / 2**30:.1f} GiB "
                         f"({params:,} parameters, {activations / 2**30:.1f} GiB of activations); "
                         f"{free / 2**30:.1f} GiB is available (lower --batch-size or the model's size)")


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


def train_config_from(values: dict[str, Any], source: str | Path) -> TrainConfig:
    """config.json's training fields, checked: known names, the field's type, valid values."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{source}: unknown training field(s) {', '.join(unknown)}")
    for key, value in values.items():
        want = fields[key]
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, want)
        if not ok:
            raise UsageError(f"{source}: training field {key!r} must be {want.__name__}, got {value!r}")
    cfg = TrainConfig(**values)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None
    return cfg


def _fit(
    run: ckpt.RunConfig, run_dir: Path, train_data: ImageData, device: str, progress: bool, *, resume: bool,
    on_first_checkpoint: Any = None,
) -> RunResult:
    tcfg = train_config_from(run.train, run_dir / ckpt.CONFIG_FILE)
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
    if tcfg.dynamic_binarize and valid_data is not None:
        valid_data = binarized_once(valid_data, tcfg.seed)
    for split_name, d in (("training", train_data), ("held-out", valid_data)):
        if d is not None:
            # A dynamically binarized run's steps see binary draws of the grey training images.
            binary = tcfg.dynamic_binarize and d is train_data
            check_data_matches(config.to_dict(), d, split_name, levels=2 if binary else None)
    objective = objective_for(net, run.objective, lr=tcfg.lr, train_data=train_data)
    trainer = Trainer(net, objective, train_data, valid_data, run_dir, tcfg, device=dev, progress=progress,
                      dist_info=info)
    trainer.on_first_checkpoint = on_first_checkpoint
    if resume:
        trainer.resume()
        if trainer.step > trainer.total_steps:
            raise UsageError(f"{run_dir}: the run is at step {trainer.step}, past the {trainer.total_steps} "
                             "steps asked for: nothing to train (a run cannot be shortened; export it as it is)")
    metrics = trainer.fit()
    run_dir = trainer.run_dir
    samples = sorted((run_dir / "samples").glob("epoch_*.png"))
    return RunResult(run_dir, trainer.step, metrics, samples[-1] if samples else None)


def check_data_matches(model_cfg: dict[str, Any], data: ImageData, split: str, *, levels: int | None = None) -> None:
    """``levels``: the levels the model sees of this data, when not the data's own (dynamic binarization)."""
    c, h, w = data.shape
    want = (model_cfg["channels"], model_cfg["height"], model_cfg["width"])
    if (c, h, w) != want:
        raise UsageError(f"the {split} data has images of shape (C, H, W) = {(c, h, w)}, the model expects {want}")
    seen = data.levels if levels is None else levels
    if seen != model_cfg["levels"]:
        raise UsageError(f"the {split} data has {seen} levels, the model expects {model_cfg['levels']}")
    if model_cfg.get("num_classes") and data.labels is None:
        raise UsageError(f"the model is class-conditional but the {split} data has no labels")
    if model_cfg.get("num_classes") and data.labels is not None and data.labels.max() >= model_cfg["num_classes"]:
        raise UsageError(f"the {split} data has labels >= the model's {model_cfg['num_classes']} classes")


__all__ = ["DataSpec", "RunResult", "TrainingError", "UsageError", "train_run"]
