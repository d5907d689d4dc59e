"""Intensity preparation: CT windows, MRI percentile clipping, and the model's input normalisation.

Everything runs in torch on the compute device, slice batch by slice batch, straight from the
volume's own dtype: no JPEG round trip (the reference pipeline's 8-bit lossy step) and no float64
copy of the volume. Only the two clipping bounds are computed on the whole volume, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InvalidVolumeError

# (width, level) in Hounsfield units. Abdomen, lung, brain and mediastinum are the presets of
# bowang-lab MedSAM2's Slicer plugin (the windows its CT models were trained with).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 50.0),
    "abdomen": (400.0, 40.0),
    "mediastinum": (350.0, 50.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.kthvalue on tens of millions of voxels is slow on a CPU; percentiles of a strided subsample
# of this many voxels differ from the exact ones by far less than one grey level.
_PERCENTILE_SAMPLE = 1 << 24


@dataclass(frozen=True)
class IntensityPreparation:
    """How voxel values become [0, 1] image intensities before the model's normalisation.

    mode:
      ``window``     clip to [level - width/2, level + width/2] (CT, Hounsfield units)
      ``percentile`` clip to the [lower, upper] percentiles (of non-zero voxels when
                     ``nonzero_only``), keeping zero voxels at zero (MedSAM2's MRI recipe)
      ``minmax``     the volume's own minimum and maximum
    """

    mode: str = "minmax"
    width: float = 0.0
    level: float = 0.0
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    nonzero_only: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("window", "percentile", "minmax"):
            raise InvalidVolumeError(f"unknown intensity mode {self.mode!r}; use window, percentile or minmax")
        if self.mode == "window" and not self.width > 0:
            raise InvalidVolumeError(f"window width must be positive, got {self.width}")
        if self.mode == "percentile" and not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise InvalidVolumeError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )

    @classmethod
    def window_preset(cls, name: str) -> IntensityPreparation:
        key = name.lower().replace("-", "_").replace(" ", "_")
        if key not in WINDOW_PRESETS:
            raise InvalidVolumeError(f"unknown window preset {name!r}; presets: {', '.join(WINDOW_PRESETS)}")
        width, level = WINDOW_PRESETS[key]
        return cls(mode="window", width=width, level=level)

    @classmethod
    def window(cls, width: float, level: float) -> IntensityPreparation:
        return cls(mode="window", width=float(width), level=float(level))

    @classmethod
    def mri(cls, lower: float = 0.5, upper: float = 99.5) -> IntensityPreparation:
        return cls(mode="percentile", lower_percentile=lower, upper_percentile=upper, nonzero_only=True)

    def describe(self) -> str:
        if self.mode == "window":
            return f"window W={self.width:g} L={self.level:g}"
        if self.mode == "percentile":
            return f"percentile clip {self.lower_percentile:g}-{self.upper_percentile:g}"
        return "min-max"


def parse_intensity(text: str) -> IntensityPreparation:
    """Parse a preset name, ``"W,L"``, ``"mri"``/``"percentile[:lo,hi]"`` or ``"minmax"``."""
    value = text.strip().lower()
    if value in ("minmax", "min-max", "auto"):
        return IntensityPreparation()
    if value in ("mri", "mr", "percentile"):
        return IntensityPreparation.mri()
    if value.startswith("percentile:"):
        try:
            lo, hi = (float(v) for v in value.split(":", 1)[1].split(","))
        except ValueError:
            raise InvalidVolumeError(f"bad percentile clip {text!r}; expected percentile:LOW,HIGH") from None
        return IntensityPreparation.mri(lo, hi)
    if "," in value:
        try:
            width, level = (float(v) for v in value.split(","))
        except ValueError:
            raise InvalidVolumeError(f"bad window {text!r}; expected WIDTH,LEVEL such as 400,40") from None
        return IntensityPreparation.window(width, level)
    return IntensityPreparation.window_preset(value)


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
    ) -> None:
        # frames: (num_slices, rows, cols) in the volume's dtype, already in frame orientation.
        self.frames = frames
        self.prep = prep
        self.image_size = image_size
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

    def __call__(self, indices: list[int]) -> torch.Tensor:
        img = self.unit_intensity(indices)[:, None]
        if img.shape[-2:] != (self.image_size, self.image_size):
            # SAM2 takes a square input: the slice is stretched to it, as the reference's frame
            # loader does, and the output masks are stretched back. Antialiasing matters when a
            # 512 px slice goes into a smaller model.
            img = F.interpolate(
                img, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        img = img.expand(-1, 3, -1, -1)
        return (img - self.mean) / self.std
