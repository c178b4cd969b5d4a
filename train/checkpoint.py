"""The run directory: config.json, model.safetensors, trainer_state.pt, metrics.jsonl, samples/.

Every write is atomic (``genforge.runtime.files.atomic_open``), so a
crash at any moment leaves either the old file or the new one, never half of one. Nothing here executes
code from a file: configs are JSON, weights safetensors, the trainer state ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from genforge.models import build_model, get_spec
from genforge.models.base import ConfigError, ImageConfig
from genforge.runtime.bundle import safetensors_metadata
from genforge.runtime.files import atomic_open, atomic_write_bytes

from .errors import CheckpointError

RUN_FORMAT = "genforge-run"
RUN_VERSION = 2  # 2: the family's training options moved from "train" to "objective"
READABLE_RUN_VERSIONS = (1, 2)
# Version 1 kept these in "train"; reading one moves them to "objective" (objectives.OBJECTIVE_OPTIONS).
V1_OBJECTIVE_KEYS = ("kl_warmup_steps", "iw_samples", "gan_k", "gan_loss")
STATE_FORMAT = "genforge-trainer-state"
STATE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
# The weights that scored best on the held-out split (the moving average where the run keeps one).
BEST_WEIGHTS_FILE = "model_best.safetensors"
WEIGHT_CHOICES = ("last", "ema", "best")
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {what} (not valid JSON: {e})") from None


# ---------------------------------------------------------------- weights


def digest(obj: Any) -> str:
    """sha256 of a (nested) state: keys, scalars and every tensor's dtype, shape and bytes, in a fixed order.

    Neither safetensors nor torch.load checks the bytes of a tensor (torch's zip records carry CRCs that it
    does not verify), so a flipped bit would load as a silently different weight; the digest, stored
    beside the state, is what refuses it."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"D")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"L")
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "genforge-weights", **(metadata or {}), "sha256": digest(state)}
    atomic_write_bytes(path, st_save(state, metadata=meta))


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load safetensors weights into ``model``; any mismatch is a CheckpointError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        state = st_load(raw)
        meta = safetensors_metadata(raw, path)  # a BundleError (a ValueError) on a malformed header
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing weights file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or foreign weights file (not safetensors: {e})") from None
    # Files written before the digest existed have none; any file that has one must match it.
    if "sha256" in meta and meta["sha256"] != digest(state):
        raise CheckpointError(f"{path}: corrupt weights file (its tensors do not match their recorded sha256)")
    load_state_checked(model, state, path)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape:
            shape = getattr(v, "shape", type(v).__name__)
            raise CheckpointError(f"{source}: tensor {k!r} has shape {shape}, the model expects {expected[k].shape}")
    model.load_state_dict(state)


# ---------------------------------------------------------------- run directory


@dataclass
class RunConfig:
    """What config.json holds: enough to rebuild the model and continue training."""

    model: str
    model_config: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]  # TrainConfig: what every family's training shares
    objective: dict[str, Any] = field(default_factory=dict)  # the family's own options (objective_for)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "model": self.model,
            "model_config": self.model_config,
            "data": self.data,
            "train": self.train,
            "objective": self.objective,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str | Path) -> RunConfig:
        if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{source}: not a genforge run config (format field is not {RUN_FORMAT!r})")
        if obj.get("version") not in READABLE_RUN_VERSIONS:
            raise CheckpointError(
                f"{source}: run format version {obj.get('version')!r} is not supported (this genforge reads "
                f"versions {', '.join(map(str, READABLE_RUN_VERSIONS))})"
            )
        try:
            train = dict(obj["train"])
            if obj["version"] == 1:
                objective = {k: train.pop(k) for k in V1_OBJECTIVE_KEYS if k in train}
            else:
                objective = dict(obj["objective"])
            return cls(obj["model"], dict(obj["model_config"]), dict(obj["data"]), train, objective)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: run config lacks a field ({e})") from None


def read_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory")
    return RunConfig.from_json(read_json(path, "run config"), path)


def model_from_config(run: RunConfig, source: str | Path) -> tuple[nn.Module, ImageConfig]:
    try:
        spec = get_spec(run.model)
        config = spec.config_cls.from_dict(run.model_config)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return build_model(run.model, config), config


def weights_file(run_dir: str | Path, weights: str) -> Path:
    """The file of a run's ``weights``: "last" (the latest step), "ema" (their moving average) or "best"
    (the evaluation that scored best on the held-out split)."""
    files = {"last": WEIGHTS_FILE, "ema": EMA_WEIGHTS_FILE, "best": BEST_WEIGHTS_FILE}
    if weights not in files:
        raise CheckpointError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
    path = Path(run_dir) / files[weights]
    if weights != "last" and not path.exists():
        why = "was not trained with --ema" if weights == "ema" else "has no held-out evaluation yet"
        raise CheckpointError(f"{run_dir}: no {files[weights]} (the run {why})")
    return path


def load_run(run_dir: str | Path, *, ema: bool = False, weights: str | None = None) -> tuple[nn.Module, RunConfig]:
    """Rebuild the trained model of a run directory from its config.json and weights (eval mode).
    ``weights``: "last", "ema" or "best" (weights_file); ``ema=True`` is ``weights="ema"``."""
    run = read_run_config(run_dir)
    model, _ = model_from_config(run, Path(run_dir) / CONFIG_FILE)
    load_weights(weights_file(run_dir, weights or ("ema" if ema else "last")), model)
    return model.eval(), run


def best_record(run_dir: str | Path) -> dict[str, str]:
    """What model_best.safetensors records of itself: step, epoch, metric, value (strings), weights."""
    path = Path(run_dir) / BEST_WEIGHTS_FILE
    try:
        return safetensors_metadata(path.read_bytes(), path)
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no {BEST_WEIGHTS_FILE} (the run has no held-out evaluation yet)") from None


# ---------------------------------------------------------------- trainer state


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    try:
        with atomic_open(path, "wb") as f:
            torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state, "sha256": digest(state)}, f)
    except RuntimeError as e:  # torch.save reports a failed write ("unexpected pos") as a RuntimeError
        raise CheckpointError(f"{path}: could not write the checkpoint ({str(e).splitlines()[0]}; is the disk "
                              "full?); the previous checkpoint is intact") from None
    except OSError as e:
        raise CheckpointError(f"{path}: could not write the checkpoint ({e.strerror}); the previous checkpoint is "
                              "intact") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state; ``weights_only=True`` so a pickle posing as a checkpoint cannot run code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing trainer state (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign bytes; all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or foreign trainer state ({first})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a genforge trainer state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: trainer state version {state.get('version')!r} is not supported")
    recorded = state.pop("sha256", None)
    body = {k: v for k, v in state.items() if k not in ("format", "version")}
    if recorded is not None and recorded != digest(body):
        raise CheckpointError(f"{path}: corrupt trainer state (its contents do not match their recorded sha256)")
    return state


# ---------------------------------------------------------------- metrics


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def truncate_metrics(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Drop the records written after the checkpoint a run resumes from (they will be written again)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if keep(rec):
            kept.append(json.dumps(rec, sort_keys=True))
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
