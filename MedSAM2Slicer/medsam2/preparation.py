"""Applying intensity settings in torch, on the compute device, slice batch by slice batch.

Straight from the volume's own dtype: no JPEG round trip (the reference pipeline's lossy step) and no
float64 copy of the volume. Only the two clipping bounds are computed on the whole volume, once.

The slices the model sees are those of the published pipelines (MedSAM2's inference scripts, Meta's
frame loader): intensities cut to 8-bit grey levels, then stretched to the model's square input with
PIL's bicubic resize (resampling.resize_grey_levels), then normalised.
"""

from __future__ import annotations

from typing import Optional

import torch

from medsam2.errors import InvalidVolumeError
from medsam2.intensity import IMAGENET_MEAN, IMAGENET_STD, IntensityPreparation
from medsam2.resampling import resize_grey_levels

# torch.kthvalue on tens of millions of voxels is slow on a CPU; percentiles of a strided subsample
# of this many voxels differ from the exact ones by far less than one grey level.
_PERCENTILE_SAMPLE = 1 << 24


def _percentile(values: torch.Tensor, q: float) -> float:
    n = values.numel()
    k = max(1, min(n, int(round(q / 100.0 * (n - 1))) + 1))
    return float(torch.kthvalue(values, k).values)


def intensity_bounds(volume: torch.Tensor, prep: IntensityPreparation) -> tuple[float, float]:
    """The [lower, upper] clipping bounds for the whole volume (computed once per session)."""
    if prep.mode == "window":
        return prep.level - prep.width / 2.0, prep.level + prep.width / 2.0
    flat = volume.reshape(-1)
    if prep.mode == "minmax":
        return float(flat.min()), float(flat.max())
    if flat.numel() > _PERCENTILE_SAMPLE:
        flat = flat[:: (flat.numel() + _PERCENTILE_SAMPLE - 1) // _PERCENTILE_SAMPLE]
    flat = flat.float()
    if prep.nonzero_only:
        flat = flat[flat != 0]
        if flat.numel() == 0:
            raise InvalidVolumeError("every voxel is zero; nothing to segment")
    lower = _percentile(flat, prep.lower_percentile)
    upper = _percentile(flat, prep.upper_percentile)
    if upper <= lower:
        raise InvalidVolumeError(
            f"the {prep.lower_percentile:g}th and {prep.upper_percentile:g}th percentiles are equal "
            f"({lower:g}); use a window or min-max instead"
        )
    return lower, upper


class SlicePreparer:
    """Turns slices of a device-resident volume into model input batches ``(B, 3, S, S)``."""

    def __init__(
        self,
        frames: torch.Tensor,
        prep: IntensityPreparation,
        image_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        bounds: Optional[tuple[float, float]] = None,
        eight_bit: bool = True,
    ) -> None:
        # frames: (num_slices, rows, cols) in the volume's dtype, already in frame orientation.
        self.frames = frames
        self.prep = prep
        self.image_size = image_size
        # 8-bit by default: it is what the published models were trained on and what their reference
        # pipelines give them; without it the masks differ from the reference's in ~1e-3 of the voxels
        # (Testing/Python/test_parity.py's CT case), with it in 0 or 1 voxels.
        self.eight_bit = eight_bit
        self.lower, self.upper = bounds if bounds is not None else intensity_bounds(frames, prep)
        if not self.upper > self.lower:
            raise InvalidVolumeError(f"volume has constant intensity {self.lower:g}; nothing to segment")
        device = frames.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]

    def unit_intensity(self, indices: list[int]) -> torch.Tensor:
        """(B, rows, cols) float32 in [0, 1] at the volume's own resolution."""
        raw = self.frames[indices].float()
        scaled = (raw.clamp(self.lower, self.upper) - self.lower) / (self.upper - self.lower)
        if self.prep.mode == "percentile" and self.prep.nonzero_only:
            # MedSAM2 keeps background (zero) voxels black after rescaling.
            scaled = torch.where(raw == 0, torch.zeros_like(scaled), scaled)
        return scaled

    def grey_levels(self, indices: list[int]) -> torch.Tensor:
        """(B, rows, cols) float32 grey levels in [0, 255], whole numbers when ``eight_bit``."""
        levels = self.unit_intensity(indices) * 255.0
        if self.eight_bit:
            # MedSAM2 casts its rescaled slices with np.uint8, which truncates; the tolerance keeps a
            # value that float32 puts a hair below a whole level (255 * 1.0 as 254.99998) on it.
            levels = torch.floor(levels + 1e-3)
        return levels

    def __call__(self, indices: list[int]) -> torch.Tensor:
        img = self.grey_levels(indices)[:, None]
        if img.shape[-2:] != (self.image_size, self.image_size):
            # SAM2 takes a square input: the slice is stretched to it, as the reference's frame
            # loader does, and the output masks are stretched back.
            img = resize_grey_levels(img, self.image_size, quantize=self.eight_bit)
        img = (img / 255.0).expand(-1, 3, -1, -1)
        return (img - self.mean) / self.std
