"""genforge.train: data sets, objectives, the trainer, checkpoints and resume."""

from .checkpoint import CheckpointError, load_run, read_run_config
from .data import DATASETS, DataError, ImageData, load_dataset
from .run import DataSpec, RunResult, UsageError, train_run
from .trainer import TrainConfig, Trainer, TrainingError

__all__ = [
    "DATASETS",
    "CheckpointError",
    "DataError",
    "DataSpec",
    "ImageData",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "UsageError",
    "load_dataset",
    "load_run",
    "read_run_config",
    "train_run",
]
