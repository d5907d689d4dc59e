"""Training cases held in host memory and the batches the trainer consumes.

Batches are built exactly as inference sees the data: slices cut along the session's axis with its
row flip (``SliceLayout``), intensities prepared by the session's ``SlicePreparer`` and stretched to
the model's square input. Which clips and prompts go into a batch is :mod:`medsam2.finetune.sampler`'s
job; which cases exist, :mod:`medsam2.datasets.training`'s.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medsam2.datasets.training import TrainingDataset
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import IntensityPreparation
from medsam2.preparation import SlicePreparer, intensity_bounds
from medsam2.volume import frames_to_device


# ------------------------------------------------------------------------------------------ batches
@dataclass
class PreparedCase:
    """A case in host memory in frame orientation: the raw slices (the volume's own dtype) with the
    session's clipping bounds, and one uint8 mask stack per structure."""

    case_id: str
    frames: torch.Tensor  # (num_slices, rows, cols)
    bounds: tuple[float, float]  # intensity clipping bounds of the whole volume
    masks: dict[str, torch.Tensor]  # structure -> (num_slices, rows, cols) uint8

    @property
    def nbytes(self) -> int:
        tensors = [self.frames, *self.masks.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class CaseStore:
    """Training cases held in host memory (most recently used first, within ``budget_bytes``; at least
    one), so a case is read and decompressed once rather than at every clip. Only the slices of a clip
    travel to the training device, where the session's own ``SlicePreparer`` prepares them with the
    whole volume's bounds: the model sees exactly what inference feeds it."""

    def __init__(
        self,
        dataset: TrainingDataset,
        layout_for: Callable[[VolumeGeometry], SliceLayout],
        intensity: IntensityPreparation,
        image_size: int,
        device: torch.device,
        budget_bytes: int = 8 << 30,
    ) -> None:
        self.dataset = dataset
        self.layout_for = layout_for
        self.intensity = intensity
        self.image_size = image_size
        self.device = device
        self.budget_bytes = max(0, int(budget_bytes))
        self._cases: OrderedDict[str, PreparedCase] = OrderedDict()
        self.loads = 0

    def get(self, case_id: str) -> PreparedCase:
        if case_id in self._cases:
            self._cases.move_to_end(case_id)
            return self._cases[case_id]
        case = self.dataset.load(self.dataset.record(case_id))
        self.loads += 1
        layout = self.layout_for(case.geometry)
        cpu = torch.device("cpu")
        frames = frames_to_device(case.image, layout, cpu)
        prepared = PreparedCase(
            case_id,
            frames,
            intensity_bounds(frames, self.intensity),
            {name: frames_to_device(mask.astype(np.uint8), layout, cpu) for name, mask in case.structures.items()},
        )
        self._cases[case_id] = prepared
        while len(self._cases) > 1 and sum(c.nbytes for c in self._cases.values()) > self.budget_bytes:
            self._cases.popitem(last=False)
        return prepared

    def images(self, case: PreparedCase, slices: Sequence[int]) -> torch.Tensor:
        """(T, 3, S, S) model inputs for the slices, on the training device."""
        frames = case.frames[list(slices)].to(self.device, non_blocking=True)
        preparer = SlicePreparer(frames, self.intensity, self.image_size, bounds=case.bounds)
        return preparer(list(range(len(slices))))

    def masks(self, case: PreparedCase, name: str, slices: Sequence[int]) -> torch.Tensor:
        """(T, rows, cols) uint8 masks of a structure on the training device."""
        return case.masks[name][list(slices)].to(self.device, non_blocking=True)


@dataclass
class TrainBatch:
    """B clips of T slices. Images are frame-major: row ``t * B + b`` is slice t of clip b."""

    images: torch.Tensor  # (T * B, 3, S, S)
    targets: torch.Tensor  # (T, B, 1, S, S) in {0, 1}
    prompt_frames: tuple[int, ...]
    prompt_kind: str
    point_inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # SAM 2's point dicts
    mask_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (B, 1, S, S)
    keys: list[tuple[str, int]] = field(default_factory=list)  # (case, slice) per image row

    @property
    def num_frames(self) -> int:
        return int(self.targets.size(0))

    @property
    def batch_size(self) -> int:
        return int(self.targets.size(1))


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, 1, S, S) float {0, 1}, as SAM2VideoPredictor resizes a mask prompt."""
    m = masks.float()[:, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (m >= 0.5).float()


