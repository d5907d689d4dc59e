"""DICOM Segmentation (SEG) export with highdicom, referencing the series the masks were drawn on.

The SEG carries the source study, series and frame of reference and a per-frame reference to the source
image (or frame) under each mask frame, so a PACS or viewer overlays it on the right slices. Every object
becomes one segment with coded terminology (:mod:`medsam2.dicom.terminology`) and an algorithm identification
naming the model and checkpoint. Segments are stored separately, so overlapping objects stay intact; frames
with no mask voxels are omitted, as PS3.3 allows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medsam2 import __version__
from medsam2.dicom.series import DicomSeries
from medsam2.dicom.terminology import Code, Terminology, terminology_for
from medsam2.errors import MedSAM2Error, one_line
from medsam2.io.atomic import atomic_output
from medsam2.io.segments import Segment

_LO_MAX = 64  # DICOM Long String limit: segment labels, names, versions


class SegExportError(MedSAM2Error, ValueError):
    """The masks or labels cannot be written as a DICOM-SEG of this series."""


@dataclass
class SegExport:
    path: Optional[Path]
    sop_instance_uid: str
    series_instance_uid: str
    segment_numbers: dict[str, int] = field(default_factory=dict)  # label -> DICOM segment number
    skipped_empty: list[str] = field(default_factory=list)  # labels of all-zero masks, not exported


def build_dicom_seg(
    series: DicomSeries,
    segments: Sequence[Segment],
    *,
    model_name: str,
    checkpoint: str,
    segmentation_type: str = "binary",
    series_description: str = "MedSAM2 segmentation",
    series_number: Optional[int] = None,
    algorithm_type: str = "semiautomatic",
    content_creator: Optional[str] = None,
) -> tuple[hd.seg.Segmentation, SegExport]:
    """The SEG as a dataset (not yet on disk), and which segments it holds.

    All-zero masks are skipped (listed in ``SegExport.skipped_empty``); a SEG with no segment at all is an
    error. ``algorithm_type`` is "semiautomatic" for prompted segmentation, "automatic" for batch runs.
    """
    kind = segmentation_type.strip().lower()
    if kind not in ("binary", "fractional"):
        raise SegExportError(f"segmentation type must be 'binary' or 'fractional', got {segmentation_type!r}")
    if not segments:
        raise SegExportError("no segments to export")
    for name, value in (("model name", model_name), ("checkpoint", checkpoint)):
        if not str(value).strip():
            raise SegExportError(f"the {name} is empty; the SEG must name the algorithm that produced it")
    algo_kind = algorithm_type.strip().upper()
    if algo_kind not in ("SEMIAUTOMATIC", "AUTOMATIC"):
        raise SegExportError(f"algorithm type must be 'semiautomatic' or 'automatic', got {algorithm_type!r}")

    shape = series.array.shape
    stacks: list[np.ndarray] = []
    kept: list[tuple[Segment, Terminology]] = []
    skipped: list[str] = []
    for index, item in enumerate(segments):
        _check_label(item.label)
        mask = np.asarray(item.mask)
        if mask.shape != shape:
            raise SegExportError(
                f"mask of segment {item.label!r} has shape {mask.shape} but the series is {shape} ([k, j, i])"
            )
        data = _binary(mask, item.label) if kind == "binary" else _fractional(mask, item.label)
        if not np.any(data):
            skipped.append(item.label)
            continue
        stacks.append(data)
        kept.append((item, item.terminology or terminology_for(item.label, index)))
    if not kept:
        raise SegExportError(f"every segment is empty ({', '.join(skipped)}); there is nothing to export")

    checkpoint_name = Path(str(checkpoint)).name or str(checkpoint)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model_name),
        family=codes.DCM.ArtificialIntelligence,
        version=_lo(checkpoint_name),
        source="MedSAM2Slicer",
        parameters={"checkpoint": checkpoint_name, "engine": f"MedSAM2Slicer {__version__}"},
    )
    descriptions = [
        _description(number, item.label, term, algorithm, algo_kind)
        for number, (item, term) in enumerate(kept, start=1)
    ]
    source_images, pixel_array = _source_order(series, np.stack(stacks, axis=-1))
    source = series.datasets[0]
    if not str(source.get("FrameOfReferenceUID", "") or ""):
        raise SegExportError(
            f"source series {series.series_instance_uid} has no FrameOfReferenceUID, which a DICOM-SEG must "
            "share with it; export a .seg.nrrd or NIfTI label map instead"
        )
    if series_number is None:
        series_number = 1000 + int(source.get("SeriesNumber", 0) or 0)
    seg_type = (
        hd.seg.SegmentationTypeValues.BINARY if kind == "binary" else hd.seg.SegmentationTypeValues.FRACTIONAL
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MedSAM2Slicer",
            manufacturer_model_name=_lo(model_name),
            software_versions=__version__,
            device_serial_number="0",
            content_description=_lo(series_description),
            content_label="MEDSAM2",
            content_creator_name=content_creator,
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom checks the source headers against the SEG IOD; say which requirement failed.
        raise SegExportError(
            f"cannot build a DICOM-SEG from series {series.series_instance_uid}: {one_line(exc)}"
        ) from exc
    seg.SeriesDescription = _lo(series_description)
    if any(not item.label.isascii() for item, _t in kept):
        seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so non-ASCII labels survive
    info = SegExport(
        path=None,
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        segment_numbers={item.label: n for n, (item, _t) in enumerate(kept, start=1)},
        skipped_empty=skipped,
    )
    return seg, info


def write_dicom_seg(
    path: Union[str, os.PathLike[str]],
    series: DicomSeries,
    segments: Sequence[Segment],
    **options: object,
) -> SegExport:
    """Build the SEG (see :func:`build_dicom_seg` for ``options``) and write it atomically to ``path``
    (a file, or an existing folder to write ``<SOPInstanceUID>.dcm`` into)."""
    seg, info = build_dicom_seg(series, segments, **options)  # type: ignore[arg-type]
    target = Path(path)
    if target.is_dir():
        target = target / f"{info.sop_instance_uid}.dcm"
    with atomic_output(target) as tmp:
        seg.save_as(tmp)
    info.path = target
    return info


# --- helpers -----------------------------------------------------------------------------------------


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label.strip():
        raise SegExportError("a segment has an empty label; give every segment a name")
    if len(label) > _LO_MAX:
        raise SegExportError(
            f"segment label {label[:20]!r}... is longer than {_LO_MAX} characters (DICOM limit)"
        )
    if "\\" in label or any(ord(c) < 32 for c in label):
        raise SegExportError(f"segment label {label!r} contains a backslash or control character")


def _lo(text: str) -> str:
    text = " ".join(str(text).replace("\\", "/").split())
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _binary(mask: np.ndarray, label: str) -> np.ndarray:
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind in "iu":
        return mask != 0
    if mask.dtype.kind == "f":
        finite = np.isfinite(mask)
        if finite.all() and np.all((mask == 0) | (mask == 1)):
            return mask == 1
        raise SegExportError(
            f"mask of segment {label!r} holds values other than 0 and 1; threshold it or export as "
            "'fractional'"
        )
    raise SegExportError(f"mask of segment {label!r} has unsupported dtype {mask.dtype}")


def _fractional(mask: np.ndarray, label: str) -> np.ndarray:
    if mask.dtype == np.bool_ or mask.dtype.kind in "iu":
        if mask.dtype.kind in "iu" and (mask.min() < 0 or mask.max() > 1):
            raise SegExportError(f"mask of segment {label!r} has integer values outside 0..1")
        return mask.astype(np.float32)
    if mask.dtype.kind != "f":
        raise SegExportError(f"mask of segment {label!r} has unsupported dtype {mask.dtype}")
    if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
        raise SegExportError(f"probabilities of segment {label!r} must be finite and within [0, 1]")
    return mask.astype(np.float32, copy=False)


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _description(
    number: int, label: str, term: Terminology, algorithm: hd.AlgorithmIdentificationSequence, algo_kind: str
) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=_coded(term.category),
        segmented_property_type=_coded(term.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algo_kind],
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=label,
        anatomic_regions=[_coded(term.anatomic_region)] if term.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*term.color),
    )
    if term.type_modifier is not None:
        # highdicom has no argument for it; PS3.3 puts the modifier inside the type code item.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(term.type_modifier)
        ]
    return desc


def _source_order(series: DicomSeries, stack: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """Source images and mask frames in the order highdicom pairs them: one single-frame image per k, or
    the frames of one multi-frame image in its own frame order."""
    if not series.is_multiframe:
        return [series.datasets[f.dataset_index] for f in series.frames], stack
    files = {f.dataset_index for f in series.frames}
    if len(files) != 1:
        raise SegExportError(
            "SEG export supports a series of single-frame images or one multi-frame image, "
            f"not {len(files)} multi-frame files"
        )
    ds = series.datasets[next(iter(files))]
    ordered = np.zeros((int(ds.NumberOfFrames),) + stack.shape[1:], dtype=stack.dtype)
    for k, frame in enumerate(series.frames):
        assert frame.frame_number is not None
        ordered[frame.frame_number - 1] = stack[k]
    return [ds], ordered
