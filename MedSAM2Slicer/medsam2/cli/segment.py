"""``medsam2 segment``: one volume from prompts. The steps here (inputs, prompts, intensity, one case
segmented and written) are also what ``medsam2 batch`` runs for each row of its manifest."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsam2.cli.common import Handler, ModelCache, Progress, add_model_options, emit
from medsam2.errors import InvalidPromptError
from medsam2.intensity import IntensityPreparation, parse_intensity
from medsam2.io.prompt_files import (
    ObjectPrompts,
    apply_prompts,
    box_on_slice,
    parse_box,
    parse_triplet,
    read_prompt_file,
)

OUTPUT_FORMATS = {".seg.nrrd": "seg.nrrd", ".nii.gz": "nii.gz", ".nii": "nii.gz", ".nrrd": "nrrd", ".dcm": "dcm"}


def output_format(path: Path, explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    name = path.name.lower()
    for suffix, fmt in OUTPUT_FORMATS.items():  # .seg.nrrd is tested before .nrrd
        if name.endswith(suffix):
            return fmt
    raise InvalidPromptError(
        f"cannot tell the output format from {path.name!r}; use .seg.nrrd, .nii.gz, .nrrd or .dcm, or --format"
    )


def _slices(text: str) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"slice range {text!r} must be START:END, e.g. 20:80") from None
    return start, end


def add_segment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts (RAS millimetres, Slicer's convention, unless -ijk)")
    g.add_argument("--point", action="append", default=[], metavar="R,A,S", help="positive click (repeatable)")
    g.add_argument("--negative-point", action="append", default=[], metavar="R,A,S", help="negative click")
    g.add_argument("--point-ijk", action="append", default=[], metavar="I,J,K", help="positive click, voxel index")
    g.add_argument("--negative-point-ijk", action="append", default=[], metavar="I,J,K")
    g.add_argument("--box", action="append", default=[], metavar="R,A,S,R,A,S", help="two opposite corners")
    g.add_argument("--box-ijk", action="append", default=[], metavar="I,J,K,I,J,K")
    g.add_argument("--mask", type=Path, metavar="LABELFILE", help="label volume: each label's slices are mask prompts")
    g.add_argument("--prompts", type=Path, metavar="FILE", help="Slicer .mrk.json or simple JSON (see README)")
    g.add_argument("--label", action="append", default=[], metavar="NAME", help="segment name, per object in order")
    g = p.add_argument_group("propagation")
    g.add_argument("--axis", default="axial", help="axial, coronal, sagittal, or voxel axis 0/1/2 (default axial)")
    g.add_argument("--direction", choices=["both", "forward", "backward"], default="both")
    g.add_argument("--slices", type=_slices, metavar="START:END", help="limit propagation to these slices")
    g.add_argument("--stop-when-absent", type=int, metavar="K", help="stop after K slices without the object")
    g.add_argument(
        "--largest-component", action="store_true", help="keep each object's largest 3D connected component"
    )
    g = p.add_argument_group("intensity").add_mutually_exclusive_group()
    g.add_argument("--window", metavar="W,L", help="CT window width,level in HU")
    g.add_argument("--preset", help="CT window preset: soft_tissue, abdomen, mediastinum, liver, lung, bone, brain")
    g.add_argument("--intensity", help="mri, minmax or percentile:LOW,HIGH")
    add_model_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=sorted(set(OUTPUT_FORMATS.values())), help="default: from OUTPUT's extension")
    g.add_argument("--fractional", action="store_true", help="DICOM-SEG: fractional (probabilities) not binary")
    g.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    p = subparsers.add_parser("segment", parents=[common], help="segment one volume from prompts")
    p.add_argument("input", help="volume file (NRRD, NIfTI, MetaImage), DICOM folder, or DICOMweb series URL")
    p.add_argument("-o", "--output", type=Path, required=True, help=".seg.nrrd, .nii.gz, .nrrd or .dcm (DICOM-SEG)")
    add_segment_options(p)
    return run_segment


# ----------------------------------------------------------------------------- shared steps
@dataclass
class SegmentJob:
    input: str
    output: Path
    args: argparse.Namespace


def choose_intensity(args: argparse.Namespace, entry: Any, modality: str, array: np.ndarray) -> IntensityPreparation:
    """Explicit option, else the model's training recipe for this modality, else a guess from the data."""
    if getattr(args, "window", None):
        return parse_intensity(args.window)
    if getattr(args, "preset", None):
        return IntensityPreparation.window_preset(args.preset)
    if getattr(args, "intensity", None):
        return parse_intensity(args.intensity)
    if entry is not None and hasattr(entry, "intensity_for"):
        prep = entry.intensity_for(modality)
        if prep is not None:
            return prep if isinstance(prep, IntensityPreparation) else parse_intensity(str(prep))
    if modality == "CT" or (not modality and float(array.min()) < -500):  # air in Hounsfield units
        return IntensityPreparation.window_preset("soft_tissue")
    if modality == "MR" or not modality:
        return IntensityPreparation.mri()
    return IntensityPreparation()


def collect_prompts(args: argparse.Namespace, geometry: Any, layout: Any) -> dict[int, ObjectPrompts]:
    from medsam2.io.prompt_files import to_ijk

    objects: dict[int, ObjectPrompts] = {}
    if args.prompts:
        objects.update(read_prompt_file(args.prompts, geometry, layout))
    one = ObjectPrompts(1)
    one.positive += to_ijk([parse_triplet(t, "--point") for t in args.point], "RAS", geometry)
    one.negative += to_ijk([parse_triplet(t, "--negative-point") for t in args.negative_point], "RAS", geometry)
    one.positive += [parse_triplet(t, "--point-ijk") for t in args.point_ijk]
    one.negative += [parse_triplet(t, "--negative-point-ijk") for t in args.negative_point_ijk]
    for t in args.box:
        one.boxes.append(box_on_slice(to_ijk(list(parse_box(t, "--box")), "RAS", geometry), layout))
    for t in args.box_ijk:
        one.boxes.append(box_on_slice(list(parse_box(t, "--box-ijk")), layout))
    if one.positive or one.negative or one.boxes:
        if 1 in objects:
            raise InvalidPromptError("object 1 has prompts both in --prompts and on the command line; use one")
        if one.is_empty():
            raise InvalidPromptError("negative points need a positive point or a box on the command line")
        objects[1] = one
    for n, oid in enumerate(sorted(objects)):
        if n < len(args.label):
            objects[oid].label = args.label[n]
    return objects


def refuse_overwriting_inputs(output: Path, sources: list[tuple[str, Any]]) -> None:
    """--overwrite replaces an earlier result, never a file the run reads (``-o`` given the input's
    name by mistake would otherwise replace the scan with its label map)."""
    if not output.exists():
        return
    for what, source in sources:
        if source and "://" not in str(source) and Path(source).exists() and os.path.samefile(output, source):
            raise InvalidPromptError(f"output {output} is the {what} file; write the result to another file")


def open_case(job: SegmentJob, models: ModelCache, random_weights: bool = False) -> tuple[Any, Any, Any]:
    """The case's input, its model's registry entry and a session on it (no prompts yet); `batch`
    opens the next case with this while the current one propagates."""
    from medsam2.cli.inputs import load_input
    from medsam2.session import SegmentationSession

    args = job.args
    loaded = load_input(job.input)
    predictor, entry = models.get(args, random_weights)
    axis: Any = int(args.axis) if str(args.axis).isdigit() else args.axis
    budget = int(args.memory_budget * 2**30) if getattr(args, "memory_budget", None) else None
    session = SegmentationSession(
        predictor,
        loaded.array,
        loaded.geometry,
        axis=axis,
        intensity=choose_intensity(args, entry, loaded.modality, loaded.array),
        memory_budget_bytes=budget,
    )
    return loaded, entry, session


def segment_one(
    job: SegmentJob,
    models: ModelCache,
    random_weights: bool = False,
    opened: Optional[tuple[Any, Any, Any]] = None,
) -> dict[str, Any]:
    """One case from input to written output; ``opened`` is what :func:`open_case` returned for it,
    when the caller opened it ahead of time."""
    from medsam2.cli.inputs import write_output

    args = job.args
    if job.output.is_dir():
        example = job.output / "result.seg.nrrd"
        raise InvalidPromptError(f"output {job.output} is a folder; name a file in it, e.g. {example}")
    fmt = output_format(job.output, getattr(args, "format", None))
    if job.output.exists() and not getattr(args, "overwrite", False):
        raise InvalidPromptError(f"{job.output} exists; pass --overwrite to replace it")
    refuse_overwriting_inputs(job.output, [("input", job.input), ("--mask", args.mask), ("--prompts", args.prompts)])
    if not job.output.parent.is_dir():
        raise InvalidPromptError(f"output folder {job.output.parent} does not exist")
    has_prompts = any(getattr(args, k, None) for k in ("point", "point_ijk", "box", "box_ijk", "prompts", "mask"))
    if not has_prompts:
        raise InvalidPromptError("no prompts: give --point, --box, --mask or --prompts")
    if fmt == "dcm" and not Path(job.input).is_dir() and "://" not in job.input:
        raise InvalidPromptError("DICOM-SEG output needs a DICOM input (a series folder or DICOMweb URL)")
    started = time.monotonic()
    loaded, entry, session = opened if opened is not None else open_case(job, models, random_weights)
    objects = collect_prompts(args, loaded.geometry, session.layout)
    apply_prompts(session, objects)
    labels = {oid: (obj.label or f"Segment_{oid}") for oid, obj in objects.items()}
    if args.mask:
        mask_objects = add_mask_prompts(session, args.mask, loaded)
        for n, oid in enumerate(mask_objects):
            if oid not in labels:
                labels[oid] = args.label[len(objects) + n] if len(objects) + n < len(args.label) else f"Segment_{oid}"
    progress = Progress(args, "propagating")
    try:
        result = session.propagate(
            direction=args.direction,
            slice_range=args.slices,
            stop_when_absent=args.stop_when_absent,
            progress=progress,
            probabilities=bool(getattr(args, "fractional", False)),
            largest_component=bool(getattr(args, "largest_component", False)),
        )
    finally:
        progress.close()
    write_output(job.output, fmt, result, labels, loaded, entry, fractional=bool(getattr(args, "fractional", False)))
    voxel_ml = float(np.prod(loaded.geometry.spacing)) / 1000.0
    return {
        "input": job.input,
        "output": str(job.output),
        "format": fmt,
        "segments": {
            labels[o]: {
                "voxels": int(m.sum()),
                "volume_ml": round(float(m.sum()) * voxel_ml, 3),
                "slices": list(result.propagated[o]),
            }
            for o, m in result.masks.items()
        },
        "seconds": round(time.monotonic() - started, 2),
    }


def add_mask_prompts(session: Any, path: Path, loaded: Any) -> list[int]:
    from medsam2.io.volumes import read_volume

    labels, geometry = read_volume(path)
    if labels.shape != loaded.array.shape:
        raise InvalidPromptError(f"--mask {path} has shape {labels.shape}, the volume has {loaded.array.shape}")
    if not np.allclose(geometry.ijk_to_lps_matrix(), loaded.geometry.ijk_to_lps_matrix(), atol=1e-3):
        raise InvalidPromptError(f"--mask {path} is not on the volume's voxel grid (origin/spacing/direction differ)")
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise InvalidPromptError(f"--mask {path} has no labelled voxels")
    for value in values:
        session.add_mask_volume(value, labels == value)
    return values


def run_segment(args: argparse.Namespace) -> int:
    summary = segment_one(SegmentJob(args.input, args.output, args), ModelCache())
    parts = ", ".join(f"{k}: {v['volume_ml']} mL" for k, v in summary["segments"].items())
    emit(args, summary, f"wrote {summary['output']} ({parts}) in {summary['seconds']} s")
    return 0
