"""Data-parallel training and sampling across processes: PyTorch DDP launched by ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m genforge.cli train --batch-size 64 ...       # 2 processes
    torchrun --nproc_per_node 8 -m genforge.cli train ...                                     # 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m genforge.cli train ...                                     # 2 nodes x 8 GPUs

``--batch-size`` is the global batch: each of the W processes takes an equal, disjoint slice of the same
batch a single process would take, so the averaged gradient is the single-process gradient (up to the
order of float additions). Backend: NCCL when the processes use CUDA devices, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """The process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    info = from_env()
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info


def shard(n: int, info: DistInfo) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items."""
    per, extra = divmod(n, info.world)
    start = info.rank * per + min(info.rank, extra)
    return start, start + per + (1 if info.rank < extra else 0)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def gather_to_main(obj: object, info: DistInfo) -> list[object] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [obj]
    out: list[object] | None = [None] * info.world if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
