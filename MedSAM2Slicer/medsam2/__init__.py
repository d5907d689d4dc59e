"""MedSAM2 propagation engine: SAM2 video propagation over the slices of a CT/MRI volume.

The engine never imports Slicer. It takes numpy arrays (indexed ``[k, j, i]``, as SimpleITK and
Slicer's ``arrayFromVolume`` return them) plus their geometry, and returns uint8 masks in the same
layout, so the Slicer module, the command line and the server all share it.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from medsam2.api import PropagationResult, Session, SlicePreview
from medsam2.errors import (
    DeviceUnavailableError,
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    MemoryBudgetError,
    ModelError,
    PropagationCancelled,
)
from medsam2.geometry import VolumeGeometry
from medsam2.intensity import IntensityPreparation, parse_intensity

if TYPE_CHECKING:
    from medsam2.io.volumes import read_volume
    from medsam2.models.registry import load_model
    from medsam2.session import SegmentationSession

# torch (and SimpleITK) are imported on first use, not on `import medsam2`: the remote client and the
# Slicer panel's first-use dependency check run where torch may not be installed yet.
_LAZY = {"SegmentationSession": "session", "load_model": "models.registry", "read_volume": "io.volumes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'medsam2' has no attribute {name!r}")


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
    "Session",
    "load_model",
    "read_volume",
    "PropagationResult",
    "SlicePreview",
]
