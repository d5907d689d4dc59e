"""Volumes in, label maps out: NRRD/NIfTI/MetaImage via SimpleITK; Slicer's ``.seg.nrrd``; NIfTI label maps.

``.seg.nrrd`` is Slicer's own segmentation file: a NRRD whose voxels are label values and whose header
(``SegmentN_*`` and ``Segmentation_*`` keys) names each segment, its colour, label value, layer and
terminology. Overlapping segments go to separate layers (a 4D NRRD whose first axis is the layer), the
way Slicer itself stores them. The file is written here directly, not through SimpleITK, because the
layer axis must be a NRRD "list" axis with no space direction.

Everything is written to a temporary file and renamed into place (see :mod:`medsam2.io.atomic`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from medsam2.errors import InvalidVolumeError
from medsam2.geometry import VolumeGeometry
from medsam2.io.atomic import atomic_output
from medsam2.io.integrity import check_nifti_complete
from medsam2.io.segments import Segment

PathLike = Union[str, os.PathLike[str]]


# --- reading -----------------------------------------------------------------------------------------


def read_volume(path: PathLike, channel: Optional[int] = None) -> tuple[np.ndarray, VolumeGeometry]:
    """``(array [k, j, i], geometry)`` from a NRRD, NIfTI or MetaImage file, or a DICOM series folder/file.

    A 2D image becomes a one-slice volume. Multi-component or 4D images (the Decathlon stores BraTS's four
    sequences as a 4D NIfTI) need ``channel``, the component or volume to take; without it they are
    refused (pass one channel).
    """
    p = Path(path)
    if not p.exists():
        raise InvalidVolumeError(f"volume {p} does not exist")
    if p.is_dir() or p.suffix.lower() in (".dcm", ".dicom", ".ima"):
        from medsam2.dicom.series import read_dicom_series

        series = read_dicom_series(p)
        return series.array, series.geometry
    check_nifti_complete(p)  # ITK reads a NIfTI that ends early without a word
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        detail = _itk_message(exc)
        raise InvalidVolumeError(f"cannot read volume {p}: {detail}") from exc
    components = image.GetNumberOfComponentsPerPixel()
    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise InvalidVolumeError(f"{p} is {dim}D; pass a 3D volume (or a 2D image), e.g. one time point")
    array = sitk.GetArrayFromImage(image)  # [(t,) k, j, i(, c)]
    channels = components if components > 1 else (array.shape[0] if dim == 4 else 1)
    if channels > 1 and channel is None:
        what = (
            f"{components} components per voxel (colour, vector or a Slicer segmentation)"
            if components > 1
            else f"{channels} volumes (4D)"
        )
        raise InvalidVolumeError(f"{p} has {what}; pass a single-channel greyscale volume or choose a channel")
    if channel is not None and not 0 <= channel < channels:
        raise InvalidVolumeError(f"{p.name} has {channels} channel(s); channel {channel} does not exist")
    if components > 1:
        array = array[..., channel]
    elif dim == 4:
        array = array[channel]
    d = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    spacing, origin = tuple(image.GetSpacing())[:3], tuple(image.GetOrigin())[:3]
    if dim == 2:
        direction = np.eye(3)
        direction[:2, :2] = d
        return array[None], VolumeGeometry(spacing + (1.0,), origin + (0.0,), tuple(direction.ravel()))
    return array, VolumeGeometry(spacing, origin, tuple(d[:3, :3].ravel()))


def _itk_message(exc: RuntimeError) -> str:
    # ITK errors are several lines of file/line/class noise; the last "Description:" or line is the cause.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


# --- NIfTI label maps --------------------------------------------------------------------------------


def labelmap_array(segments: Sequence[Segment], shape: tuple[int, ...], overlap: str = "error") -> np.ndarray:
    """One label per voxel: segment n (1-based, in order) gets value n.

    ``overlap="error"`` refuses overlapping segments (a label map cannot hold both); ``"later_wins"``
    lets a later segment overwrite an earlier one.
    """
    if overlap not in ("error", "later_wins"):
        raise InvalidVolumeError(f"overlap must be 'error' or 'later_wins', got {overlap!r}")
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    for n, seg in enumerate(segments, start=1):
        mask = binary_mask(seg, shape)
        if overlap == "error":
            clash = mask & (labels != 0)
            if clash.any():
                other = segments[int(labels[clash][0]) - 1].label
                raise InvalidVolumeError(
                    f"segments {other!r} and {seg.label!r} overlap in {int(clash.sum())} voxel(s); a label "
                    "map "
                    "holds one label per voxel: export .seg.nrrd or DICOM-SEG, or pass overlap='later_wins'"
                )
        labels[mask] = n
    return labels


def write_nifti_labelmap(
    path: PathLike, segments: Sequence[Segment], geometry: VolumeGeometry, overlap: str = "error"
) -> Path:
    """Write a NIfTI (``.nii`` / ``.nii.gz``) label map: segment n has value n. Returns the path."""
    target = Path(path)
    if not (target.name.endswith(".nii") or target.name.endswith(".nii.gz")):
        raise InvalidVolumeError(f"NIfTI label map path must end in .nii or .nii.gz, got {target.name}")
    if not segments:
        raise InvalidVolumeError("no segments to write")
    shape = np.asarray(segments[0].mask).shape
    image = sitk.GetImageFromArray(labelmap_array(segments, shape, overlap))
    _set_geometry(image, geometry)
    with atomic_output(target) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return target


def _set_geometry(image: sitk.Image, geometry: VolumeGeometry) -> None:
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)


def binary_mask(seg: Segment, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(seg.mask)
    if mask.shape != tuple(shape):
        raise InvalidVolumeError(f"mask of segment {seg.label!r} has shape {mask.shape}, expected {tuple(shape)}")
    if mask.dtype.kind == "f":
        if not np.all((mask == 0) | (mask == 1)):
            raise InvalidVolumeError(f"mask of segment {seg.label!r} is not binary; threshold it first")
    elif mask.dtype.kind not in "biu":
        raise InvalidVolumeError(f"mask of segment {seg.label!r} has unsupported dtype {mask.dtype}")
    return mask != 0


