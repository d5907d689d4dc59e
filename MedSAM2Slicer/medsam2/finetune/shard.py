"""One global batch per optimizer step, shared out between the processes of a torchrun job.

Every process draws the same global batch (``batch * world_size`` clips, from the same seeded
generator) and trains on its own rows of it, so N processes of ``--batch B`` see exactly the clips
that one process of ``--batch N*B`` sees, and DistributedDataParallel's averaged gradient is that
process's gradient: the same losses, step by step (issue 17). The clips of the other rows are prepared
and dropped, which costs slice preparation only (no encoding, no forward pass).
"""

from __future__ import annotations

from dataclasses import replace

from medsam2.finetune.data import TrainBatch
from medsam2.finetune.sampler import ClipSampler


def take_rows(batch: TrainBatch, rank: int, world_size: int) -> TrainBatch:
    """Clips ``rank``, ``rank + world_size``, ... of ``batch`` (every frame of each)."""
    if world_size == 1:
        return batch
    total = batch.batch_size
    if total % world_size:
        raise ValueError(f"a global batch of {total} clips cannot be shared by {world_size} processes")
    rows = list(range(rank, total, world_size))
    frames = batch.num_frames
    images = batch.images.view(frames, total, *batch.images.shape[1:])[:, rows]
    return replace(
        batch,
        images=images.reshape(-1, *batch.images.shape[1:]),
        targets=batch.targets[:, rows],
        point_inputs={t: {k: v[rows] for k, v in p.items()} for t, p in batch.point_inputs.items()},
        mask_inputs={t: m[rows] for t, m in batch.mask_inputs.items()},
        keys=[batch.keys[t * total + b] for t in range(frames) for b in rows] if batch.keys else [],
    )


class ShardedSampler:
    """``next_batch()`` of a sampler drawing global batches, cut to this process's rows."""

    def __init__(self, sampler: ClipSampler, rank: int, world_size: int) -> None:
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size

    def next_batch(self) -> TrainBatch:
        return take_rows(self.sampler.next_batch(), self.rank, self.world_size)
