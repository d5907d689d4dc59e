"""``medsam2 demo``: segment the left lateral ventricle of the MNI152 template shipped with nilearn from
one click; writes a .seg.nrrd and a PNG montage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from medsam2.cli.common import EXIT_MODEL, Handler, Progress, add_model_options, emit, load_model_for
from medsam2.errors import InvalidPromptError, ModelError
from medsam2.intensity import IntensityPreparation


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    p = subparsers.add_parser("demo", parents=[common], help="segment the MNI152 template shipped with nilearn")
    p.add_argument("--output", type=Path, default=Path("demo-output"))
    p.add_argument("--resolution", type=int, choices=[1, 2], default=1, help="template resolution in mm")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="run the whole pipeline with untrained weights (plumbing check only: the mask is meaningless)",
    )
    add_model_options(p)
    return run_demo


# A point in the body of the left lateral ventricle of nilearn's MNI152 2009 template (RAS mm): the
# central voxel of the template's largest dark (< 0.3) region left of the midline, CSF at 0.26 against
# white matter at ~0.84, a structure a promptable model should follow through the axial slices.
DEMO_POINT_RAS = (-9.0, -8.0, 19.0)


def run_demo(args: argparse.Namespace) -> int:
    from nilearn import datasets

    from medsam2.geometry import VolumeGeometry
    from medsam2.io.montage import overlay_montage
    from medsam2.session import SegmentationSession

    if args.output.exists() and not args.output.is_dir():  # found now, not after the propagation
        raise InvalidPromptError(f"--output {args.output} is a file; the demo writes into a folder")
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
    from medsam2.io.seg_nrrd import write_seg_nrrd
    from medsam2.io.segments import Segment

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
