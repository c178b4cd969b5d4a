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

from .errors import UsageError


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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} in the environment is not an integer (a torchrun launch sets it; "
                         f"unset it to train in one process)") from None


def from_env() -> DistInfo:
    """The process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun). Variables left
    from another launch (an exported WORLD_SIZE, say) are a UsageError naming them, not a traceback or a wait."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"the environment says RANK={rank} of WORLD_SIZE={world}, which is no process of a "
                         "launch (left over from another? unset WORLD_SIZE and RANK to train in one process)")
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise UsageError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: a stale torchrun "
                             "environment? unset WORLD_SIZE to train in one process, or launch with torchrun")
    return DistInfo(rank, world, local)


# How long a process waits for its peers to join; GENFORGE_DIST_TIMEOUT (seconds) overrides it.
JOIN_TIMEOUT_S = 300


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    import datetime
    import sys

    info = from_env()
    if info.enabled and not dist.is_initialized():
        timeout = float(os.environ.get("GENFORGE_DIST_TIMEOUT") or JOIN_TIMEOUT_S)
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if not os.environ.get("TORCHELASTIC_RUN_ID"):
            # Not launched by torchrun, which starts the peers itself: say what is awaited, since with a stale
            # WORLD_SIZE and MASTER_* left in the environment the wait would otherwise be silent.
            print(f"genforge: rank {info.rank} of {info.world} joining the process group at {where} "
                  f"(waiting up to {timeout:g} s for the others)", file=sys.stderr, flush=True)
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # DistStoreError (a timeout) is a RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"rank {info.rank} of {info.world} could not join the process group at {where} "
                             f"within {timeout:g} s ({first}); is every process launched (torchrun), or is "
                             "WORLD_SIZE left over from another launch?") from None
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
