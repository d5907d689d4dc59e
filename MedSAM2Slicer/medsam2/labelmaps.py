"""Volumes in, label maps out: NRRD/NIfTI/MetaImage via SimpleITK; Slicer's ``.seg.nrrd``; NIfTI label maps.

``.seg.nrrd`` is Slicer's own segmentation file: a NRRD whose voxels are label values and whose header
(``SegmentN_*`` and ``Segmentation_*`` keys) names each segment, its colour, label value, layer and
terminology. Overlapping segments go to separate layers (a 4D NRRD whose first axis is the layer), the
way Slicer itself stores them. The file is written here directly, not through SimpleITK, because the
layer axis must be a NRRD "list" axis with no space direction.

Everything is written to a temporary file and renamed into place (see :mod:`medsam2.atomic`).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import InvalidVolumeError
from .geometry import VolumeGeometry
from .segments import Segment, resolved_terminologies

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
        from .dicom_read import read_dicom_series

        series = read_dicom_series(p)
        return series.array, series.geometry
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
        mask = _binary_mask(seg, shape)
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


def _binary_mask(seg: Segment, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(seg.mask)
    if mask.shape != tuple(shape):
        raise InvalidVolumeError(f"mask of segment {seg.label!r} has shape {mask.shape}, expected {tuple(shape)}")
    if mask.dtype.kind == "f":
        if not np.all((mask == 0) | (mask == 1)):
            raise InvalidVolumeError(f"mask of segment {seg.label!r} is not binary; threshold it first")
    elif mask.dtype.kind not in "biu":
        raise InvalidVolumeError(f"mask of segment {seg.label!r} has unsupported dtype {mask.dtype}")
    return mask != 0


# --- Slicer .seg.nrrd ---------------------------------------------------------------------------------


def assign_layers(masks: Sequence[np.ndarray]) -> list[int]:
    """Layer per segment: each goes to the first layer where it overlaps no earlier segment, so
    non-overlapping segmentations stay one 3D layer (the common case) and overlaps cost one layer each."""
    occupied: list[np.ndarray] = []
    layers = []
    for mask in masks:
        for n, taken in enumerate(occupied):
            if not np.any(taken & mask):
                taken |= mask
                layers.append(n)
                break
        else:
            occupied.append(mask.copy())
            layers.append(len(occupied) - 1)
    return layers


def write_seg_nrrd(path: PathLike, segments: Sequence[Segment], geometry: VolumeGeometry) -> Path:
    """Write Slicer's ``.seg.nrrd`` with segment names, colours and terminology; overlaps become layers."""
    target = Path(path)
    if not target.name.endswith(".seg.nrrd"):
        raise InvalidVolumeError(f"Slicer segmentation path must end in .seg.nrrd, got {target.name}")
    if not segments:
        raise InvalidVolumeError("no segments to write")
    shape = tuple(np.asarray(segments[0].mask).shape)
    if len(shape) != 3:
        raise InvalidVolumeError(f"masks must be 3D [k, j, i], got shape {shape}")
    masks = [_binary_mask(s, shape) for s in segments]
    terms = resolved_terminologies(segments)
    layers = assign_layers(masks)
    n_layers = max(layers) + 1
    label_values: list[int] = []
    counts = [0] * n_layers
    for layer in layers:
        counts[layer] += 1
        label_values.append(counts[layer])
    dtype = np.uint8 if max(counts) < 256 else np.uint16
    volume = np.zeros(shape + (n_layers,), dtype=dtype)  # [k, j, i, layer]: layer varies fastest on disk
    for mask, layer, value in zip(masks, layers, label_values):
        volume[..., layer][mask] = value

    header = _nrrd_header(shape, n_layers, dtype, geometry)
    for n, (seg, term, mask, layer, value) in enumerate(zip(segments, terms, masks, layers, label_values)):
        name = " ".join(seg.label.split())  # header values are single lines
        r, g, b = (c / 255.0 for c in term.color)
        header += [
            f"Segment{n}_Color:={r:.6g} {g:.6g} {b:.6g}",
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_Extent:={_extent(mask)}",
            f"Segment{n}_ID:=Segment_{n + 1}",
            f"Segment{n}_LabelValue:={value}",
            f"Segment{n}_Layer:={layer}",
            f"Segment{n}_Name:={name}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Tags:=Segmentation.Status:inprogress|TerminologyEntry:{term.slicer_tag()}|",
        ]
    header += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    data = volume if n_layers > 1 else volume[..., 0]
    payload = gzip.compress(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes(), 6)
    with atomic_output(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n\n").encode("utf-8"))
            fh.write(payload)
    return target


def _nrrd_header(shape: tuple[int, ...], n_layers: int, dtype: type, geometry: VolumeGeometry) -> list[str]:
    # Voxel axis directions in LPS: the direction matrix's columns scaled by spacing, as ITK and Slicer
    # write them; NRRD lists the fastest axis (i) first, so sizes are reversed from the [k, j, i] shape.
    columns = geometry.direction_matrix * np.asarray(geometry.spacing)[None, :]
    directions = " ".join("(" + ",".join(f"{v:.17g}" for v in columns[:, a]) + ")" for a in range(3))
    sizes = f"{shape[2]} {shape[1]} {shape[0]}"
    lines = [
        "NRRD0004",
        "# Slicer segmentation written by MedSAM2Slicer",
        f"type: {'unsigned char' if dtype == np.uint8 else 'unsigned short'}",
    ]
    if n_layers > 1:
        lines += [
            "dimension: 4",
            "space: left-posterior-superior",
            f"sizes: {n_layers} {sizes}",
            f"space directions: none {directions}",
            "kinds: list domain domain domain",
        ]
    else:
        lines += [
            "dimension: 3",
            "space: left-posterior-superior",
            f"sizes: {sizes}",
            f"space directions: {directions}",
            "kinds: domain domain domain",
        ]
    lines += [
        "endian: little",
        "encoding: gzip",
        "space origin: (" + ",".join(f"{v:.17g}" for v in geometry.origin) + ")",
    ]
    return lines


def _extent(mask: np.ndarray) -> str:
    """Bounding box in voxel indices, "imin imax jmin jmax kmin kmax" (Slicer's empty extent if none)."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        bounds += [int(present[0]), int(present[-1])]
    return " ".join(str(b) for b in bounds)
