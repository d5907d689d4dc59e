"""Read one DICOM image series into a ``[k, j, i]`` array, its LPS geometry and its source headers.

Single-frame files (CT Image, MR Image, ...) and enhanced multi-frame files (Enhanced CT/MR, geometry
in functional groups) go through one path: every frame becomes a slice record, records are ordered by
their position along the slice normal (never by file name or instance number, which scanners number
in either direction), and the stack is checked before any pixel is decoded. Geometry follows ITK:
the direction's columns are the row direction, the column direction and their cross product, so the
result matches SimpleITK/GDCM and dcmqi for the same files.

Irregular stacks are rejected, not silently resampled: a gantry tilt (sheared stack), non-uniform
spacing, a missing slice or duplicated positions would all put the mask in the wrong place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medsam2.errors import InvalidVolumeError, one_line
from medsam2.geometry import VolumeGeometry

# Positions and orientations are decimal strings of at most 16 characters in DICOM, and scanners round
# them further (IOP to 4-6 decimals), so comparisons allow that much rounding and no more.
_ORIENTATION_TOL = 1e-3
_SPACING_TOL_MM = 1e-3
_PIXEL_SPACING_REL_TOL = 1e-3
_SLICE_GAP_REL_TOL = 0.01
_SHEAR_TOL_DEG = 0.05
_SHEAR_TOL_MM = 0.01

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of files, not an object
# Objects that carry pixel data but are not images to segment (they are derived from, or overlay, one).
_NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
}
_DEFER_SIZE = "256 KB"  # pixel data is read later, only for the chosen series


@dataclass(frozen=True)
class SourceFrame:
    """Where slice k came from: ``datasets[dataset_index]``, frame ``frame_number`` (1-based, DICOM's
    numbering) of a multi-frame file, or ``None`` for a single-frame file."""

    dataset_index: int
    frame_number: Optional[int]


@dataclass
class DicomSeries:
    """A series read from disk: voxels in real-world units (rescale applied), LPS geometry, and the source
    headers (pixel data dropped) that a DICOM-SEG must reference."""

    array: np.ndarray
    geometry: VolumeGeometry
    datasets: list[Dataset]
    files: list[Path]
    frames: list[SourceFrame]

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", ""))

    @property
    def is_multiframe(self) -> bool:
        return any(f.frame_number is not None for f in self.frames)


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str
    series_number: str
    description: str
    files: tuple[Path, ...]
    is_image: bool

    def describe(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        number = f" #{self.series_number}" if self.series_number else ""
        return (
            f"{self.series_instance_uid} ({self.modality or '?'}{number}{desc}, {len(self.files)} file(s), "
            f"e.g. {self.files[0].name})"
        )


@dataclass
class _Slice:
    file_index: int
    frame_index: Optional[int]  # 0-based frame of a multi-frame file
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM orders it
    slope: float
    intercept: float


def read_dicom_series(path: str | os.PathLike[str], series_uid: Optional[str] = None) -> DicomSeries:
    """Read the one image series in folder ``path`` (searched recursively) or in the single file ``path``.

    ``series_uid`` picks one series when the folder holds several (other files are then ignored).
    Raises :class:`InvalidVolumeError` with a one-line message naming the offending file.
    """
    root = Path(path)
    paths = _list_files(root)
    headers = [_read_header(p) for p in paths]
    kept = [
        (p, ds) for p, ds in zip(paths, headers) if str(ds.get("SOPClassUID", "")) != _MEDIA_STORAGE_DIRECTORY
    ]
    if not kept:
        raise InvalidVolumeError(f"{root} holds no DICOM objects (only a DICOMDIR index)")
    image_files, image_datasets = _select_series(root, kept, series_uid)
    slices = _slice_records(image_files, image_datasets)
    slices, spacing_k = _order_and_check(slices, image_files, image_datasets)
    array = _decode(slices, image_files, image_datasets)
    first = slices[0]
    normal = np.cross(first.row_dir, first.col_dir)
    direction = np.column_stack([first.row_dir, first.col_dir, normal])
    geometry = VolumeGeometry(
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], spacing_k),
        origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )
    for ds in image_datasets:
        # Headers are kept for SEG references; the voxels now live in ``array`` only.
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
    frames = [SourceFrame(s.file_index, None if s.frame_index is None else s.frame_index + 1) for s in slices]
    return DicomSeries(array, geometry, image_datasets, image_files, frames)


def list_dicom_series(path: str | os.PathLike[str]) -> list[SeriesSummary]:
    """The series found under ``path`` (for choosing a ``series_uid``), images and non-images alike."""
    paths = _list_files(Path(path))
    kept = [(p, _read_header(p)) for p in paths]
    return _summaries(
        [(p, ds) for p, ds in kept if str(ds.get("SOPClassUID", "")) != _MEDIA_STORAGE_DIRECTORY]
    )


# --- files and headers -------------------------------------------------------------------------------


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.exists():
        raise InvalidVolumeError(f"DICOM input {root} does not exist")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # Hidden files (.DS_Store, editor swap files) are never DICOM objects of the series.
        files.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    if not files:
        raise InvalidVolumeError(f"DICOM folder {root} is empty")
    return files


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        pass  # no preamble: old files written without one are still DICOM; try once more below
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise InvalidVolumeError(f"{path} is a corrupt or truncated DICOM file ({one_line(exc)})") from exc
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True)
        if str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.") and "SeriesInstanceUID" in ds:
            return ds
    except Exception:  # noqa: BLE001
        pass
    raise InvalidVolumeError(f"{path} is not a DICOM file; a series folder must hold only DICOM files")


def _is_image(ds: Dataset) -> bool:
    return "PixelData" in ds and str(ds.get("SOPClassUID", "")) not in _NON_IMAGE_SOP_CLASSES


def _is_image_class(ds: Dataset) -> bool:
    """Whether the SOP class is one of DICOM's image storage classes (which always carry pixels)."""
    uid = str(ds.get("SOPClassUID", ""))
    return bool(uid) and uid not in _NON_IMAGE_SOP_CLASSES and "Image Storage" in (UID(uid).name or "")


def _sop_name(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", ""))
    if uid in _NON_IMAGE_SOP_CLASSES:
        return _NON_IMAGE_SOP_CLASSES[uid]
    name = UID(uid).name if uid else "unknown"
    return name.replace(" Storage", "") if name else uid


def _a(name: str) -> str:
    return f"an {name}" if name[:1].upper() in "AEIOU" else f"a {name}"


def _summaries(entries: Sequence[tuple[Path, Dataset]]) -> list[SeriesSummary]:
    by_uid: dict[str, list[tuple[Path, Dataset]]] = {}
    for p, ds in entries:
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    out = []
    for uid, items in by_uid.items():
        ds0 = items[0][1]
        out.append(
            SeriesSummary(
                series_instance_uid=uid,
                modality=str(ds0.get("Modality", "")),
                series_number=str(ds0.get("SeriesNumber", "") or ""),
                description=str(ds0.get("SeriesDescription", "") or ""),
                files=tuple(p for p, _ in items),
                is_image=any(_is_image(ds) for _, ds in items),
            )
        )
    return out


def _select_series(
    root: Path, entries: Sequence[tuple[Path, Dataset]], series_uid: Optional[str]
) -> tuple[list[Path], list[Dataset]]:
    if series_uid is not None:
        chosen = [(p, ds) for p, ds in entries if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not chosen:
            found = "; ".join(s.describe() for s in _summaries(entries))
            raise InvalidVolumeError(f"series {series_uid} is not in {root}; found: {found}")
        images = [(p, ds) for p, ds in chosen if _is_image(ds)]
        if not images:
            p, ds = chosen[0]
            raise InvalidVolumeError(
                f"series {series_uid} holds no images ({p.name} is {_a(_sop_name(ds))} object)"
            )
        return [p for p, _ in images], [ds for _, ds in images]

    images = [(p, ds) for p, ds in entries if _is_image(ds)]
    others = [(p, ds) for p, ds in entries if not _is_image(ds)]
    if not images:
        p, ds = others[0]
        raise InvalidVolumeError(
            f"{p} is {_a(_sop_name(ds))} object, not an image; point to the folder of the CT/MR image series"
        )
    series = [s for s in _summaries(images)]
    if len(series) > 1:
        listed = "; ".join(s.describe() for s in series)
        raise InvalidVolumeError(
            f"{root} holds {len(series)} image series: {listed}; pass series_uid to choose one "
            "or put each series in its own folder"
        )
    if others:
        p, ds = others[0]
        if "PixelData" not in ds and _is_image_class(ds):
            # an image object (CT, MR, ... Image Storage) that stops before its pixels: a copy that
            # ended early; reports, SEGs and other non-image objects have no pixels to lose
            what = _a(_sop_name(ds))
            raise InvalidVolumeError(f"{p} is {what} file without its pixel data (truncated?); copy it again")
        raise InvalidVolumeError(
            f"{p} is {_a(_sop_name(ds))} object, not an image of the series; remove it from the folder "
            f"or pass series_uid={series[0].series_instance_uid}"
        )
    return [p for p, _ in images], [ds for _, ds in images]


# --- geometry ----------------------------------------------------------------------------------------


def _label(files: Sequence[Path], s: _Slice) -> str:
    name = files[s.file_index].name
    return name if s.frame_index is None else f"{name} frame {s.frame_index + 1}"


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidVolumeError(f"{where} has an unreadable {what} ({value!r})") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InvalidVolumeError(f"{where} has an invalid {what} ({value!r}); expected {n} numbers")
    return out


def _group_item(ds: Dataset, frame_index: int, sequence: str) -> Optional[Dataset]:
    """A functional group macro of a frame; per-frame item overrides the shared one (PS3.3 C.7.6.16)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) and sequence in shared[0] and len(shared[0][sequence].value):
        return shared[0][sequence].value[0]
    return None


def _rescale(source: Dataset) -> tuple[float, float]:
    slope = source.get("RescaleSlope", None)
    intercept = source.get("RescaleIntercept", None)
    return (
        1.0 if slope in (None, "") else float(slope),
        0.0 if intercept in (None, "") else float(intercept),
    )


def _slice_records(files: Sequence[Path], datasets: Sequence[Dataset]) -> list[_Slice]:
    slices: list[_Slice] = []
    for index, (path, ds) in enumerate(zip(files, datasets)):
        where = path.name
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InvalidVolumeError(
                f"{path} is a colour image; only greyscale CT/MR-like series can be segmented"
            )
        if "ModalityLUTSequence" in ds:
            raise InvalidVolumeError(
                f"{path} uses a Modality LUT, which is not supported; only rescale slope/intercept"
            )
        multiframe = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if not multiframe:
            if n_frames > 1:
                raise InvalidVolumeError(
                    f"{path} is a {n_frames}-frame {_sop_name(ds)} object without per-frame geometry; "
                    "only enhanced multi-frame CT/MR or single-frame slices are supported"
                )
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                raise InvalidVolumeError(
                    f"{path} ({_sop_name(ds)}) has no ImagePositionPatient/ImageOrientationPatient: "
                    "not a cross-sectional image (CT/MR-like) that can be stacked into a volume"
                )
            slices.append(
                _plane(
                    index, None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.get("PixelSpacing"), ds, where
                )
            )
            continue
        for f in range(n_frames):
            fwhere = f"{where} frame {f + 1}"
            pos = _group_item(ds, f, "PlanePositionSequence")
            ori = _group_item(ds, f, "PlaneOrientationSequence")
            measures = _group_item(ds, f, "PixelMeasuresSequence")
            if pos is None or ori is None or measures is None or "ImagePositionPatient" not in pos:
                raise InvalidVolumeError(
                    f"{fwhere} has no plane position/orientation/pixel measures in its functional groups"
                )
            transform = _group_item(ds, f, "PixelValueTransformationSequence")
            rescaled = transform if transform is not None else ds
            slices.append(
                _plane(
                    index, f, pos.ImagePositionPatient, ori.ImageOrientationPatient, measures.get("PixelSpacing"),
                    rescaled, fwhere,
                )  # fmt: skip
            )
    return slices


def _plane(
    index: int, frame: Optional[int], position: Any, orientation: Any, spacing: Any, rescaled: Any, where: str
) -> _Slice:
    """One image plane, from a single-frame file's own attributes or a frame's functional groups."""
    iop = _floats(orientation, 6, "ImageOrientationPatient", where)
    slope, intercept = _rescale(rescaled)
    return _Slice(
        index,
        frame,
        _floats(position, 3, "ImagePositionPatient", where),
        _unit(iop[:3], where),
        _unit(iop[3:], where),
        _pixel_spacing(spacing, where),
        slope,
        intercept,
    )


def _unit(v: np.ndarray, where: str) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm < 0.5:
        raise InvalidVolumeError(f"{where} has a degenerate ImageOrientationPatient ({v.tolist()})")
    return v / norm


def _pixel_spacing(value: Any, where: str) -> tuple[float, float]:
    if value is None:
        raise InvalidVolumeError(f"{where} has no PixelSpacing; its voxel size is unknown")
    sp = _floats(value, 2, "PixelSpacing", where)
    if np.any(sp <= 0):
        raise InvalidVolumeError(f"{where} has a non-positive PixelSpacing ({sp.tolist()})")
    return float(sp[0]), float(sp[1])


def _order_and_check(
    slices: list[_Slice], files: Sequence[Path], datasets: Sequence[Dataset]
) -> tuple[list[_Slice], float]:
    first = slices[0]
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    for s in slices[1:]:
        ds = datasets[s.file_index]
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InvalidVolumeError(
                f"{_label(files, s)} is {ds.Rows}x{ds.Columns} pixels but {_label(files, first)} is "
                f"{rows}x{cols}: "
                "not one series"
            )
        if (
            np.max(np.abs(np.concatenate([s.row_dir - first.row_dir, s.col_dir - first.col_dir])))
            > _ORIENTATION_TOL
        ):
            raise InvalidVolumeError(
                f"{_label(files, s)} has a different image orientation from {_label(files, first)}: "
                "the series mixes acquisitions (e.g. a localizer); remove the odd slices"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=_PIXEL_SPACING_REL_TOL, atol=0):
            raise InvalidVolumeError(
                f"{_label(files, s)} has pixel spacing {s.pixel_spacing} but {_label(files, first)} has "
                f"{first.pixel_spacing}: not one series"
            )
    normal = np.cross(first.row_dir, first.col_dir)
    # Position along the slice normal orders the stack; file names and instance numbers do not.
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    along = np.array([float(s.position @ normal) for s in slices])
    if len(slices) == 1:
        return slices, _single_slice_spacing(datasets[first.file_index], first.frame_index)

    gaps = np.diff(along)
    for n, gap in enumerate(gaps):
        if gap < _SPACING_TOL_MM:
            raise InvalidVolumeError(
                f"{_label(files, slices[n])} and {_label(files, slices[n + 1])} lie at the same position "
                f"({along[n]:.3f} mm along the slice normal): the series holds several echoes, phases or "
                "time "
                "points; export one of them as its own series"
            )
    _check_shear(slices, files, datasets, normal)

    spacing = float(np.median(gaps))
    tolerance = max(_SPACING_TOL_MM, _SLICE_GAP_REL_TOL * spacing)
    for n, gap in enumerate(gaps):
        if abs(gap - spacing) <= tolerance:
            continue
        a, b = _label(files, slices[n]), _label(files, slices[n + 1])
        ratio = gap / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) * spacing <= tolerance:
            missing = int(round(ratio)) - 1
            raise InvalidVolumeError(
                f"{missing} slice(s) missing between {a} ({along[n]:.2f} mm) and {b} "
                f"({along[n + 1]:.2f} mm): a {gap:.2f} mm gap in a {spacing:.2f} mm series; add the missing "
                "file(s) or re-export the series"
            )
        raise InvalidVolumeError(
            f"non-uniform slice spacing: {gap:.3f} mm between {a} and {b} but {spacing:.3f} mm elsewhere; "
            "resample the series to uniform spacing first (e.g. in 3D Slicer)"
        )
    # The mean over the whole stack is more precise than any one rounded gap.
    return slices, float((along[-1] - along[0]) / (len(slices) - 1))


def _check_shear(
    slices: list[_Slice], files: Sequence[Path], datasets: Sequence[Dataset], normal: np.ndarray
) -> None:
    """Reject stacks whose slices do not sit straight along the normal (gantry tilt): the voxel grid would
    be sheared, which VolumeGeometry (and every NRRD/NIfTI/SEG consumer) cannot represent."""
    offsets = np.stack([s.position - slices[0].position for s in slices])
    along = offsets @ normal
    perpendicular = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    worst = int(np.argmax(perpendicular))
    if perpendicular[worst] <= _SHEAR_TOL_MM:
        return
    angle = float(np.degrees(np.arctan2(perpendicular[worst], abs(along[worst]))))
    if angle <= _SHEAR_TOL_DEG:
        return
    tilt = datasets[slices[0].file_index].get("GantryDetectorTilt", None)
    tag = f", GantryDetectorTilt {float(tilt):g} deg" if tilt not in (None, "") else ""
    raise InvalidVolumeError(
        f"the series is sheared by {angle:.2f} deg (gantry tilt{tag}; e.g. {_label(files, slices[worst])}); "
        "tilted stacks are not supported: resample it first (3D Slicer's DICOM module regularizes it on load)"
    )


def _single_slice_spacing(ds: Dataset, frame_index: Optional[int]) -> float:
    """A lone slice has no spacing to measure: SpacingBetweenSlices if given, else 1 mm, as ITK/GDCM and
    highdicom assume (not SliceThickness), so the SEG and every reader agree on the voxel size."""
    source: Optional[Dataset] = ds
    if frame_index is not None:
        source = _group_item(ds, frame_index, "PixelMeasuresSequence")
    value = source.get("SpacingBetweenSlices") if source is not None else None
    if value not in (None, "") and float(value) > 0:
        return float(value)
    return 1.0


# --- pixels ------------------------------------------------------------------------------------------


def _output_dtype(slices: Sequence[_Slice], datasets: Sequence[Dataset]) -> np.dtype:
    """int16 where the stored range plus intercept fits (CT in HU), int32 if not, float32 for real slopes."""
    if any(s.slope != 1.0 or s.intercept != round(s.intercept) for s in slices):
        return np.dtype(np.float32)
    lo, hi = 0, 0
    for s in slices:
        ds = datasets[s.file_index]
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        stored_lo, stored_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = min(lo, stored_lo + int(s.intercept)), max(hi, stored_hi + int(s.intercept))
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _decode(slices: Sequence[_Slice], files: Sequence[Path], datasets: Sequence[Dataset]) -> np.ndarray:
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    dtype = _output_dtype(slices, datasets)
    out = np.empty((len(slices), rows, cols), dtype=dtype)
    decoded: dict[int, np.ndarray] = {}  # multi-frame files are decoded once, not once per frame
    for k, s in enumerate(slices):
        pixels = decoded.get(s.file_index)
        if pixels is None:
            pixels = _pixels(files[s.file_index], datasets[s.file_index])
            if s.frame_index is not None:
                decoded = {s.file_index: pixels}  # keep only the file in use
        frame = pixels if s.frame_index is None else pixels[s.frame_index] if pixels.ndim == 3 else pixels
        if frame.shape != (rows, cols):
            raise InvalidVolumeError(
                f"{_label(files, s)} decodes to {frame.shape} pixels, expected {(rows, cols)}"
            )
        if dtype.kind == "f":
            out[k] = frame.astype(np.float64) * s.slope + s.intercept
        else:
            out[k] = frame.astype(np.int64) + int(s.intercept)
    if (
        out.dtype == np.int32
        and out.size
        and out.min() >= np.iinfo(np.int16).min
        and out.max() <= np.iinfo(np.int16).max
    ):
        out = out.astype(np.int16)  # the theoretical range was too wide; the real data fits
    return out


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing codecs, truncated data, bad headers
        syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
        hint = " (the file is probably truncated or corrupt)"
        if syntax and UID(str(syntax)).is_compressed:
            hint = (
                f" (compressed: {UID(str(syntax)).name}; install pylibjpeg/pylibjpeg-openjpeg or gdcm for it)"
            )
        raise InvalidVolumeError(f"cannot decode the pixel data of {path}: {one_line(exc)}{hint}") from exc
