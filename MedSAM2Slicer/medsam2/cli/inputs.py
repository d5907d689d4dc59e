"""Command-line inputs and outputs: volume files, DICOM folders and DICOMweb URLs in; .seg.nrrd, label
maps and DICOM-SEG out. Every output is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsam2.api import PropagationResult
from medsam2.errors import InvalidPromptError, InvalidVolumeError
from medsam2.geometry import VolumeGeometry
from medsam2.io.segments import Segment


@dataclass
class LoadedInput:
    array: np.ndarray
    geometry: VolumeGeometry
    modality: str  # "CT", "MR", ... from DICOM; "" for plain volume files
    dicom: Optional[Any]  # dicom_read.DicomSeries for DICOM inputs (needed for DICOM-SEG)
    source: str


_SERIES_URL = re.compile(r"^(?P<base>https?://.+?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/?$")


def parse_series_url(url: str) -> tuple[str, str, str]:
    """``http(s)://host/dicom-web/studies/<study UID>/series/<series UID>`` -> (service, study, series)."""
    match = _SERIES_URL.match(url.strip())
    if not match:
        raise InvalidVolumeError(
            f"DICOMweb input {url!r} must look like https://host/dicom-web/studies/<StudyUID>/series/<SeriesUID>"
        )
    return match["base"], match["study"], match["series"]


def load_input(spec: str) -> LoadedInput:
    if "://" in spec:
        from medsam2.dicom.pacs import read_series_from_dicomweb

        base, study, series_uid = parse_series_url(spec)
        series = read_series_from_dicomweb(base, series_uid, study_uid=study)
        return LoadedInput(series.array, series.geometry, series.modality, series, spec)
    path = Path(spec)
    if not path.exists():
        raise InvalidVolumeError(f"input {spec} does not exist")
    if path.is_dir():
        from medsam2.dicom.series import read_dicom_series

        series = read_dicom_series(path)
        return LoadedInput(series.array, series.geometry, series.modality, series, spec)
    from medsam2.io.volumes import read_volume

    array, geometry = read_volume(path)
    return LoadedInput(array, geometry, "", None, spec)


def segments_of(masks: dict[int, np.ndarray], labels: dict[int, str]) -> list[Segment]:
    return [Segment(mask=masks[o], label=labels[o]) for o in sorted(masks)]


def write_output(
    path: Path,
    fmt: str,
    result: PropagationResult,
    labels: dict[int, str],
    loaded: LoadedInput,
    entry: Any,
    fractional: bool = False,
) -> None:
    from medsam2.io import volumes as labelmaps
    from medsam2.io.seg_nrrd import write_seg_nrrd

    segments = segments_of(result.masks, labels)
    if fmt == "seg.nrrd":
        write_seg_nrrd(path, segments, loaded.geometry)
    elif fmt == "nii.gz":
        labelmaps.write_nifti_labelmap(path, segments, loaded.geometry)
    elif fmt == "nrrd":
        import SimpleITK as sitk

        from medsam2.io.atomic import atomic_output

        image = sitk.GetImageFromArray(labelmaps.labelmap_array(segments, loaded.array.shape))
        image.SetSpacing(loaded.geometry.spacing)
        image.SetOrigin(loaded.geometry.origin)
        image.SetDirection(loaded.geometry.direction)
        with atomic_output(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
    elif fmt == "dcm":
        if loaded.dicom is None:
            raise InvalidPromptError("DICOM-SEG output needs a DICOM input (a series folder or DICOMweb URL)")
        from medsam2.dicom.seg_export import write_dicom_seg

        if fractional:
            probabilities = result.probabilities or {}
            segments = [Segment(mask=probabilities[o], label=labels[o]) for o in sorted(probabilities)]
        local = getattr(entry, "local_path", None)
        write_dicom_seg(
            path,
            loaded.dicom,
            segments,
            model_name=f"MedSAM2Slicer {getattr(entry, 'name', 'local checkpoint')}",
            checkpoint=Path(local).name if local else str(getattr(entry, "filename", None) or "unknown"),
            segmentation_type="fractional" if fractional else "binary",
        )
    else:
        raise InvalidPromptError(f"unknown output format {fmt!r}")
