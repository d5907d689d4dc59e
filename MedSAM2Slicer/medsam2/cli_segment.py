"""``medsam2 segment``, ``medsam2 batch`` and ``medsam2 demo``."""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .cli import EXIT_BATCH, EXIT_MODEL, Progress, emit, exit_code_for
from .errors import InvalidPromptError, ModelError
from .intensity import IntensityPreparation, parse_intensity
from .prompt_files import ObjectPrompts, apply_prompts, box_on_slice, parse_box, parse_triplet, read_prompt_file

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


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="model name from `medsam2 models list` (default: the registry's default)")
    g.add_argument("--checkpoint", type=Path, help="a local checkpoint instead of a registry model")
    g.add_argument("--config", help="sam2 config for --checkpoint (packaged name or YAML path)")
    g.add_argument("--image-size", type=int, help="model input size for --checkpoint (e.g. 512 for MedSAM2)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default auto)")
    g.add_argument("--memory-budget", type=float, metavar="GIB", help="memory for volume + cached features")


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


def add_segment_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("segment", parents=[common], help="segment one volume from prompts")
    p.add_argument("input", help="volume file (NRRD, NIfTI, MetaImage), DICOM folder, or DICOMweb series URL")
    p.add_argument("-o", "--output", type=Path, required=True, help=".seg.nrrd, .nii.gz, .nrrd or .dcm (DICOM-SEG)")
    add_segment_options(p)
    p.set_defaults(handler=run_segment)


def add_batch_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("batch", parents=[common], help="many volumes and their prompts from a CSV or JSON manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--output-dir", type=Path, help="relative outputs are placed here (default: next to the manifest)")
    add_model_options(p)
    p.set_defaults(handler=run_batch)


def add_demo_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="segment the MNI152 template shipped with nilearn")
    p.add_argument("--output", type=Path, default=Path("demo-output"))
    p.add_argument("--resolution", type=int, choices=[1, 2], default=1, help="template resolution in mm")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="run the whole pipeline with untrained weights (plumbing check only: the mask is meaningless)",
    )
    add_model_options(p)
    p.set_defaults(handler=run_demo)


# ----------------------------------------------------------------------------- shared steps
@dataclass
class SegmentJob:
    input: str
    output: Path
    args: argparse.Namespace


class ModelCache:
    """Batch cases share one loaded model per (model, checkpoint, config, size, device)."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def get(self, args: argparse.Namespace, random_weights: bool = False) -> tuple[Any, Any]:
        key = (args.model, args.checkpoint, args.config, args.image_size, args.device, random_weights)
        if key not in self._loaded:
            self._loaded[key] = load_model_for(args, random_weights)
        return self._loaded[key]


def load_model_for(args: argparse.Namespace, random_weights: bool = False) -> tuple[Any, Any]:
    from .devices import resolve_device

    device = resolve_device(args.device)
    if random_weights:
        from .model import build_predictor

        size = args.image_size or 512
        return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=size, device=device, seed=0), None
    from .registry import load_model

    return load_model(
        name=args.model,
        checkpoint=args.checkpoint,
        config=args.config,
        image_size=args.image_size,
        device=device,
    )


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
    from .prompt_files import to_ijk

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


def segment_one(job: SegmentJob, models: ModelCache, random_weights: bool = False) -> dict[str, Any]:
    from .cli_io import load_input, write_output
    from .session import SegmentationSession

    args = job.args
    fmt = output_format(job.output, getattr(args, "format", None))
    if job.output.exists() and not getattr(args, "overwrite", False):
        raise InvalidPromptError(f"{job.output} exists; pass --overwrite to replace it")
    if not job.output.parent.is_dir():
        raise InvalidPromptError(f"output folder {job.output.parent} does not exist")
    has_prompts = any(getattr(args, k, None) for k in ("point", "point_ijk", "box", "box_ijk", "prompts", "mask"))
    if not has_prompts:
        raise InvalidPromptError("no prompts: give --point, --box, --mask or --prompts")
    if fmt == "dcm" and not Path(job.input).is_dir() and "://" not in job.input:
        raise InvalidPromptError("DICOM-SEG output needs a DICOM input (a series folder or DICOMweb URL)")
    started = time.monotonic()
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
    from .labelmaps import read_volume

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


# ----------------------------------------------------------------------------- batch
def read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InvalidPromptError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidPromptError(f"manifest {path} is not valid JSON ({exc})") from None
        if isinstance(rows, dict):
            rows = rows.get("cases", [])
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(fh)]
    else:
        raise InvalidPromptError(f"manifest {path} must be .csv or .json")
    if not isinstance(rows, list) or not rows:
        raise InvalidPromptError(f"manifest {path} lists no cases")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "input" not in row or "output" not in row:
            raise InvalidPromptError(f"manifest {path} case {n} needs 'input' and 'output'")
    return rows


def _row_argv(row: dict[str, Any]) -> list[str]:
    """A manifest row as `segment` options: keys are option names; lists (JSON) or ';'-separated
    values (CSV) repeat an option; true/false toggles a flag."""
    argv: list[str] = []
    for key, value in row.items():
        if key in ("input", "output"):
            continue
        option = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else str(value).split(";") if isinstance(value, str) else [value]
        for v in values:
            if isinstance(v, bool) or str(v).lower() in ("true", "false"):
                if v is True or str(v).lower() == "true":
                    argv.append(option)
            else:
                argv += [option, str(v)]
    return argv


def run_batch(args: argparse.Namespace) -> int:
    rows = read_manifest(args.manifest)
    base = args.output_dir or args.manifest.parent
    from .cli import _Parser

    case_parser = _Parser(prog="manifest row", add_help=False)
    add_segment_options(case_parser)
    models = ModelCache()
    results: list[dict[str, Any]] = []
    show = not (args.quiet or args.json)
    for n, row in enumerate(rows, 1):
        output = Path(str(row["output"]))
        output = output if output.is_absolute() else base / output
        record: dict[str, Any] = {"case": n, "input": str(row["input"]), "output": str(output)}
        try:
            case = case_parser.parse_args(_row_argv(row))
        except (argparse.ArgumentError, SystemExit) as exc:
            record.update(status="failed", error=f"bad manifest row: {exc}")
            results.append(record)
            continue
        for key in ("model", "checkpoint", "config", "image_size", "device", "memory_budget"):
            if getattr(case, key, None) is None:
                setattr(case, key, getattr(args, key))
        case.quiet, case.json = True, True
        if output.exists():
            record["status"] = "skipped (output exists)"
        else:
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                record.update(status="done", **segment_one(SegmentJob(str(row["input"]), output, case), models))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one case's failure never stops the others
                if args.debug:
                    raise
                record.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                record["exit_code"] = exit_code_for(exc)
        results.append(record)
        if show:
            print(
                f"[{n}/{len(rows)}] {record['status']}: {record['input']}"
                + (f" - {record['error']}" if record.get("error") else "")
            )
    failed = [r for r in results if r["status"] == "failed"]
    summary = {
        "cases": len(results),
        "done": sum(r["status"] == "done" for r in results),
        "skipped": sum(r["status"].startswith("skipped") for r in results),
        "failed": len(failed),
        "results": results,
    }
    emit(args, summary, f"batch: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed")
    return EXIT_BATCH if failed else 0


# ----------------------------------------------------------------------------- demo
# A point in the body of the left lateral ventricle of nilearn's MNI152 2009 template (RAS mm): the
# central voxel of the template's largest dark (< 0.3) region left of the midline, CSF at 0.26 against
# white matter at ~0.84, a structure a promptable model should follow through the axial slices.
DEMO_POINT_RAS = (-9.0, -8.0, 19.0)


def run_demo(args: argparse.Namespace) -> int:
    from nilearn import datasets

    from .geometry import VolumeGeometry
    from .montage import overlay_montage
    from .session import SegmentationSession

    img = datasets.load_mni152_template(resolution=args.resolution)
    volume = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)  # (x,y,z) -> [k, j, i]
    affine = np.asarray(img.affine, dtype=float)
    geometry = VolumeGeometry.from_ijk_to_ras_matrix(affine)  # NIfTI's affine is IJK -> RAS
    try:
        predictor, entry = load_model_for(args, random_weights=args.random_weights)
    except ModelError as exc:
        hint = (
            f"{exc}. Without network, point the demo at a local checkpoint: make demo "
            "CHECKPOINT=/path/to/MedSAM2_latest.pt (or medsam2 demo --checkpoint PATH --image-size 512), "
            "or run the plumbing only with medsam2 demo --random-weights"
        )
        if args.json:
            print(json.dumps({"ok": False, "error": hint}))
        print(f"medsam2 demo: {hint}")
        return EXIT_MODEL
    session = SegmentationSession(predictor, volume, geometry, intensity=IntensityPreparation.mri())
    point = geometry.ras_to_ijk([DEMO_POINT_RAS])[0]
    session.add_points(1, [point], [1])
    progress = Progress(args, "propagating")
    try:
        result = session.propagate(progress=progress)
    finally:
        progress.close()
    args.output.mkdir(parents=True, exist_ok=True)
    from .labelmaps import write_seg_nrrd
    from .segments import Segment

    seg_path = args.output / "mni152_ventricle.seg.nrrd"
    write_seg_nrrd(seg_path, [Segment(result.masks[1], "left lateral ventricle")], geometry)
    montage_path = args.output / "mni152_ventricle_montage.png"
    k = int(round(point[2]))
    shown = overlay_montage(volume, [result.masks[1]], montage_path, geometry=geometry, marks=[(k, point[0], point[1])])
    voxels = int(result.masks[1].sum())
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    weights = (
        "random weights (plumbing check, mask meaningless)"
        if args.random_weights
        else getattr(entry, "name", "checkpoint")
    )
    emit(
        args,
        {"segmentation": seg_path, "montage": montage_path, "voxels": voxels, "slices_shown": shown, "model": weights},
        f"model: {weights}\nwrote {seg_path} ({voxels} voxels, {voxels * voxel_ml:.1f} mL)"
        f"\nwrote {montage_path} (slices {shown[0]}-{shown[-1]})",
    )
    return 0

