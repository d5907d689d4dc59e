"""MedSAM2 propagation engine: SAM2 video propagation over the slices of a CT/MRI volume.

The engine never imports Slicer. It takes numpy arrays (indexed ``[k, j, i]``, as SimpleITK and
Slicer's ``arrayFromVolume`` return them) plus their geometry, and returns uint8 masks in the same
layout, so the Slicer module, the command line and the server all share it.
"""

__version__ = "0.1.0"

from .errors import (
    DeviceUnavailableError,
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    MemoryBudgetError,
    ModelError,
    PropagationCancelled,
)
from .geometry import VolumeGeometry
from .intensity import IntensityPreparation, parse_intensity
from .session import PropagationResult, SegmentationSession

__all__ = [
    "__version__",
    "DeviceUnavailableError",
    "InvalidPromptError",
    "InvalidVolumeError",
    "MedSAM2Error",
    "MemoryBudgetError",
    "ModelError",
    "PropagationCancelled",
    "VolumeGeometry",
    "IntensityPreparation",
    "parse_intensity",
    "SegmentationSession",
    "PropagationResult",
]
