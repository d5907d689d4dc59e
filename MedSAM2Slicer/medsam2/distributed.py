"""Where this process stands among ``torchrun``'s processes, and the one barrier the jobs need.

Evaluation, fine-tuning and batch segmentation read RANK / WORLD_SIZE / LOCAL_RANK the same way; a
process not launched by torchrun is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from medsam2.errors import MedSAM2Error


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by torchrun (a process group can be formed)


def rank_info() -> RankInfo:
    """This process's place among torchrun's processes (rank 0 of 1 when not launched by it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MedSAM2Error(
            "RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise MedSAM2Error(f"rank {rank} is outside a world of {world} processes")
    return RankInfo(rank, world, local, world > 1 and "MASTER_ADDR" in os.environ)


def barrier(info: RankInfo, timeout_s: float) -> None:
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        # gloo: the ranks exchange nothing but "done", and gloo works with or without GPUs.
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        created = True
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
