"""The CVPR 2025 interactive protocol (``--protocol cvpr25``): every step on constructed cases whose
right answer is known by hand (box, click position and sign, connectivity, tie-break, AUC, NSD rule),
the whole protocol through the runner with a scripted session, and the installed command end to end,
in one process and as two torchrun processes (which must give the same tables)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import integrate

from medsam2.errors import InvalidPromptError
from medsam2.evaluation import EvaluationSettings, PromptProtocol, evaluate_dataset, open_dataset
from medsam2.evaluation import cvpr25 as C
from medsam2.evaluation import cvpr25_protocol as CP
from medsam2.evaluation import runner as R
from medsam2.evaluation.columns import METRIC_COLUMNS, metric_columns
from medsam2.evaluation.surface_dice import surface_dice
from medsam2.io.tables import read_csv

TINY_21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
BIN = Path(sys.executable).parent


def cube(shape, *ranges):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in ranges)] = True
    return m


# ------------------------------------------------------------------------------------------- the box
def test_box_is_on_the_middle_present_slice_with_the_object_slice_range():
    gt = np.zeros((12, 40, 30), bool)
    for z in (2, 3, 4, 8, 9, 10):  # absent from 5-7: the middle of the extent (6) has no object
        gt[z, 5:10, 10:21] = True
    box = C.challenge_box(gt, 0, np.random.default_rng(0))
    # present[len // 2] = [2, 3, 4, 8, 9, 10][3]; a 40x30 slice moves no side (int(5 * 40 / 256) = 0)
    assert box == C.ChallengeBox(z_min=2, z_max=10, z_mid=8, row0=5, col0=10, row1=9, col1=20)
    assert box.prompt((40, 30)).box == (5, 10, 9, 20) and box.prompt((40, 30)).slice_index == 8


def test_box_sides_move_by_the_challenge_shift_scaled_to_the_slice_and_stay_inside():
    gt = np.zeros((3, 512, 512), bool)
    gt[1, 0:200, 50:61] = True
    for seed in range(6):
        shift = int(np.random.default_rng(seed).integers(0, 6))  # the same draw as the box's
        d = int(shift * 512 / 256)
        box = C.challenge_box(gt, 0, np.random.default_rng(seed))
        assert (box.row0, box.col0, box.row1, box.col1) == (0, 50 - d, 199 + d, 60 + d)  # row 0: clipped
    thin = np.zeros((2, 20, 20), bool)
    thin[0, 4, 3:9] = True  # one pixel high: SAM2 needs an area, so the prompt is widened by one pixel
    assert C.challenge_box(thin, 0, np.random.default_rng(0)).prompt((20, 20)).box == (4, 3, 5, 8)


# ------------------------------------------------------------------------------------------ the clicks
def test_missed_region_gets_a_positive_click_at_its_centre():
    gt = cube((14, 14, 14), (2, 10), (2, 10), (2, 10))
    pred = gt.copy()
    pred[2:5, 2:5, 2:5] = False  # a 3x3x3 miss: its centre is 2 voxels from its edge, all others 1
    assert C.error_click(pred, gt) == C.Click((3, 3, 3), True)
    edt = C.component_edt(~pred & gt)
    assert edt[3, 3, 3] == 2.0 and np.count_nonzero(edt == 2.0) == 1


def test_leak_larger_than_the_miss_gets_a_negative_click():
    gt = cube((14, 14, 14), (2, 10), (2, 10), (2, 10))
    pred = gt.copy()
    pred[2:4, 2:4, 2:4] = False  # 8 missed voxels
    pred[5:8, 10:13, 4:7] = True  # 27 leaked voxels outside the object
    assert C.error_click(pred, gt) == C.Click((6, 11, 5), False)


def test_error_components_are_26_connected():
    gt = np.zeros((12, 12, 12), bool)
    gt[2:4, 2:4, 2:4] = True
    gt[4:6, 4:6, 4:6] = True  # touches the first block at one corner only: one 16-voxel component
    pred = np.zeros_like(gt)
    pred[9, 0:3, 0:3] = True  # a 9-voxel leak: the largest component under 6- or 18-connectivity
    click = C.error_click(pred, gt)
    assert click is not None and click.positive
    # All 16 voxels tie (1 voxel from the edge); the challenge takes np.random.seed(42) then
    # np.random.choice over np.argwhere's order: reproduce exactly its calls here.
    tied = np.argwhere(gt)
    state = np.random.get_state()
    try:
        np.random.seed(42)
        expected = tuple(int(v) for v in tied[np.random.choice(len(tied))])
    finally:
        np.random.set_state(state)
    assert click.voxel == expected


def test_largest_error_component_is_the_one_connected_components_3d_picks():
    """The challenge labels errors with connected-components-3d (26-connected) and takes the argmax of
    the component sizes: on random errors, our component (hence the click) is the same."""
    cc3d = pytest.importorskip("cc3d", reason="connected-components-3d (the challenge's labeller) is not installed")
    rng = np.random.default_rng(42)
    for _ in range(40):
        shape = tuple(int(s) for s in rng.integers(4, 14, 3))
        gt, pred = rng.random(shape) < 0.3, rng.random(shape) < 0.3
        labels = cc3d.connected_components((pred != gt).astype(np.uint8), connectivity=26)
        sizes = np.bincount(labels.flat)
        sizes[0] = 0
        largest = labels == np.argmax(sizes)
        edt = C.component_edt(largest) * largest
        expected = C.sample_coord(edt if edt.any() else largest.astype(float))
        assert C.error_click(pred, gt) == C.Click(expected, bool(gt[expected]))


def test_large_error_regions_use_the_challenges_2x_downsampled_transform(monkeypatch):
    block = cube((20, 20, 20), (4, 12), (4, 12), (4, 12))  # 8^3, padded by 2 -> a 12^3 region
    full = C.component_edt(block)
    assert full.max() == 4.0 and np.count_nonzero(full == 4.0) == 8  # the 2x2x2 centre
    monkeypatch.setattr(C, "EDT_DOWNSAMPLE_VOXELS", 12**3 - 1)
    coarse = C.component_edt(block)
    # Block maxima give a 6^3 region whose middle 4^3 cells are the block; their transform (2 at the
    # inner 2^3 cells, in coarse voxels as the challenge leaves it) repeated 2x back: 4^3 voxels of 2.
    assert coarse.max() == 2.0 and np.argwhere(coarse == 2.0).min(axis=0).tolist() == [6, 6, 6]
    assert np.count_nonzero(coarse == 2.0) == 64 and not coarse[~block].any()


def test_image_edge_counts_as_the_error_boundary():
    gt = cube((10, 10, 10), (0, 3), (0, 3), (0, 3))  # in the image's corner
    click = C.error_click(np.zeros_like(gt), gt)
    # Were the edge not a boundary, the corner voxel (0, 0, 0) would be the farthest from the background.
    assert click == C.Click((1, 1, 1), True)


def test_single_voxel_error_and_exact_prediction():
    gt = cube((6, 6, 6), (1, 4), (1, 4), (1, 4))
    pred = gt.copy()
    pred[5, 0, 5] = True
    assert C.error_click(pred, gt) == C.Click((5, 0, 5), False)
    assert C.error_click(gt.copy(), gt) is None


def test_a_click_becomes_a_point_on_the_slice_it_falls_in():
    click = C.Click((4, 7, 9), True)
    assert click.prompt(0).slice_index == 4 and click.prompt(0).points == ((7, 9),)
    sagittal = C.Click((4, 7, 9), False).prompt(2)
    assert (sagittal.slice_index, sagittal.points, sagittal.labels) == (9, ((4, 7),), (0,))


# ------------------------------------------------------------------------------------------- scores
def test_auc_is_the_trapezoid_over_the_five_click_steps_only():
    steps = [0.9, 0.5, 0.6, 0.7, 0.8, 0.9]  # the box step (0.9) is left out
    assert C.auc(steps) == pytest.approx((0.5 + 0.9) / 2 + 0.6 + 0.7 + 0.8)
    assert C.auc(steps) == pytest.approx(integrate.cumulative_trapezoid(steps[-5:], np.arange(5))[-1])
    assert C.auc([1.0] * 6) == 4.0


def test_nsd_counts_only_above_dsc_0_2():
    assert C.challenge_nsd(0.2, 0.9) == 0.0 and C.challenge_nsd(0.2001, 0.9) == 0.9


def test_case_scores_average_the_structures_before_the_nsd_rule():
    def rows(label, dsc, nsd, seconds):
        return [
            {"case": "c", "label": label, "round": s, "status": "ok", "dice": d, "nsd_surface": n, "seconds": seconds}
            for s, (d, n) in enumerate(zip(dsc, nsd))
        ]

    a = rows("a", [0.1, 0.3, 0.5, 0.7, 0.9, 0.9], [0.5] * 6, 50.0)
    b = rows("b", [0.1, 0.0, 0.1, 0.1, 0.1, 0.1], [0.4] * 6, 100.0)
    (score,) = C.case_scores(a + b)
    assert score.dsc == pytest.approx((0.1, 0.15, 0.3, 0.4, 0.5, 0.5))
    assert score.nsd == pytest.approx((0.0, 0.0, 0.45, 0.45, 0.45, 0.45))  # 0 while the mean DSC <= 0.2
    assert score.dsc_auc == pytest.approx(0.15 / 2 + 0.3 + 0.4 + 0.5 + 0.5 / 2)
    assert score.nsd_auc == pytest.approx(0.0 / 2 + 0.45 + 0.45 + 0.45 + 0.45 / 2)
    assert (score.seconds, score.budget_s, score.within_budget) == (150.0, 180.0, True)


def test_protocol_options_are_checked():
    assert not CP.Cvpr25Protocol().uses_box("hepatic Vessel") and CP.Cvpr25Protocol().uses_box("liver")
    assert not CP.Cvpr25Protocol(no_box_labels=("liver",)).uses_box("liver")
    with pytest.raises(InvalidPromptError, match="clicks"):
        CP.Cvpr25Protocol(clicks=1)
    with pytest.raises(InvalidPromptError, match="CVPR 2025"):
        EvaluationSettings(PromptProtocol(rounds=2), cvpr25=CP.Cvpr25Protocol())


# ------------------------------------------------------------- the whole protocol, scripted session
KIDNEY = ((2, 10), (2, 10), (2, 10))
VESSEL = ((11, 14), (11, 14), (11, 14))
SHAPE = (16, 16, 16)


class ScriptedSession:
    """Stands in for SegmentationSession: each propagation returns the next scripted mask of the
    structure being evaluated, and every prompt is recorded."""

    instances: list = []
    script: dict = {}

    def __init__(self, predictor, volume, geometry=None, **kwargs):
        self.layout = SimpleNamespace(array_axis=0)
        self.num_slices = volume.shape[0]
        self.log: list = []
        self.queue: list = []
        ScriptedSession.instances.append(self)

    def reset(self):
        self.log.append("reset")
        self.queue = None  # chosen by the first prompt: the box (kidney) or a click (vessel)

    def _pick(self, name):
        if self.queue is None:
            self.queue = list(ScriptedSession.script[name])

    def add_box(self, obj, a, b):
        self._pick("kidney")
        self.log.append(("box", tuple(a), tuple(b)))

    def add_points(self, obj, points, labels):
        self._pick("vessel")
        self.log.append(("points", np.asarray(points).tolist(), list(labels)))

    def propagate(self, direction, slice_range=None, stop_when_absent=None, mode=None):
        self.log.append(("propagate", direction, slice_range))
        return SimpleNamespace(masks={1: self.queue.pop(0).astype(np.uint8)})


def test_whole_protocol_with_known_predictions(tmp_path, monkeypatch):
    label = np.zeros(SHAPE, np.uint8)
    label[cube(SHAPE, *KIDNEY)] = 1
    label[cube(SHAPE, *VESSEL)] = 2
    for folder, array in (("images", np.random.default_rng(0).random(SHAPE).astype(np.float32)), ("labels", label)):
        (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "data" / folder / "c1.nii.gz"))
    kidney = cube(SHAPE, *KIDNEY)
    step0 = kidney.copy()
    step0[2:5, 2:5, 2:5] = False  # the box's result misses a 3x3x3 corner -> +(3, 3, 3)
    step1 = kidney | cube(SHAPE, (5, 8), (10, 13), (4, 7))  # the miss fixed, a 3x3x3 leak -> -(6, 11, 5)
    step2 = kidney.copy()  # exact: no more clicks, no more propagations
    vessel = cube(SHAPE, *VESSEL)
    ScriptedSession.script = {"kidney": [step0, step1, step2], "vessel": [vessel]}
    ScriptedSession.instances = []
    monkeypatch.setattr(R, "SegmentationSession", ScriptedSession)

    dataset = open_dataset(tmp_path / "data", labels=["kidney=1", "vessel=2"])
    settings = EvaluationSettings(cvpr25=CP.Cvpr25Protocol(), tolerance_mm=2.0)
    evaluate_dataset(dataset, None, tmp_path / "out", settings)  # type: ignore[arg-type]

    log = ScriptedSession.instances[0].log
    # kidney: slices 2..9 -> middle present slice 6; box rows/cols 2..9 (a 16 px slice moves no side).
    # Points are given as (i, j, k): the voxel [k, j, i] = [3, 3, 3], then [6, 11, 5].
    assert log[: log.index("reset", 1)] == [
        "reset",
        ("box", (2.0, 2.0, 6.0), (9.0, 9.0, 6.0)),
        ("propagate", "both", (2, 9)),
        ("points", [[3.0, 3.0, 3.0]], [1]),
        ("propagate", "both", (2, 9)),
        ("points", [[5.0, 11.0, 6.0]], [0]),
        ("propagate", "both", (2, 9)),
    ]
    # vessel: no box (its name), so no slice limits; the first click is the object's centre.
    assert log[log.index("reset", 1) :] == [
        "reset",
        ("points", [[12.0, 12.0, 12.0]], [1]),
        ("propagate", "both", None),
    ]

    rows = read_csv(tmp_path / "out" / "cases" / "c1.csv")
    assert set(METRIC_COLUMNS + CP.EXTRA_FIELDS) <= set(rows[0])
    k = [r for r in rows if r["label"] == "kidney"]
    v = [r for r in rows if r["label"] == "vessel"]
    assert [r["step"] for r in k] == ["box", "click", "click", "no error", "no error", "no error"]
    assert [r["click"] for r in k[:3]] == ["", "+(3,3,3)", "-(6,11,5)"]
    d0, d1 = 2 * 485 / (512 + 485), 2 * 512 / (512 + 539)
    assert [float(r["dice"]) for r in k] == pytest.approx([d0, d1, 1, 1, 1, 1])
    nsd1 = surface_dice(step1, kidney, (1.0, 1.0, 1.0), 2.0)
    assert float(k[1]["nsd_surface"]) == pytest.approx(nsd1) and float(k[1]["nsd_challenge"]) == pytest.approx(nsd1)
    assert float(k[5]["dsc_auc"]) == pytest.approx((d1 + 1) / 2 + 3)
    assert float(k[5]["nsd_auc"]) == pytest.approx((nsd1 + 1) / 2 + 3)
    assert k[5]["within_budget"] == "True" and k[0]["dsc_auc"] == ""
    assert [r["step"] for r in v] == ["no box", "click"] + ["no error"] * 4
    assert [float(r["dice"]) for r in v] == [0, 1, 1, 1, 1, 1]
    assert float(v[0]["nsd_surface"]) == 0.0 and float(v[5]["dsc_auc"]) == 4.0

    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## CVPR 2025 interactive protocol" in summary
    case_dsc = [(d0 + 0) / 2, (d1 + 1) / 2, 1, 1, 1, 1]
    dsc_auc = C.auc(case_dsc)
    nsd_case = (nsd1 + 1) / 2  # both structures' NSD averaged: the mean DSC is above 0.2
    assert f"| this run | 1 | {dsc_auc:.3f} | {(nsd_case + 1) / 2 + 3:.3f} | 1.000 | 1.000 |" in summary
    assert f"| kidney | 1 | {d0:.3f} | {d1:.3f} | 1.000 |" in summary
    assert (tmp_path / "out" / "plots" / "cvpr25_dice_per_click.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------- the installed command, 1 and 2 ranks
def write_dataset(root: Path) -> Path:
    """Two cases, Decathlon layout: an ellipsoid "kidney" and a thin tube "vessel" (no box step)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    z, y, x = np.mgrid[0:6, 0:32, 0:32]  # few slices: propagating through them is the run time
    for n in range(2):
        label = np.zeros(z.shape, np.uint8)
        label[(z - 2.5) ** 2 / 4 + (y - 14 - n) ** 2 / 40 + (x - 16) ** 2 / 40 <= 1] = 1
        label[(np.abs(y - 25) <= 1) & (np.abs(x - 6 - n) <= 1) & (z >= 1) & (z <= 4)] = 2
        image = label.astype(np.float32) * 300 + np.random.default_rng(n).normal(0, 20, z.shape).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((1.5, 1.5, 3.0))
            sitk.WriteImage(img, str(root / folder / f"case{n}.nii.gz"))
        training.append({"image": f"./imagesTr/case{n}.nii.gz", "label": f"./labelsTr/case{n}.nii.gz"})
    meta = {"name": "toy", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "kidney", "2": "vessel"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory):
    """The same evaluation by the installed ``medsam2`` script (one process) and by
    ``torchrun --nproc-per-node 2 -m medsam2`` (two), on a random-weight checkpoint file."""
    import torch
    from checkpoint_factory import random_model, state_dict_of

    medsam2, torchrun = BIN / "medsam2", BIN / "torchrun"
    if not medsam2.is_file() or not torchrun.is_file():
        pytest.skip(f"the medsam2 and torchrun scripts are not installed beside {sys.executable}")
    root = tmp_path_factory.mktemp("cvpr25")
    data = write_dataset(root / "toy")
    checkpoint = root / "random.pt"
    torch.save({"model": state_dict_of(random_model(TINY_21, 0)), "random_weights": True}, checkpoint)
    args = ["evaluate", str(data), "--protocol", "cvpr25", "--checkpoint", str(checkpoint), "--config", TINY_21]
    args += ["--image-size", "128", "--device", "cpu", "--save-predictions", "--quiet"]
    # One thread per process in both runs (torchrun's default): the same arithmetic, so the same masks.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([str(medsam2), *args, "--out", str(root / "one")], capture_output=True, text=True, env=env)
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "medsam2", *args, "--out", str(root / "two")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    return SimpleNamespace(data=data, one=one, two=two, out1=root / "one", out2=root / "two")


def test_installed_command_writes_the_cvpr25_csvs_summary_and_plot(command_runs):
    run = command_runs.one
    assert run.returncode == 0, run.stderr[-2000:]
    out = command_runs.out1
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].startswith("**Random weights: these numbers mean nothing")
    assert "- Model weights: checkpoint=" in summary and "random.pt" in summary
    assert "| nsd_monai (2 mm) | nsd_surface (2 mm) | hd95_monai (mm) | hd95_surface (mm) |" in summary
    assert "### Case scores as the challenge computes them" in summary
    assert (out / "plots" / "cvpr25_dice_per_click.png").read_bytes()[:4] == b"\x89PNG"
    for case in ("case0", "case1"):
        rows = read_csv(out / "cases" / f"{case}.csv")
        assert set(METRIC_COLUMNS + CP.EXTRA_FIELDS) <= set(rows[0])
        for name, value in (("kidney", 1), ("vessel", 2)):
            mine = [r for r in rows if r["label"] == name]
            assert [int(r["round"]) for r in mine] == list(range(6))
            assert mine[0]["step"] == ("box" if name == "kidney" else "no box")
            # The CSV's final metrics are those of the saved final mask.
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / case / f"{name}.nii.gz")))
            gt = sitk.GetArrayFromImage(sitk.ReadImage(str(command_runs.data / "labelsTr" / f"{case}.nii.gz")))
            expected = metric_columns(pred, gt == value, (1.5, 1.5, 3.0), 2.0)
            for column in METRIC_COLUMNS:
                assert float(mine[5][column]) == pytest.approx(expected[column], abs=1e-12), (case, name, column)
            dsc = [float(r["dice"]) for r in mine]
            assert float(mine[5]["dsc_auc"]) == pytest.approx(C.auc(dsc))


TIME_COLUMNS = ("seconds", "step_seconds", "within_budget")


def _without_time(summary: str) -> str:
    """The summary less its time section (the only machine-dependent part)."""
    return re.sub(r"### Time \(this machine\).*?(?=\n## )", "", summary, flags=re.S)


def test_two_torchrun_processes_give_the_same_tables_as_one(command_runs):
    assert command_runs.two.returncode == 0, command_runs.two.stderr[-3000:]
    rows1 = read_csv(command_runs.out1 / "metrics.csv")
    rows2 = read_csv(command_runs.out2 / "metrics.csv")
    assert len(rows1) == 24  # 2 cases x 2 structures x 6 steps
    strip = [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows1]
    assert strip == [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows2]
    summary1 = (command_runs.out1 / "summary.md").read_text()
    summary2 = (command_runs.out2 / "summary.md").read_text()
    assert "### Time (this machine)" in summary1
    assert _without_time(summary1).replace(str(command_runs.out1), "") == _without_time(summary2).replace(
        str(command_runs.out2), ""
    )
    # Each rank evaluated one case: the run's manifest and both case files are in the shared folder.
    assert sorted(p.name for p in (command_runs.out2 / "cases").glob("*.csv") if ".slices" not in p.name) == [
        "case0.csv", "case1.csv"
    ]  # fmt: skip
