"""Validation of input volumes and their transfer to the compute device in frame order."""

from __future__ import annotations

import numpy as np
import torch

from medsam2.errors import InvalidVolumeError
from medsam2.geometry import SliceLayout

# numpy dtypes torch lacks (or handles poorly) and the narrowest torch dtype that holds them exactly
# (float64 is the exception: float32 holds any real image intensity to far better than a grey level).
_DTYPE_FOR_DEVICE = {
    np.dtype(np.bool_): np.uint8,
    np.dtype(np.uint16): np.int32,
    np.dtype(np.uint32): np.int64,
    np.dtype(np.float16): np.float32,
    np.dtype(np.float64): np.float32,
}


def as_3d(volume: np.ndarray) -> np.ndarray:
    """Check shape and values; a 2D image becomes a one-slice volume (2D image mode)."""
    if not isinstance(volume, np.ndarray):
        volume = np.asarray(volume)
    if volume.dtype.kind not in "biuf":
        raise InvalidVolumeError(f"volume dtype {volume.dtype} is not numeric")
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3:
        raise InvalidVolumeError(
            f"volume must be 3D (or a 2D image), got {volume.ndim}D with shape {volume.shape}; "
            "pass one channel or time point"
        )
    if 0 in volume.shape:
        raise InvalidVolumeError(f"volume has a zero-size axis: shape {volume.shape}")
    if volume.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        if bad:
            raise InvalidVolumeError(
                f"volume has {bad} NaN or infinite voxel(s); replace them (e.g. with the background value) first"
            )
    return volume


def device_bytes(volume: np.ndarray) -> int:
    dtype = np.dtype(_DTYPE_FOR_DEVICE.get(volume.dtype, volume.dtype))
    return int(volume.size) * dtype.itemsize


def frames_to_device(volume: np.ndarray, layout: SliceLayout, device: torch.device) -> torch.Tensor:
    """(num_slices, rows, cols) tensor on ``device`` in the volume's own dtype where torch has it."""
    frames = np.moveaxis(volume, layout.array_axis, 0)
    if layout.transpose:
        frames = frames.transpose(0, 2, 1)
    if layout.flip_rows:
        frames = frames[:, ::-1]
    if layout.flip_cols:
        frames = frames[:, :, ::-1]
    target = _DTYPE_FOR_DEVICE.get(volume.dtype)
    frames = np.ascontiguousarray(frames, dtype=target if target is not None else volume.dtype)
    return torch.from_numpy(frames).to(device)
