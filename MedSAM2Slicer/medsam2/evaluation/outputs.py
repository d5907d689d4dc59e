"""The evaluation's output folder: where each case's files go, and when a case counts as finished.

Output folder
-------------
``run.json``                    what was evaluated and how (a resumed run must match it)
``cases/<case>.csv``            one row per label and interaction round (written last: its presence
                                marks the case finished, and a resumed run skips it)
``cases/<case>.slices.csv``     per-slice voxel counts and Dice along the propagation, every round
``cases/<case>.error.txt``      why a case could not be evaluated (retried by a resumed run)
``predictions/<case>/<label>.nii.gz``  final masks, when asked for
plus the merged tables, summary and plots that :mod:`.report` writes.

Case rows: ``round`` 0 is the propagation from the simulated prompts, round r the one after the r-th
corrective click; ``status`` is ok, absent (the label is not in this case's ground truth: nothing to
prompt, not scored) or failed: <reason>; ``prompt`` lists what that round added; ``seconds`` counts
from the label's first prompt (the first label of a case also pays for encoding the slices);
``per_slice_dice`` is filled by the Medical-SAM2 protocol only. Metrics of that protocol are computed
on its slice range; otherwise on the whole volume. Slice rows exist where the ground truth or the
prediction is non-empty; ``offset`` is the signed distance in slices to the nearest prompted slice.
Metric columns (``dice``, ``iou``, ``nsd_monai``, ``nsd_surface``, ``hd95_monai``, ``hd95_surface``)
name the surface each uses: see :mod:`.columns`. With ``settings.cvpr25`` the rows are the CVPR 2025
protocol's steps instead (round 0 the box, round r the r-th click) with its extra columns: see
:mod:`.cvpr25`.
"""

from __future__ import annotations

from pathlib import Path

from medsam2.evaluation.columns import METRIC_COLUMNS
from medsam2.evaluation.cvpr25_protocol import EXTRA_FIELDS as CVPR25_FIELDS
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.io.tables import read_csv, safe_name

CASE_FIELDS = (
    "case", "label", "values", "round", "status", *METRIC_COLUMNS, "gt_voxels", "pred_voxels",
    "per_slice_dice", "prompted_slices", "prompt", "seconds",
)  # fmt: skip
SLICE_FIELDS = (
    "case",
    "label",
    "round",
    "slice",
    "offset",
    "gt_voxels",
    "pred_voxels",
    "intersection",
    "dice",
)


def case_fields(settings: EvaluationSettings) -> tuple[str, ...]:
    return CASE_FIELDS + (CVPR25_FIELDS if settings.cvpr25 is not None else ())


def case_csv(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.csv"


def slices_csv(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.slices.csv"


def error_file(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.error.txt"


def case_finished(out_dir: Path, case_id: str) -> bool:
    """A case is finished when its CSV holds rows for it (files are only ever written whole)."""
    path = case_csv(out_dir, case_id)
    if not path.is_file():
        return False
    try:
        rows = read_csv(path)
    except (OSError, ValueError):
        return False
    return bool(rows) and all(row.get("case") == case_id for row in rows)
