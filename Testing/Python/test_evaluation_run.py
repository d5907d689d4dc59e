"""Evaluation end to end: datasets on disk, simulated prompts, the runner (sharded, resumable), the report
and the command line. Real volumes: nilearn's MNI152 template with grey/white-matter labels, evaluated
with the random-weight 128 px model (its masks are arbitrary, so metric values are checked against the
saved predictions, and against hand-computed values where a stand-in session predicts a known mask)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2 import distributed as D
from medsam2.cli.evaluate import main, run_evaluate
from medsam2.cli.main import build_parser
from medsam2.datasets import prompts as DP
from medsam2.datasets.layouts import parse_label_spec, read_image
from medsam2.errors import InvalidPromptError, InvalidVolumeError, MedSAM2Error
from medsam2.evaluation import EvaluationSettings, PromptProtocol, evaluate_dataset, open_dataset
from medsam2.evaluation import protocols as P
from medsam2.evaluation import runner as R
from medsam2.evaluation.columns import METRIC_COLUMNS, metric_columns
from medsam2.evaluation.metrics import compute_metrics, slice_overlap
from medsam2.evaluation.surface_dice import surface_metrics
from medsam2.io.tables import read_csv

N_SLICES = 12  # slices per test volume: encoding them is most of the run time


# ------------------------------------------------------------------------------------------ helpers
def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def build_mni_msd(root: Path) -> Path:
    """Three cases in Decathlon layout cut from the MNI152 template (2 mm, downsampled to 4 mm), labels
    1 = grey matter and 2 = white matter (tissue probability > 0.5); spacings differ per case."""
    from nilearn import datasets

    template = np.asanyarray(datasets.load_mni152_template(resolution=2).dataobj)
    gm = np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj)
    wm = np.asanyarray(datasets.load_mni152_wm_template(resolution=2).dataobj)
    training = []
    # (spacing (i, j, k) in mm, first slice kept, mirrored left-right): three different "patients"
    variants = [((4.0, 4.0, 4.0), 22, False), ((4.0, 4.0, 6.0), 18, True), ((3.0, 4.0, 5.0), 26, False)]
    for n, (spacing, k0, flip) in enumerate(variants):

        def cut(v, k0=k0, flip=flip):
            v = v[::2, ::2, ::2][3:47, 4:54, k0 : k0 + N_SLICES]  # nibabel order (i, j, k)
            v = v[::-1] if flip else v
            return np.ascontiguousarray(np.transpose(v, (2, 1, 0)))  # -> [k, j, i]

        label = np.zeros(cut(template).shape, np.uint8)
        label[cut(gm) > 0.5] = 1
        label[cut(wm) > 0.5] = 2
        case = f"mni_{n:03d}"
        origin = (-90.0, -126.0, -72.0 + 4.0 * k0)
        write_volume(
            root / "imagesTr" / f"{case}.nii.gz", (cut(template) * 1000).astype(np.float32), spacing, origin
        )
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label, spacing, origin)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "imagesTr" / "._mni_000.nii.gz").write_bytes(b"macOS resource fork")  # as in the MSD tars
    meta = {
        "name": "MNI152 tissue",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "grey matter", "2": "white matter"},
        "numTraining": 3,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def mni_msd(tmp_path_factory) -> Path:
    return build_mni_msd(tmp_path_factory.mktemp("mni") / "Task00_MNI")


@pytest.fixture(scope="module")
def predictor():
    from medsam2.models.build import build_predictor

    return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=128, seed=0)


SETTINGS = EvaluationSettings(
    PromptProtocol(prompt="mask", rounds=1), save_predictions=True, tolerance_mm=2.0
)


@pytest.fixture(scope="module")
def sharded_run(mni_msd, predictor, tmp_path_factory):
    """The dataset evaluated as two ranks would: rank 1 first, then rank 0, which merges."""
    out = tmp_path_factory.mktemp("eval") / "out"
    dataset = open_dataset(mni_msd)
    sessions = []

    class RecordedSession(R.SegmentationSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    original, R.SegmentationSession = R.SegmentationSession, RecordedSession
    try:
        run1 = evaluate_dataset(dataset, predictor, out, SETTINGS, model="tiny random", rank=1, world_size=2)
        run0 = evaluate_dataset(dataset, predictor, out, SETTINGS, model="tiny random", rank=0, world_size=2)
    finally:
        R.SegmentationSession = original
    return SimpleNamespace(out=out, dataset=dataset, run0=run0, run1=run1, sessions=sessions)


def final_rows(rows):
    last = {}
    for row in rows:
        key = (row["case"], row["label"])
        if key not in last or int(row["round"]) > int(last[key]["round"]):
            last[key] = row
    return list(last.values())


# ------------------------------------------------------------------------------------------ datasets
def test_msd_dataset_reads_real_volumes_with_their_geometry(mni_msd):
    dataset = open_dataset(mni_msd)
    assert dataset.layout == "msd" and dataset.name == "MNI152 tissue" and dataset.modality == "MRI"
    assert [c.case_id for c in dataset.cases] == ["mni_000", "mni_001", "mni_002"]
    assert [(s.name, s.values) for s in dataset.labels] == [("grey matter", (1,)), ("white matter", (2,))]
    case = dataset.load(dataset.cases[1])
    assert case.image.shape == (N_SLICES, 50, 44) and case.image.dtype == np.float32
    assert case.geometry.spacing == (4.0, 4.0, 6.0)
    assert set(np.unique(case.label)) == {0, 1, 2}
    for spec in dataset.labels:  # both tissues on every slice: every slice is scored
        assert np.all(spec.mask(case.label).any(axis=(1, 2)))
    only_wm = open_dataset(mni_msd, labels=["2"])
    assert [s.name for s in only_wm.labels] == ["white matter"]


def test_pairs_layout_with_nnunet_channel_names(tmp_path):
    label = np.zeros((3, 4, 5), np.uint8)
    label[1, 1:3, 1:4] = 2
    for case in ("b", "a"):
        write_volume(tmp_path / "images" / f"{case}_0000.nii.gz", np.random.rand(3, 4, 5).astype(np.float32))
        write_volume(tmp_path / "images" / f"{case}_0001.nii.gz", np.full((3, 4, 5), 7, np.float32))
        write_volume(tmp_path / "labels" / f"{case}.nii.gz", label)
    dataset = open_dataset(tmp_path, channel=1)
    assert dataset.layout == "pairs" and [c.case_id for c in dataset.cases] == ["a", "b"]
    loaded = dataset.load(dataset.cases[0])
    assert np.all(loaded.image == 7)  # the second channel's file
    assert [(s.name, s.values) for s in dataset.labels_for(loaded)] == [("2", (2,))]
    with pytest.raises(InvalidVolumeError, match="numbered channels"):
        open_dataset(tmp_path, channel="flair")


def test_brats_layout_both_naming_schemes_and_regions(tmp_path):
    seg = np.zeros((2, 3, 3), np.uint8)
    seg[0, 0, 0], seg[0, 0, 1], seg[0, 1, 0] = 1, 2, 4
    old, new = tmp_path / "BraTS20_Training_001", tmp_path / "BraTS-GLI-00002-000"
    for seq in ("flair", "t1", "t1ce", "t2"):
        write_volume(old / f"{old.name}_{seq}.nii.gz", np.full((2, 3, 3), len(seq), np.float32))
    write_volume(old / f"{old.name}_seg.nii.gz", seg)
    for seq in ("t2f", "t1n", "t1c", "t2w"):
        write_volume(new / f"{new.name}-{seq}.nii.gz", np.full((2, 3, 3), 10 + len(seq), np.float32))
    write_volume(new / f"{new.name}-seg.nii.gz", np.where(seg == 4, 3, seg).astype(np.uint8))
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "brats" and [s.name for s in dataset.labels] == ["WT", "TC", "ET"]
    loaded = {c.case_id: dataset.load(c) for c in dataset.cases}
    first, second = loaded[old.name], loaded[new.name]
    assert np.all(first.image == len("flair")) and np.all(second.image == 13)  # flair == t2f
    for case in (first, second):  # ET is label 4 before 2023 and 3 after: the same voxel either way
        wt, tc, et = (spec.mask(case.label) for spec in dataset.labels)
        assert (wt.sum(), tc.sum(), et.sum()) == (3, 2, 1) and et[0, 1, 0]
    t1ce = open_dataset(tmp_path, channel="t1c")  # either edition's name picks the same sequence
    images = {c.case_id: t1ce.load(c).image for c in t1ce.cases}
    assert np.all(images[old.name] == len("t1ce")) and np.all(images[new.name] == 10 + len("t1c"))


def test_four_d_decathlon_image_and_label_mismatch(tmp_path):
    series = [sitk.GetImageFromArray(np.full((3, 4, 5), v, np.float32)) for v in (1.0, 2.0)]
    for s in series:
        s.SetSpacing((1.0, 1.0, 2.0))
    (tmp_path / "imagesTr").mkdir()
    sitk.WriteImage(sitk.JoinSeries(series), str(tmp_path / "imagesTr" / "c.nii.gz"))
    write_volume(tmp_path / "labelsTr" / "c.nii.gz", np.ones((3, 4, 5), np.uint8), (1.0, 1.0, 2.0))
    write_volume(tmp_path / "labelsTr" / "d.nii.gz", np.ones((3, 4, 6), np.uint8), (1.0, 1.0, 2.0))
    sitk.WriteImage(sitk.JoinSeries(series), str(tmp_path / "imagesTr" / "d.nii.gz"))
    meta = {
        "name": "4D",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"background": 0, "tumour": 1},  # nnU-Net v2 spelling
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in "cd"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    dataset = open_dataset(tmp_path, channel="t1w")
    case = dataset.load(dataset.cases[0])
    assert np.all(case.image == 2.0) and case.geometry.spacing == (1.0, 1.0, 2.0)
    assert dataset.labels[0].name == "tumour"
    with pytest.raises(InvalidVolumeError, match="shape"):
        dataset.load(dataset.cases[1])
    with pytest.raises(InvalidVolumeError, match="channel"):
        open_dataset(tmp_path, channel=5)


def test_label_selection_and_bad_datasets(tmp_path, mni_msd):
    known = open_dataset(mni_msd).labels
    assert parse_label_spec("White Matter", known).values == (2,)
    assert parse_label_spec("brain=1,2", known).values == (1, 2)
    with pytest.raises(InvalidVolumeError, match="unknown label 'csf'"):
        parse_label_spec("csf", known)
    with pytest.raises(InvalidVolumeError, match="background"):
        parse_label_spec("0", known)
    with pytest.raises(InvalidVolumeError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(InvalidVolumeError, match="not a dataset"):
        open_dataset(tmp_path)
    with pytest.raises(InvalidVolumeError, match="cannot find"):
        read_image(tmp_path / "nothing.nii.gz")


# --------------------------------------------------------------------------------------- protocols
def stack(areas):
    """A [k, j, i] mask whose slice s holds a filled block of areas[s] voxels (one row of them)."""
    mask = np.zeros((len(areas), 12, 12), bool)
    for s, a in enumerate(areas):
        mask[s, 5, :a] = True
    return mask


def test_slice_choice():
    rng = np.random.default_rng(0)
    mask = stack([0, 0, 1, 5, 9, 3, 3, 7, 2, 0])
    assert DP.choose_slices(mask, 0, "middle", 1, rng) == [5]  # extent 2..8, middle 5
    assert DP.choose_slices(mask, 0, "middle", 2, rng) == [4, 6]  # nearest to 4 and 6
    assert DP.choose_slices(mask, 0, "largest", 1, rng) == [4]
    assert DP.choose_slices(mask, 0, "largest", 3, rng) == [3, 4, 7]
    gap = stack([0, 0, 4, 4, 0, 0, 0, 0, 4, 4])
    # the middle (5.5) is empty: the nearest object slice, the lower one on a tie
    assert DP.choose_slices(gap, 0, "middle", 1, rng) == [3]
    picks = DP.choose_slices(mask, 0, "random", 3, DP.case_rng(1, "case", "liver"))
    assert picks == DP.choose_slices(mask, 0, "random", 3, DP.case_rng(1, "case", "liver"))  # seeded
    assert len(set(picks)) == 3 and all(mask[s].any() for s in picks)
    assert DP.choose_slices(mask, 0, "largest", 50, rng) == [2, 3, 4, 5, 6, 7, 8]  # capped at the object
    with pytest.raises(InvalidPromptError, match="absent"):
        DP.choose_slices(np.zeros((3, 4, 4), bool), 0, "middle", 1, rng)


def test_box_and_click_prompts():
    m = np.zeros((20, 30), bool)
    m[5:11, 8:20] = True
    assert DP.box_prompt(m, 0, np.random.default_rng(0)) == (5, 8, 10, 19)
    for seed in range(20):
        r0, c0, r1, c1 = DP.box_prompt(m, 3, np.random.default_rng(seed))
        assert abs(r0 - 5) <= 3 and abs(c0 - 8) <= 3 and abs(r1 - 10) <= 3 and abs(c1 - 19) <= 3
        assert r1 > r0 and c1 > c0
    assert DP.box_prompt(m, 3, np.random.default_rng(4)) == DP.box_prompt(m, 3, np.random.default_rng(4))
    line = np.zeros((20, 30), bool)
    line[19, 3:9] = True  # one row thin, on the last row: widened upwards
    assert DP.box_prompt(line, 0, np.random.default_rng(0)) == (18, 3, 19, 8)
    points, labels = DP.click_prompt(m, 3, 2, np.random.default_rng(5))
    assert labels == (1, 1, 1, 0, 0) and len(set(points)) == 5
    assert points[0] == (7, 10)  # interior-most pixel (distance 3), first in raster order
    assert all(m[p] for p in points[:3]) and not any(m[p] for p in points[3:])
    assert all(5 - 10 <= r <= 10 + 10 and 8 - 10 <= c <= 19 + 10 for r, c in points[3:])


def test_correction_click_targets_the_largest_error_on_the_worst_slice():
    gt = np.zeros((3, 12, 12), bool)
    pred = np.zeros_like(gt)
    gt[1, 2:8, 2:8] = True
    pred[1, 2:8, 2:5] = True  # misses a 6x3 block on slice 1 (18 voxels)
    pred[2, 0:2, 0:2] = True  # leaks 4 voxels on slice 2
    click = P.correction_click(pred, gt, 0)
    assert (click.slice_index, click.labels) == (1, (1,))
    # rows 3..6 of the middle column are 2 pixels from the block's edge: the first in raster order
    assert click.points == ((3, 6),)
    again = P.correction_click(pred, gt, 0, clicked={(1, 3, 6)})
    assert again.points != click.points and gt[1][again.points[0]] and not pred[1][again.points[0]]
    only_leak = P.correction_click(gt | (np.arange(12)[None, :, None] > 9), gt, 0)
    assert only_leak.labels == (0,)
    assert P.correction_click(gt, gt, 0) is None


def test_medical_sam2_plan_and_protocol_validation():
    mask = np.zeros((20, 8, 8), bool)
    mask[4:16, 2:6, 2:6] = True  # 12 labelled slices: the first quarter is 4, 5, 6
    mask[5] = False  # an empty slice inside the range gets no prompt
    plan = P.medical_sam2_plan(mask, 0)
    assert plan.slice_range == (4, 6)
    assert [(p.slice_index, p.box) for p in plan.prompts] == [(4, (2, 2, 5, 5)), (6, (2, 2, 5, 5))]
    with pytest.raises(InvalidPromptError, match="prompt must be"):
        PromptProtocol(prompt="scribble")
    with pytest.raises(InvalidPromptError, match="at least 1"):
        PromptProtocol(num_slices=0)
    with pytest.raises(InvalidPromptError, match="rounds"):
        EvaluationSettings(PromptProtocol(per_slice=True, rounds=2))
    with pytest.raises(InvalidPromptError, match="direction"):
        EvaluationSettings(direction="sideways")


# ------------------------------------------------------------- known prediction, hand-computed metrics
class ShiftedCubeSession:
    """Stands in for SegmentationSession: predicts the test's cube moved one slice up along k, and
    records the prompts it is given."""

    instances: list = []

    def __init__(self, predictor, volume, geometry=None, **kwargs):
        self.shape = volume.shape
        self.layout = SimpleNamespace(array_axis=0)
        self.num_slices = volume.shape[0]
        self.prompts: list = []
        ShiftedCubeSession.instances.append(self)

    def reset(self):
        self.prompts.append("reset")

    def add_mask(self, obj, slice_index, mask):
        self.prompts.append(("mask", slice_index, int(mask.sum())))

    def add_points(self, obj, points, labels):
        self.prompts.append(("points", np.asarray(points).tolist(), list(labels)))

    def propagate(self, direction, slice_range=None, stop_when_absent=None, mode=None):
        pred = np.zeros(self.shape, np.uint8)
        pred[3:7, 2:6, 2:6] = 1
        return SimpleNamespace(masks={1: pred})


def test_known_prediction_gives_exact_metrics_in_csv_and_table(tmp_path, monkeypatch):
    cube = np.zeros((10, 10, 10), bool)
    cube[2:6, 2:6, 2:6] = True
    cube_up = np.roll(cube, 1, axis=0)
    for case in ("c1", "c2"):
        label = np.zeros((10, 10, 10), np.uint8)
        label[2:6, 2:6, 2:6] = 1
        image = np.random.rand(10, 10, 10).astype(np.float32)
        write_volume(tmp_path / "data" / "images" / f"{case}.nii.gz", image, (1.0, 1.0, 2.0))
        write_volume(tmp_path / "data" / "labels" / f"{case}.nii.gz", label, (1.0, 1.0, 2.0))
    (tmp_path / "data" / "images" / "c3.nii.gz").write_bytes(b"not a volume")  # a broken case
    write_volume(tmp_path / "data" / "labels" / "c3.nii.gz", label, (1.0, 1.0, 2.0))
    ShiftedCubeSession.instances = []
    monkeypatch.setattr(R, "SegmentationSession", ShiftedCubeSession)
    settings = EvaluationSettings(PromptProtocol(rounds=1), tolerance_mm=1.0)
    dataset = open_dataset(tmp_path / "data")
    run = evaluate_dataset(dataset, None, tmp_path / "out", settings)  # type: ignore[arg-type]
    assert run.evaluated == ["c1", "c2"] and list(run.failed) == ["c3"] and "cannot read" in run.failed["c3"]
    assert (tmp_path / "out" / "cases" / "c3.error.txt").is_file()
    assert not (tmp_path / "out" / "cases" / "c3.csv").exists()
    assert "- Failed: c3: cannot read" in (tmp_path / "out" / "summary.md").read_text()
    again = evaluate_dataset(dataset, None, tmp_path / "out", settings)  # type: ignore[arg-type]
    assert again.skipped == ["c1", "c2"] and list(again.failed) == ["c3"]  # failures are retried
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert len(rows) == 4  # 2 cases x rounds 0 and 1
    for row in rows:  # GT cube [2:6]^3, prediction one slice (2 mm) higher: see the metrics tests
        assert (float(row["dice"]), float(row["iou"]), float(row["hd95_monai"])) == (0.75, 0.6, 2.0)
        assert float(row["nsd_monai"]) == 80 / 112
        surface = surface_metrics(cube_up, cube, (1.0, 1.0, 2.0), 1.0)  # checked against surface-distance
        assert (float(row["nsd_surface"]), float(row["hd95_surface"])) == (surface.nsd_surface, surface.hd95_surface)
        assert (row["gt_voxels"], row["pred_voxels"], row["prompted_slices"]) == ("64", "64", "3")
    # Prompt: the GT mask on the middle slice (extent 2..5 -> 3). Correction: slices 2 (16 missed) and
    # 6 (16 leaked) tie, the lower wins; the click is at the missed square's centre, voxel (i3, j3, k2).
    assert ShiftedCubeSession.instances[0].prompts == [
        "reset",
        ("mask", 3, 16),
        ("points", [[3.0, 3.0, 2.0]], [1]),
    ]
    slices = [
        r for r in read_csv(tmp_path / "out" / "per_slice.csv") if r["case"] == "c1" and r["round"] == "0"
    ]
    assert [(r["slice"], r["offset"], float(r["dice"])) for r in slices] == [
        ("2", "-1", 0.0), ("3", "0", 1.0), ("4", "1", 1.0), ("5", "2", 1.0), ("6", "3", 0.0)
    ]  # fmt: skip
    summary = (tmp_path / "out" / "summary.md").read_text()
    s = surface_metrics(cube_up, cube, (1.0, 1.0, 2.0), 1.0)
    assert (
        f"| 1 | 2 | 0.750 ± 0.000 | 0.600 ± 0.000 | 0.714 ± 0.000 | {s.nsd_surface:.3f} ± 0.000 | 2.00 ± 0.00 "
        f"| {s.hd95_surface:.2f} ± 0.00 |"
    ) in summary
    assert "| 1 | 0.750 ± 0.000 | 0.750 ± 0.000 |" in summary  # Dice per round


def test_report_names_cases_not_evaluated_yet(sharded_run, tmp_path):
    from medsam2.datasets.layouts import CaseRecord
    from medsam2.evaluation.report import write_report

    copy = tmp_path / "copy"
    shutil.copytree(sharded_run.out, copy)
    extra = CaseRecord("mni_999", Path("i.nii.gz"), Path("l.nii.gz"))
    paths = write_report(copy, sharded_run.dataset, [*sharded_run.dataset.cases, extra], SETTINGS, model="m")
    text = paths.summary_md.read_text()
    assert "Cases: 3 of 4 evaluated" in text and "Not evaluated yet: mni_999" in text


# ------------------------------------------------------------------- the real model, sharded, resumed
def test_ranks_split_the_cases_and_rank_zero_merges(sharded_run):
    assert sharded_run.run1.evaluated == ["mni_001"] and sharded_run.run1.report is None
    assert sharded_run.run0.evaluated == ["mni_000", "mni_002"]
    report = sharded_run.run0.report
    rows = read_csv(report.metrics_csv)
    assert len(rows) == 3 * 2 * 2  # cases x labels x rounds (0 and 1)
    assert {r["status"] for r in rows} == {"ok"}
    summary = report.summary_md.read_text()
    assert "Cases: 3 of 3 evaluated" in summary and "Model weights: tiny random" in summary
    for name in ("metrics.csv", "per_slice.csv", "summary.md", "run.json"):
        assert (sharded_run.out / name).is_file()
    assert {p.name for p in report.plots} == {f"box_{m}.png" for m in METRIC_COLUMNS} | {
        "slice_dice.png", "rounds_dice.png"
    }  # fmt: skip
    for plot in report.plots:
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({plot.relative_to(sharded_run.out).as_posix()})" in summary


def test_each_slice_is_encoded_once_per_case(sharded_run):
    # one session per case; its labels and interaction rounds all reuse the cached slice features
    assert len(sharded_run.sessions) == 3
    for session in sharded_run.sessions:
        assert session.cache_stats.encoded == session.num_slices == N_SLICES


def test_csv_metrics_are_exact_for_the_saved_predictions(sharded_run):
    dataset = sharded_run.dataset
    rows = final_rows(read_csv(sharded_run.out / "metrics.csv"))
    assert len(rows) == 6
    for row in rows:
        record = next(c for c in dataset.cases if c.case_id == row["case"])
        case = dataset.load(record)
        spec = next(s for s in dataset.labels if s.name == row["label"])
        saved = sharded_run.out / "predictions" / row["case"] / f"{row['label'].replace(' ', '_')}.nii.gz"
        prediction, geometry = read_image(saved, as_label=True)
        assert geometry == case.geometry  # written on the image's grid
        gt = spec.mask(case.label)
        m = metric_columns(prediction, gt, case.geometry.spacing, tolerance_mm=2.0)
        assert [float(row[c]) for c in METRIC_COLUMNS] == [m[c] for c in METRIC_COLUMNS]
        assert int(row["gt_voxels"]) == int(gt.sum()) and int(row["pred_voxels"]) == int(prediction.sum())
        # the per-slice rows of the final round count the same voxels
        per_slice = [
            r for r in read_csv(sharded_run.out / "per_slice.csv")
            if r["case"] == row["case"] and r["label"] == row["label"] and r["round"] == row["round"]
        ]  # fmt: skip
        overlap = slice_overlap(prediction, gt, 0)
        for r in per_slice:
            s = int(r["slice"])
            assert (int(r["gt_voxels"]), int(r["pred_voxels"]), int(r["intersection"])) == (
                overlap.gt[s], overlap.pred[s], overlap.intersection[s]
            )  # fmt: skip
            assert float(r["dice"]) == overlap.dice()[s]
        prompted = [int(s) for s in row["prompted_slices"].split()]
        assert {int(r["slice"]) for r in per_slice if r["offset"] == "0"} == set(prompted)


def test_summary_table_is_the_mean_and_std_of_the_csv(sharded_run):
    rows = final_rows(read_csv(sharded_run.out / "metrics.csv"))
    summary = (sharded_run.out / "summary.md").read_text()
    for label in ("grey matter", "white matter"):
        values = {
            m: [float(r[m]) for r in rows if r["label"] == label] for m in METRIC_COLUMNS
        }
        digits = {m: 2 if m.startswith("hd95") else 3 for m in values}
        cells = [f"{np.mean(v):.{digits[m]}f} ± {np.std(v):.{digits[m]}f}" for m, v in values.items()]
        assert f"| {label} | 3 | " + " | ".join(cells) + " |" in summary
    paper_row = re.search(r"\| tiny random \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", summary)
    gm, wm = (
        np.mean([float(r["dice"]) for r in rows if r["label"] == lab])
        for lab in ("grey matter", "white matter")
    )
    assert [float(g) for g in paper_row.groups()] == [round(gm, 3), round(wm, 3), round((gm + wm) / 2, 3)]


def test_resume_skips_finished_cases_and_redoes_only_missing_ones(sharded_run, predictor, monkeypatch):
    out, dataset = sharded_run.out, sharded_run.dataset
    before = read_csv(out / "cases" / "mni_001.csv")

    def no_session(*args, **kwargs):
        raise AssertionError("a finished case was evaluated again")

    monkeypatch.setattr(R, "SegmentationSession", no_session)
    again = evaluate_dataset(dataset, predictor, out, SETTINGS, model="tiny random")
    assert again.evaluated == [] and again.skipped == ["mni_000", "mni_001", "mni_002"]
    monkeypatch.undo()

    (out / "cases" / "mni_001.csv").unlink()
    redo = evaluate_dataset(dataset, predictor, out, SETTINGS, model="tiny random")
    assert redo.evaluated == ["mni_001"] and redo.skipped == ["mni_000", "mni_002"]
    after = read_csv(out / "cases" / "mni_001.csv")
    # every metric is seeded and deterministic; only the run's wall-clock column may differ
    def metrics_only(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert metrics_only(after) == metrics_only(before)
    with pytest.raises(MedSAM2Error, match="different evaluation"):
        evaluate_dataset(
            dataset, predictor, out, EvaluationSettings(PromptProtocol(prompt="box")), model="tiny random"
        )


# --------------------------------------------------------------------------------------- command line
def test_cli_click_prompts_on_one_case(mni_msd, predictor, tmp_path, capsys):
    out = tmp_path / "clicks"
    argv = [str(mni_msd), "--out", str(out), "--prompt", "points", "--positive-clicks", "2"]
    argv += ["--negative-clicks", "1", "--slice-choice", "largest", "--prompted-slices", "2"]
    argv += ["--label", "white matter", "--limit", "1", "--direction", "forward", "--stop-when-absent", "2"]
    argv += ["--quiet"]
    assert main(argv, predictor=predictor) == 0
    assert capsys.readouterr().out.strip() == f"summary: {out / 'summary.md'}"
    (row,) = read_csv(out / "metrics.csv")
    assert (row["case"], row["label"], row["status"]) == ("mni_000", "white matter", "ok")
    assert len(row["prompted_slices"].split()) == 2 and row["prompt"].count("points@") == 2
    assert row["prompt"].count("+(") == 4 and row["prompt"].count("-(") == 2
    assert json.loads((out / "run.json").read_text())["settings"]["protocol"]["prompt"] == "points"


def test_cli_medical_sam2_protocol_scores_the_first_quarter_per_slice(mni_msd, predictor, tmp_path):
    out = tmp_path / "msam2"
    argv = [str(mni_msd), "--out", str(out), "--protocol", "medical-sam2", "--limit", "1"]
    argv += ["--label", "grey matter", "--save-predictions", "--quiet"]
    assert main(argv, predictor=predictor) == 0
    (row,) = read_csv(out / "metrics.csv")
    assert row["prompted_slices"] == "0 2" and row["prompt"].count("box@") == 2  # every 2nd of slices 0..2
    dataset = open_dataset(mni_msd)
    case = dataset.load(dataset.cases[0])
    gt = case.label == 1
    prediction, _ = read_image(out / "predictions" / "mni_000" / "grey_matter.nii.gz", as_label=True)
    assert not prediction[3:].any()  # forward over the first quarter (12 labelled slices -> 0..2) only
    overlap = slice_overlap(prediction[:3], gt[:3], 0)
    assert float(row["per_slice_dice"]) == float(np.mean(overlap.dice(empty_value=1.0)))
    assert float(row["dice"]) == compute_metrics(prediction[:3], gt[:3], case.geometry.spacing).dice
    summary = (out / "summary.md").read_text()
    assert "| Per-slice Dice | Per-slice − volumetric |" in summary
    gap = float(row["per_slice_dice"]) - float(row["dice"])  # one case: the mean is the case
    assert f"± 0.000 | {gap:.3f} |" in summary
    assert "Medical-SAM2 paper (BTCV, 13 organs, per-slice Dice) (published; same protocol" in summary


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--label", "csf"], "unknown label 'csf'"),
        (["--protocol", "medical-sam2", "--rounds", "1"], "no interaction rounds"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--intensity", "sunset"], "unknown window preset"),
        (["--prompted-slices", "0"], "at least 1"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(mni_msd, predictor, tmp_path, capsys, extra, message):
    assert main([str(mni_msd), "--out", str(tmp_path / "o"), *extra], predictor=predictor) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsam2: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "metrics.csv").exists()


def test_cli_needs_a_model_and_an_existing_dataset(mni_msd, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--model", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(mni_msd), "--out", str(tmp_path / "o")]) == 2
    assert "no model given" in capsys.readouterr().err


def test_add_evaluate_parser_registers_the_subcommand(tmp_path):
    args = build_parser().parse_args(
        ["evaluate", "data", "--out", str(tmp_path), "--model", "MedSAM2_latest", "--rounds", "3"]
    )
    assert args.handler is run_evaluate and args.dataset == "data" and args.rounds == 3 and args.prompt == "mask"


def test_rank_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert D.rank_info() == D.RankInfo(2, 4, 0, False)
    cases = [SimpleNamespace(case_id=str(i)) for i in range(10)]
    assert [c.case_id for c in R.cases_for_rank(cases, 2, 4)] == ["2", "6"]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MedSAM2Error, match="outside"):
        D.rank_info()
