"""Intensity settings: CT window presets, MRI percentile clipping, min-max, and their parsing.

This module does not import torch (the remote client and the Slicer panel use it without torch); the
torch work that applies these settings on the compute device is in preparation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medsam2.errors import InvalidVolumeError

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
        if self.mode == "window" and not (math.isfinite(self.width) and math.isfinite(self.level)):
            raise InvalidVolumeError(f"window width and level must be finite, got {self.width:g},{self.level:g}")
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



