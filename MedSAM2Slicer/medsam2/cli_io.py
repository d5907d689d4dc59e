"""Command-line inputs and outputs: volume files, DICOM folders and DICOMweb URLs in; .seg.nrrd, label
maps and DICOM-SEG out. Every output is written to a temporary sibling and renamed into place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import InvalidPromptError, InvalidVolumeError
from .geometry import VolumeGeometry
from .session import PropagationResult


@dataclass
class LoadedInput:
    array: np.ndarray
    geometry: VolumeGeometry
    modality: str  # "CT", "MR", ... from DICOM; "" for plain volume files
    dicom: Optional[Any]  # dicom_read.DicomSeries for DICOM inputs (needed for DICOM-SEG)
    source: str


def load_input(spec: str) -> LoadedInput:
    if "://" in spec:
        from .pacs import fetch_series_from_url

        series = fetch_series_from_url(spec)
        return LoadedInput(series.array, series.geometry, series.modality, series, spec)
    path = Path(spec)
    if not path.exists():
        raise InvalidVolumeError(f"input {spec} does not exist")
    if path.is_dir():
        from .dicom_read import read_dicom_series

        series = read_dicom_series(path)
        return LoadedInput(series.array, series.geometry, series.modality, series, spec)
    from .labelmaps import read_volume

    array, geometry = read_volume(path)
    return LoadedInput(array, geometry, "", None, spec)


def write_seg_nrrd_file(
    path: Path, masks: dict[int, np.ndarray], labels: dict[int, str], geometry: VolumeGeometry
) -> None:
    from .labelmaps import write_seg_nrrd

    write_seg_nrrd(path, {labels[o]: m for o, m in masks.items()}, geometry)


def write_output(
    path: Path,
    fmt: str,
    result: PropagationResult,
    labels: dict[int, str],
    loaded: LoadedInput,
    entry: Any,
    fractional: bool = False,
) -> None:
    if fmt == "seg.nrrd":
        write_seg_nrrd_file(path, result.masks, labels, loaded.geometry)
    elif fmt in ("nii.gz", "nrrd"):
        from .labelmaps import write_labelmap

        overlapping = sum(m.astype(np.uint16) for m in result.masks.values())
        if int(np.max(overlapping)) > 1:
            raise InvalidPromptError(
                f"segments overlap, which one label map cannot hold; write .seg.nrrd or .dcm, not {path.name}"
            )
        labelmap = np.zeros(loaded.array.shape, np.uint16)
        for oid, mask in result.masks.items():
            labelmap[mask > 0] = oid
        write_labelmap(path, labelmap, loaded.geometry)
    elif fmt == "dcm":
        if loaded.dicom is None:
            raise InvalidPromptError("DICOM-SEG output needs a DICOM input (a series folder or DICOMweb URL)")
        from .seg_export import write_dicom_seg

        write_dicom_seg(
            path,
            loaded.dicom,
            {labels[o]: m for o, m in result.masks.items()},
            probabilities={labels[o]: p for o, p in (result.probabilities or {}).items()} if fractional else None,
            model_name=getattr(entry, "name", "local checkpoint"),
        )
    else:
        raise InvalidPromptError(f"unknown output format {fmt!r}")
