"""The trainer: AdamW, a warm-up + cosine schedule, gradient clipping, mixed precision on CUDA, evaluation
and a sample grid every epoch, metrics as JSON lines, atomic checkpoints and exact resume.

It knows a model only through an Objective (loss, evaluate, sample). Exact resume: the data order of
epoch e is a permutation seeded by (seed, e), dynamic binarization is seeded by (seed, step), and the
checkpoint holds the weights, the optimizer state, the torch RNG state and the step; a resumed run on the
CPU therefore repeats the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genforge.runtime.files import make_grid, save_grid, to_display
from genforge.runtime.progress import Progress, chunks

from . import checkpoint as ckpt
from .data import ImageData, dynamic_binarize
from .distributed import DistInfo, barrier
from .errors import TrainingError
from .objectives import Objective

SCHEDULES = ("cosine", "constant")


class _LossModule(nn.Module):
    """The objective's loss as a module's forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.model, x, labels)


def _tensorboard(log_dir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


@dataclass
class TrainConfig:
    epochs: int = 30
    steps: int = 0  # total optimizer steps; 0: epochs x steps per epoch
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0: off
    seed: int = 0
    amp: bool = True  # bfloat16 autocast on CUDA
    cpu_bf16: bool = False  # bfloat16 autocast on the CPU too, where it has native bf16 (AVX512-BF16 / AMX)
    compile: bool = False  # torch.compile the training loss (the default step; the GAN's own step stays eager)
    eval_batch_size: int = 256
    eval_limit: int = 0  # images of the held-out split scored per epoch; 0: all
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of each epoch only
    n_samples: int = 64  # images in each epoch's sample grid; 0: none
    log_every: int = 10
    dynamic_binarize: bool = False
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); used to evaluate
    patience: int = 0  # stop after this many held-out evaluations without a new best (0: never stop early)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.batch_size < 1 or self.epochs < 1 or self.steps < 0 or self.lr <= 0 or self.patience < 0:
            raise ValueError("need batch_size >= 1, epochs >= 1, steps >= 0, lr > 0 and patience >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's AVX512-BF16 or AMX kernels); elsewhere bf16
    autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """Torch's intra-op thread count for training on the CPU, and why (printed at the start of a run).

    Torch starts one thread per core, and every parallel operation ends in a barrier where the threads
    spin until the last one arrives. When other CPU-bound jobs share the cores, the last thread is often
    descheduled, so each of a training step's hundreds of small operations waits out a scheduler time
    slice: measured on 2 cores with 2 other CPU-bound jobs, 3 epochs of the default PixelCNN took 130 s
    with 2 threads and 7.0 s with 1 (4.0 s and 4.3 s on the idle machine). So the default uses only the
    cores no other job keeps busy (at least one). ``requested`` > 0 overrides it.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if requested > 0:
        return requested, f"{requested} (--threads; {cores} cores)"
    if os.environ.get("OMP_NUM_THREADS"):
        n = int(torch.get_num_threads())
        return n, f"{n} (OMP_NUM_THREADS; {cores} cores)"
    load = busy_cores()
    n = max(1, min(cores, cores - round(load)))
    if n < cores:
        return n, f"{n} of {cores} cores ({load:.0f} busy with other jobs; --threads N to override)"
    return n, f"{n} ({cores} cores, all idle)"


def busy_cores(samples: int = 5, interval: float = 0.02) -> float:
    """Cores that other processes keep busy now: the fewest runnable processes (less this one) over a few
    readings of /proc/loadavg, so a passing spike does not count. The load average would lag a job started
    or ended a moment ago by a minute or more; it is only the fallback where /proc is missing."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return float(max(0, min(counts)))
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_data: ImageData,
        valid_data: ImageData | None,
        run_dir: str | Path,
        config: TrainConfig,
        *,
        device: torch.device | None = None,
        progress: bool = True,
        dist_info: DistInfo | None = None,
    ) -> None:
        config.validate()
        self.dist = dist_info or DistInfo()
        if self.dist.enabled and config.batch_size % self.dist.world:
            raise TrainingError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
                                f"{self.dist.world} processes")
        self.model = model
        self.objective = objective
        self.train_data = train_data
        self.valid_data = valid_data
        self.run_dir = Path(run_dir)
        self.cfg = config
        self.device = device or torch.device("cpu")
        self.show_progress = progress and self.dist.is_main
        self.model.to(self.device)
        # None when the objective owns its optimizers (the GAN's two players).
        self.optimizer = objective.make_optimizer(model, config.lr, config.weight_decay)
        self.batches_per_step = objective.batches_per_step
        n = len(train_data)
        self.batches_per_epoch = max(1, n // config.batch_size)
        self.steps_per_epoch = max(1, self.batches_per_epoch // self.batches_per_step)
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.step = 0
        self.ddp: nn.Module | None = None
        if self.dist.enabled:
            if not objective.supports_ddp:
                raise TrainingError(f"distributed training of {type(objective).__name__} is not supported")
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(_LossModule(model, objective), device_ids=ids)
        # The loss as the default step runs it: compiled once per run (its shapes never change: every batch is
        # full), eager otherwise. Held-out evaluation stays eager (its last batch is smaller, no gradients).
        self.train_loss = torch.compile(objective.loss) if config.compile else objective.loss
        self.tb = _tensorboard(self.run_dir / "tb") if self.dist.is_main else None
        # Called once, after the first checkpoint is written (gen-train --overwrite publishes the new run then).
        self.on_first_checkpoint: Any = None
        # The best held-out evaluation so far: step, epoch, metric, value (model_best.safetensors holds its weights).
        self.best: dict[str, Any] = {}
        self.ema: dict[str, torch.Tensor] | None = None
        if config.ema:
            self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # ------------------------------------------------------------ schedule and data order

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        span = max(1, self.total_steps - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    def batch_indices(self, counter: int) -> np.ndarray:
        """Indices of the ``counter``-th batch of the run (one per step, or k per step for a GAN)."""
        epoch, within = divmod(counter, self.batches_per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_data))
        bs = min(self.cfg.batch_size, len(self.train_data))
        return perm[within * bs : (within + 1) * bs]

    def batch(self, counter: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.batch_indices(counter)
        if self.dist.enabled:  # this rank's equal slice of the global batch
            per = len(idx) // self.dist.world
            idx = idx[self.dist.rank * per : (self.dist.rank + 1) * per]
        images = self.train_data.images[idx]  # (B, H, W, C) uint8
        if self.cfg.dynamic_binarize:
            rng = np.random.default_rng([self.cfg.seed, counter, 1])
            images = dynamic_binarize(images, self.train_data.levels, rng)
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).long().to(self.device)
        labels = self.train_data.labels
        y = None if labels is None else torch.from_numpy(labels[idx]).to(self.device)
        return x, y

    # ------------------------------------------------------------ checkpoints

    @property
    def metrics_path(self) -> Path:  # a property: the run directory moves when --overwrite publishes it
        return self.run_dir / ckpt.METRICS_FILE

    @property
    def state_path(self) -> Path:
        return self.run_dir / ckpt.STATE_FILE

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:  # rank 0 writes; the others wait so no rank runs ahead of a checkpoint
            barrier(self.dist)
            return
        # Weights first: each file is complete on its own, and resume reads only the trainer state.
        ckpt.save_weights(self.run_dir / ckpt.WEIGHTS_FILE, self.model, {"step": str(self.step)})
        if self.ema is not None:
            with self.ema_weights():
                ckpt.save_weights(self.run_dir / ckpt.EMA_WEIGHTS_FILE, self.model, {"step": str(self.step)})
        ckpt.save_state(
            self.state_path,
            {
                "step": self.step,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                "objective": self.objective.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "ema": self.ema or {},
                "best": dict(self.best),
            },
        )
        if self.on_first_checkpoint is not None:
            publish, self.on_first_checkpoint = self.on_first_checkpoint, None
            publish(self)
        barrier(self.dist)

    def checkpoint_status(self) -> str:
        """What a stopped run leaves behind, truthfully: an intact checkpoint, or none yet."""
        if self.state_path.exists():
            step = ckpt.load_state(self.state_path)["step"]
            return f"the last checkpoint (step {step}) in {self.run_dir} is intact; --resume continues from it"
        return f"no checkpoint had been written yet in {self.run_dir}"

    def resume(self) -> None:
        # A kill during an atomic write leaves its temp file behind: never read, safe to remove.
        for stale in self.run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not self.state_path.exists():
            # Killed before the first checkpoint: the run starts again from step 0, which is where it was.
            ckpt.truncate_metrics(self.run_dir / ckpt.METRICS_FILE, lambda r: False)
            return
        state = ckpt.load_state(self.state_path)
        try:
            ckpt.load_state_checked(self.model, state["model"], self.state_path)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["objective"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.step = int(state["step"])
            if self.ema is not None:
                self.ema = {k: v.to(self.device) for k, v in state["ema"].items()} or self.ema
            self.best = dict(state.get("best") or {})  # states written before best weights were kept have none
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{self.state_path}: trainer state does not match this run ({e})") from None
        if self.dist.is_main:
            ckpt.truncate_metrics(self.run_dir / ckpt.METRICS_FILE, lambda r: int(r.get("step", 0)) <= self.step)

    # ------------------------------------------------------------ evaluation and samples

    @contextlib.contextmanager
    def ema_weights(self) -> Any:
        """Swap the moving-average weights in (evaluation, samples, the EMA checkpoint), then back."""
        if self.ema is None:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema)
        try:
            yield
        finally:
            self.model.load_state_dict(live)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.ema[k].copy_(v)

    @torch.no_grad()
    def evaluate(self, data: ImageData, limit: int = 0) -> dict[str, float]:
        whole = self.objective.evaluate_all(self.model, data, limit)  # e.g. sample quality
        if whole is not None:
            return whole
        self.model.eval()
        n = len(data) if not limit else min(limit, len(data))
        totals: dict[str, float] = {}
        for a, b in chunks(n, self.cfg.eval_batch_size):
            x = torch.from_numpy(np.ascontiguousarray(data.images[a:b].transpose(0, 3, 1, 2))).long()
            y = None if data.labels is None else torch.from_numpy(data.labels[a:b]).to(self.device)
            with self.autocast():
                scores = self.objective.evaluate(self.model, x.to(self.device), y, first=a)
            for k, v in scores.items():
                totals[k] = totals.get(k, 0.0) + v
        self.model.train()
        return self.objective.summarize(totals, n)

    def write_samples(self, epoch: int) -> Path | None:
        n = self.cfg.n_samples
        if n <= 0:
            return None
        classes = self.model.config.num_classes
        labels = np.arange(n, dtype=np.int64) % classes if classes else None
        self.model.eval()
        images = self.objective.sample(self.model, n, self.cfg.seed, labels)
        self.model.train()
        path = self.run_dir / "samples" / f"epoch_{epoch:03d}.png"
        save_grid(path, images, levels=self.train_data.levels)
        if self.tb is not None:
            grid = make_grid(to_display(images, self.train_data.levels))
            self.tb.add_image("samples", grid, self.step, dataformats="HWC")
            self.tb.flush()
        return path

    def log_scalars(self, prefix: str, values: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, self.step)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        # The weights stay float32 (autocast casts per operation); the heads compute log-probabilities and
        # the likelihood's sums in float32 (models/base.py grid_log_probs).
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cfg.cpu_bf16 and self.device.type == "cpu" and cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train until ``total_steps``; returns the last held-out metrics (empty when there is no split)."""
        self.model.train()
        last_eval: dict[str, float] = {}
        t0 = time.monotonic()
        with Progress(self.total_steps, "train", enabled=self.show_progress, initial=self.step) as bar:
            while self.step < self.total_steps and not self.stopped_early():
                step = self.step
                lr = self.lr_at(step)
                try:
                    self.objective.set_step(step)
                    loss, batch_metrics = self.objective.train_step(self, step, lr)
                except TrainingError as e:
                    raise TrainingError(f"{e}; {self.checkpoint_status()}") from None
                self.update_ema()
                self.step = step + 1
                record = {"step": self.step, "loss": float(loss.detach()), "lr": lr, **batch_metrics}
                if self.dist.is_main and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
                    ckpt.append_jsonl(self.metrics_path, {**record, "time": round(time.monotonic() - t0, 3)})
                    self.log_scalars("train", record)
                bar.update(1, loss=record["loss"])
                epoch_end = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if epoch_end:
                    last_eval = self.end_epoch(self.metrics_path)
                if epoch_end or (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0):
                    self.save_checkpoint()
                if epoch_end and self.stopped_early() and self.dist.is_main:
                    ckpt.append_jsonl(self.metrics_path, {"step": self.step, "early_stop": True,
                                                          "best_step": self.best["step"]})
                    if self.show_progress:
                        print(f"early stop at step {self.step}: no better {self.best['metric']} for "
                              f"{self.cfg.patience} evaluations (best {self.best['value']:.4f} at step "
                              f"{self.best['step']})", flush=True)
        return last_eval

    def stopped_early(self) -> bool:
        """``patience`` evaluations (epochs) have passed since the best one. Derived from the step and the best
        step alone, so a resumed run that had stopped stops again at once."""
        if not self.cfg.patience or not self.best:
            return False
        return (self.step - int(self.best["step"])) >= self.cfg.patience * self.steps_per_epoch

    def optimization_step(self, step: int, lr: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The default train step (Objective.train_step): the objective's loss on this step's batch,
        backward, clipping, one step of the trainer's optimizer."""
        if self.optimizer is None:
            raise TrainingError(f"{type(self.objective).__name__} made no optimizer but uses the default step")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batch(step)
        with self.autocast():
            if self.ddp is not None:  # through DDP's forward, so its backward hooks average the gradients
                loss, batch_metrics = self.ddp(x, y)
            else:
                loss, batch_metrics = self.train_loss(self.model, x, y)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {float(loss.detach())} at step {step} (lower --lr or check the data)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ddp is not None:  # log the global batch's loss, as a single process would
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss = loss / self.dist.world
            batch_metrics = {k: v for k, v in batch_metrics.items() if k != "nats_per_image"}
        return loss, batch_metrics

    def keep_if_best(self, scores: dict[str, float], epoch: int) -> bool:
        """Write the weights just evaluated to model_best.safetensors when they beat every earlier evaluation
        on the objective's selection metric (lower is better). Called inside ``ema_weights``."""
        metric = self.objective.selection_metric
        value = scores.get(metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best and value >= float(self.best["value"]):
            return False
        self.best = {"step": self.step, "epoch": epoch, "metric": metric, "value": float(value)}
        weights = "ema" if self.ema is not None else "last"
        ckpt.save_weights(self.run_dir / ckpt.BEST_WEIGHTS_FILE, self.model,
                          {k: str(v) for k, v in {**self.best, "weights": weights}.items()})
        return True

    def end_epoch(self, metrics_path: Path) -> dict[str, float]:
        epoch = math.ceil(self.step / self.steps_per_epoch)
        out: dict[str, float] = {}
        if not self.dist.is_main:  # rank 0 evaluates and draws; the others wait at the checkpoint
            return out
        with self.ema_weights():
            if self.valid_data is not None:
                out = self.evaluate(self.valid_data, self.cfg.eval_limit)
                best = self.keep_if_best(out, epoch)
                ckpt.append_jsonl(metrics_path, {"step": self.step, "epoch": epoch, "split": "valid", **out,
                                                 **({"best": True} if best else {})})
                self.log_scalars("valid", out)
            grid = self.write_samples(epoch)
        if self.show_progress:
            shown = " ".join(f"{k}={v:.4f}" for k, v in out.items())
            print(f"epoch {epoch} step {self.step}: {shown} samples={grid}".rstrip(), flush=True)
        return out
