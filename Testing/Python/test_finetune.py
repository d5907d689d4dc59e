"""Fine-tuning (issue 8) on the CPU: real volumes cut from nilearn's MNI152 template with its white-matter
map as the label, the random-weight SAM 2.1 tiny model at 128 px as the starting model.

One short run (one epoch, then a resume for a second) is shared by the tests that need a trained model:
the loss falls, validation Dice rises above the starting model's, the resume continues the same run,
the exported checkpoint loads in the engine and segments, the frozen encoder is untouched. The other
tests check contracts without training: the data checks, Slicer .seg.nrrd labels, batches, the heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medsam2.cli.finetune import main
from medsam2.datasets.training import open_training_dataset, split_cases
from medsam2.errors import InvalidVolumeError, MedSAM2Error
from medsam2.evaluation import EvaluationSettings, PromptProtocol
from medsam2.finetune import FinetuneSettings
from medsam2.finetune.data import CaseStore, resize_masks
from medsam2.finetune.forward import FinetuneModel
from medsam2.finetune.heads import boundary_head_for, srpp_head_for
from medsam2.finetune.losses import LossWeights
from medsam2.finetune.sampler import ClipSampler
from medsam2.finetune.validation import validate
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import IntensityPreparation
from medsam2.io.seg_nrrd import write_seg_nrrd
from medsam2.io.segments import Segment
from medsam2.models.build import build_predictor
from medsam2.session import SegmentationSession

TINY_21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
SIZE = 128
N_SLICES = 10
WM = "white matter"
STEPS = 12  # optimizer steps per epoch of the shared run
COMMON = ["--label", WM, "--clip-length", "4", "--lr", "1e-3", "--val-fraction", "0.34", "--device", "cpu"]
COMMON += ["--steps", str(STEPS), "--quiet"]
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ data
def write_volume(path: Path, array: np.ndarray, spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def mni_cases(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) pairs [k, j, i]: different axial slabs of the MNI152 template at 4 mm, every other one
    mirrored, each with its own intensity scale and noise; labels 1 grey matter, 2 white matter."""
    from nilearn import datasets

    template = np.asanyarray(datasets.load_mni152_template(resolution=2).dataobj).astype(np.float32)
    gm = np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj)
    wm = np.asanyarray(datasets.load_mni152_wm_template(resolution=2).dataobj)
    rng = np.random.default_rng(0)
    cases = []
    for n in range(count):
        k0, flip = 16 + 3 * n, n % 2 == 1

        def cut(v, k0=k0, flip=flip):
            v = v[::2, ::2, ::2][3:47, 4:54, k0 : k0 + N_SLICES]  # nibabel (i, j, k)
            v = v[::-1] if flip else v
            return np.ascontiguousarray(np.transpose(v, (2, 1, 0)))

        label = np.zeros(cut(template).shape, np.uint8)
        label[cut(gm) > 0.5] = 1
        label[cut(wm) > 0.5] = 2
        image = cut(template) * (800 + 100 * n) + rng.normal(0, 5, label.shape)
        cases.append((image.astype(np.float32), label))
    return cases


def build_msd(root: Path, cases: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    training = []
    for n, (image, label) in enumerate(cases):
        case = f"mni_{n:03d}"
        write_volume(root / "imagesTr" / f"{case}.nii.gz", image)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": "MNI152 tissue",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "grey matter", "2": WM},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def cases():
    return mni_cases(6)


@pytest.fixture(scope="module")
def mni(tmp_path_factory, cases) -> Path:
    return build_msd(tmp_path_factory.mktemp("ft") / "Task00_MNI", cases)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> Path:
    """The random-weight model as a self-describing checkpoint (config and input size inside)."""
    model = build_predictor(TINY_21, image_size=SIZE, seed=0)
    path = tmp_path_factory.mktemp("start") / "start.pt"
    torch.save({"model": model.state_dict(), "config": TINY_21, "image_size": SIZE}, path)
    return path


def axial(geometry: VolumeGeometry) -> SliceLayout:
    return SliceLayout.for_axis(geometry.voxel_axis_for_view("axial"), geometry)


# ------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def trained(mni, start_checkpoint, tmp_path_factory):
    """``medsam2 finetune`` for one epoch, then ``--resume`` with ``--epochs 2``."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = [str(mni), "--checkpoint", str(start_checkpoint), "--out", str(out), *COMMON]
    first = main([*args, "--epochs", "1"])
    after_first = {
        "history": json.loads((out / "history.json").read_text()),
        "state": torch.load(out / "train_state.pt", weights_only=True),
    }
    second = main([*args, "--epochs", "2", "--resume"])
    return SimpleNamespace(
        out=out,
        args=args,
        codes=(first, second),
        first=after_first,
        history=json.loads((out / "history.json").read_text()),
        state=torch.load(out / "train_state.pt", weights_only=True),
    )


def test_training_reduces_the_loss_and_beats_the_starting_model(trained):
    assert trained.codes == (0, 0)
    losses = [r["total"] for r in trained.history["train"]]
    assert len(losses) == 2 * STEPS and all(np.isfinite(losses))
    start, end = np.mean(losses[:4]), np.mean(losses[-4:])
    assert end < 0.75 * start, (start, end)
    val = trained.history["validation"]
    assert [r["epoch"] for r in val] == [0, 1, 2]
    baseline, best = val[0]["dice"], max(r["dice"] for r in val[1:])
    assert all(r["scored"] == 2 for r in val)  # both held-out cases scored every time
    assert best > baseline + 0.15, (baseline, best)
    assert (trained.out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_the_saved_run(trained):
    first_train = trained.first["history"]["train"]
    assert trained.first["state"]["step"] == STEPS and len(first_train) == STEPS
    train = trained.history["train"]
    assert [r["step"] for r in train] == list(range(1, 2 * STEPS + 1))
    assert train[:STEPS] == first_train  # the saved losses are kept, not recomputed
    # epoch 0 (starting model) and 1 come from the first run; the resume adds epoch 2 only
    assert trained.history["validation"][:2] == trained.first["history"]["validation"]
    state = trained.state
    assert state["step"] == 2 * STEPS and state["epoch"] == 2
    # the optimizer and scheduler carried on: AdamW's per-parameter step counts and the schedule's
    # position are the totals of both runs (they would restart from 0 had the resume started afresh).
    # (A parameter counts only the steps that gave it a gradient: the mask downsampler, say, only
    # learns from mask prompts.)
    before = {k: float(v["step"]) for k, v in trained.first["state"]["optimizer"]["state"].items()}
    after = {k: float(v["step"]) for k, v in state["optimizer"]["state"].items()}
    always = [k for k, n in before.items() if n == STEPS]
    assert always and all(after[k] == 2 * STEPS for k in always)
    assert all(after[k] >= n for k, n in before.items())
    assert state["scheduler"]["last_epoch"] == 2 * STEPS
    assert trained.first["state"]["rng"]["numpy"] != state["rng"]["numpy"]


def test_exported_checkpoint_loads_in_the_engine_and_segments(trained, cases):
    from medsam2.models.registry import load_model

    best = trained.out / "best.pt"
    raw = torch.load(best, weights_only=True)
    assert set(raw) == {"model", "config", "image_size", "intensity"}
    assert not any(k.startswith(("srpp", "boundary", "sam.")) for k in raw["model"])  # heads excluded
    predictor, entry = load_model(checkpoint=best)  # no config or size given: the file says
    assert (entry.config, entry.image_size, entry.intensity_spec) == (TINY_21, SIZE, "minmax")

    # the loaded model scores what training recorded for it on the held-out cases
    dataset = open_training_dataset(trained.args[0], labels=[WM])
    split = json.loads((trained.out / "split.json").read_text())
    settings = EvaluationSettings(PromptProtocol(prompt="box", slice_choice="middle"), intensity="minmax")
    result = validate(predictor, dataset, split["validation"], settings)
    best_recorded = max(r["dice"] for r in trained.history["validation"][1:])
    assert result.mean == pytest.approx(best_recorded, abs=1e-4)

    # and segments a volume through the ordinary session
    n = int(split["validation"][0].split("_")[1])
    image, label = cases[n]
    gt = label == 2
    session = SegmentationSession(predictor, image, intensity=entry.intensity)
    k = N_SLICES // 2
    rows, cols = np.nonzero(gt[k])
    session.add_box(1, (cols.min(), rows.min(), k), (cols.max(), rows.max(), k))
    mask = session.propagate().masks[1].astype(bool)
    dice = 2 * (mask & gt).sum() / (mask.sum() + gt.sum())
    assert dice > trained.history["validation"][0]["dice"]


def test_frozen_encoder_is_unchanged_and_the_rest_is_trained(trained, start_checkpoint):
    start = torch.load(start_checkpoint, weights_only=True)["model"]
    final = torch.load(trained.out / "model.pt", weights_only=True)["model"]
    encoder = [k for k in start if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(start[k], final[k]) for k in encoder)
    for prefix in ("sam_mask_decoder.", "memory_attention.", "memory_encoder.", "sam_prompt_encoder."):
        keys = [k for k in start if k.startswith(prefix) and start[k].is_floating_point()]
        assert any(not torch.equal(start[k], final[k]) for k in keys), prefix


def test_a_finished_folder_is_never_overwritten_and_resume_must_match(trained, capsys):
    before = (trained.out / "train_state.pt").stat().st_mtime_ns
    assert main([*trained.args, "--epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*trained.args, "--epochs", "2", "--resume", "--clip-length", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "clip_length" in err and len(err.splitlines()) == 1
    assert (trained.out / "train_state.pt").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------ bad data
def _corrupt_shape(root: Path) -> str:
    write_volume(root / "labelsTr" / "mni_001.nii.gz", np.ones((N_SLICES, 20, 20), np.uint8))
    return "labelsTr/mni_001.nii.gz"


def _corrupt_empty(root: Path) -> str:
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "mni_002.nii.gz")))
    write_volume(root / "labelsTr" / "mni_002.nii.gz", np.zeros_like(label))
    return "labelsTr/mni_002.nii.gz"


def _corrupt_value(root: Path) -> str:
    path = root / "labelsTr" / "mni_000.nii.gz"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    label[label == 1] = 7  # dataset.json describes 0, 1 and 2 only
    write_volume(path, label)
    return "labelsTr/mni_000.nii.gz"


@pytest.mark.parametrize(
    "corrupt, words",
    [(_corrupt_shape, "shape"), (_corrupt_empty, "empty"), (_corrupt_value, "value(s) 7")],
    ids=["shape-mismatch", "empty-label", "undescribed-value"],
)
def test_bad_data_is_reported_with_the_file_before_training(tmp_path, cases, start_checkpoint, capsys, corrupt, words):
    root = build_msd(tmp_path / "bad", cases[:3])
    shown = corrupt(root)
    out = tmp_path / "out"
    code = main([str(root), "--checkpoint", str(start_checkpoint), "--out", str(out), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and shown in err and words in err, err
    assert not any(out.glob("*.pt"))  # nothing was trained or written


def test_interrupted_run_is_saved_and_resumes_mid_epoch(tmp_path, mni, monkeypatch):
    """Ctrl+C during an epoch keeps the finished steps; --resume goes on from the very next one."""
    from medsam2.finetune import finetune
    from medsam2.finetune.sampler import ClipSampler as Sampler

    settings = FinetuneSettings(
        str(mni), str(tmp_path / "out"), config=TINY_21, labels=(WM,), clip_length=3, epochs=1, steps=3,
        val_fraction=0.0, device="cpu", quiet=True,
    )  # fmt: skip
    drawn = []
    original = Sampler.next_batch

    def interrupt_third(self):
        drawn.append(1)
        if len(drawn) == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Sampler, "next_batch", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        finetune(settings, predictor=build_predictor(TINY_21, image_size=SIZE, seed=0))
    saved = torch.load(tmp_path / "out" / "train_state.pt", weights_only=True)
    assert saved["step"] == 2 and [r["step"] for r in saved["history"]["train"]] == [1, 2]
    assert not (tmp_path / "out" / "model.pt").exists()  # no epoch finished, so no model yet

    monkeypatch.setattr(Sampler, "next_batch", original)
    result = finetune(settings, resume=True, predictor=build_predictor(TINY_21, image_size=SIZE, seed=0))
    assert result.step == 3 and [r["step"] for r in result.history["train"]] == [1, 2, 3]
    assert result.history["train"][:2] == saved["history"]["train"]
    assert result.model_path.is_file() and result.best_path is None  # no validation cases, no "best"


def test_cli_errors_are_one_line(tmp_path, mni, capsys):
    assert main([str(mni), "--out", str(tmp_path / "o"), "--quiet"]) == 3  # no model
    assert "--model" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.pt").write_bytes(b"the user's own file")
    assert main([str(mni), "--checkpoint", "x.pt", "--out", str(busy), "--quiet"]) == 2
    assert "other files" in capsys.readouterr().err
    assert (busy / "model.pt").read_bytes() == b"the user's own file"
    args = [str(mni), "--checkpoint", "x.pt", "--out", str(tmp_path / "o")]
    assert main([*args, "--mode", "2d", "--srpp-weight", "0.01"]) == 2
    assert "2D" in capsys.readouterr().err
    assert main([*args, "--lr", "0"]) == 2
    assert "learning rate" in capsys.readouterr().err


def test_medsam2_command_offers_finetune(tmp_path, mni, capsys):
    from medsam2.cli import main as medsam2_main

    assert medsam2_main(["finetune", str(mni), "--out", str(tmp_path / "o"), "--quiet"]) == 3  # no model
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsam2: error:") and "--model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ data
def test_split_is_seeded_disjoint_and_complete():
    ids = [f"c{n}" for n in range(10)]
    train, val = split_cases(ids, 0.2, seed=3)
    assert (train, val) == split_cases(list(reversed(ids)), 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert split_cases(ids, 0.2, seed=4) != (train, val)
    with pytest.raises(InvalidVolumeError, match="--val-fraction 0"):
        split_cases(["only"], 0.2, seed=0)


def test_seg_nrrd_labels_exported_from_slicer(tmp_path, cases):
    """Segments by name, overlapping segments (layers) kept apart, a cropped extent placed back on the
    image grid, and a value no segment describes refused with the file's name."""
    root = tmp_path / "slicer"
    geometry = VolumeGeometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    image, label = cases[0]
    write_volume(root / "images" / "a.nii.gz", image)
    write_volume(root / "images" / "b.nii.gz", cases[1][0])
    wm, gm = label == 2, label == 1
    blob = np.zeros_like(wm)
    blob[3:6, 10:30, 10:30] = True  # overlaps both tissues: a second layer
    (root / "labels").mkdir()
    write_seg_nrrd(
        root / "labels" / "a.seg.nrrd",
        [Segment(wm, WM), Segment(gm, "grey matter"), Segment(blob, "lesion")],
        geometry,
    )
    # b: saved on a sub-extent (slices 2..7, rows 5.., columns 3..), as a cropped Slicer export
    wm_b = cases[1][1] == 2
    crop = wm_b[2:8, 5:, 3:]
    write_seg_nrrd(
        root / "labels" / "b.seg.nrrd", [Segment(crop, WM)], VolumeGeometry((4.0, 4.0, 4.0), (12.0, 20.0, 8.0))
    )

    dataset = open_training_dataset(root, labels=[WM, "lesion"])
    index = dataset.check(axial, IntensityPreparation())
    a = dataset.load(dataset.record("a"))
    assert set(a.structures) == {WM, "lesion"}
    assert np.array_equal(a.structures[WM], wm) and np.array_equal(a.structures["lesion"], blob)
    b = dataset.load(dataset.record("b"))
    expected = np.zeros_like(wm_b)
    expected[2:8, 5:, 3:] = crop
    assert np.array_equal(b.structures[WM], expected) and not b.structures["lesion"].any()
    assert index["b"].present[WM] == tuple(range(2, 8)) and index["b"].present["lesion"] == ()

    with pytest.raises(InvalidVolumeError, match=r"named 'lesoin'; segments found: grey matter, lesion"):
        open_training_dataset(root, labels=["lesoin"]).check(axial, IntensityPreparation())

    # a voxel value that no segment in the header names
    path = root / "labels" / "a.seg.nrrd"
    seg = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(seg)
    array[0, 0, 0] = 9
    bad = sitk.GetImageFromArray(array, isVector=True)
    bad.CopyInformation(seg)
    for key in seg.GetMetaDataKeys():
        bad.SetMetaData(key, seg.GetMetaData(key))
    sitk.WriteImage(bad, str(path))
    with pytest.raises(InvalidVolumeError, match=r"labels/a\.seg\.nrrd holds value\(s\) 9"):
        open_training_dataset(root).check(axial, IntensityPreparation())


def test_batches_are_prepared_as_inference_sees_them(mni, cases):
    from medsam2.finetune.data import SlicePreparer  # the session's preparer, wherever the engine keeps it

    dataset = open_training_dataset(mni, labels=[WM])
    index = dataset.check(axial, IntensityPreparation())
    store = CaseStore(dataset, axial, IntensityPreparation(), SIZE, torch.device("cpu"))
    rng = np.random.default_rng(0)
    sampler = ClipSampler(
        store, index, ["mni_000", "mni_001"], mode="3d", clip_length=5, prompt_slices=2,
        prompt_kinds=("box",), batch_size=2, rng=rng,
    )  # fmt: skip
    batch = sampler.next_batch()
    seen = {case_id for case_id, _ in batch.keys}
    assert batch.images.shape == (10, 3, SIZE, SIZE) and batch.targets.shape == (5, 2, 1, SIZE, SIZE)
    assert len(batch.prompt_frames) == 2 and batch.prompt_kind == "box"

    def truth(case_id):  # the volume as written; axial slices of an identity-direction grid are its k planes
        image, label = cases[int(case_id.split("_")[1])]
        return SlicePreparer(torch.from_numpy(image), IntensityPreparation(), SIZE), label == 2

    for t in range(5):
        for b in range(2):
            case_id, s = batch.keys[t * 2 + b]
            preparer, gt = truth(case_id)
            # what a SegmentationSession feeds the model for that slice, and the ground truth at its size
            assert torch.equal(batch.images[t * 2 + b], preparer([s])[0])
            assert torch.equal(batch.targets[t, b], resize_masks(torch.from_numpy(gt[[s]]), SIZE)[0])
    for p in batch.prompt_frames:
        points = batch.point_inputs[p]
        assert points["point_labels"].tolist() == [[2, 3], [2, 3]]
        for b in range(2):
            case_id, s = batch.keys[p * 2 + b]
            mask = truth(case_id)[1][s]
            rows, cols = np.nonzero(mask)
            h, w = mask.shape
            box = points["point_coords"][b].numpy() / [SIZE / w, SIZE / h]  # back to slice pixels (x, y)
            jitter = 0.1 * max(np.ptp(rows) + 1, np.ptp(cols) + 1) + 0.5
            assert np.allclose(box, [[cols.min(), rows.min()], [cols.max(), rows.max()]], atol=jitter)

    two_d = ClipSampler(
        store, index, ["mni_000"], mode="2d", clip_length=8, prompt_slices=1,
        prompt_kinds=("points",), batch_size=3, rng=rng,
    )  # fmt: skip
    batch = two_d.next_batch()
    seen |= {case_id for case_id, _ in batch.keys}
    assert batch.num_frames == 1 and batch.batch_size == 3 and batch.prompt_frames == (0,)
    coords, labels = batch.point_inputs[0]["point_coords"], batch.point_inputs[0]["point_labels"]
    for b in range(3):
        _, s = batch.keys[b]
        mask = resize_masks(torch.from_numpy(truth("mni_000")[1][[s]]), SIZE)[0, 0]
        positives = coords[b][labels[b] == 1].round().long()
        assert len(positives) >= 1 and all(mask[y, x] for x, y in positives.tolist())  # clicks on the object
    assert store.loads == len(seen)  # each case decoded once, however many clips it gave


def test_processing_order_follows_inference():
    order = FinetuneModel.processing_order(6, (2,))
    assert order == [(2, False), (3, False), (4, False), (5, False), (1, True), (0, True)]
    assert FinetuneModel.processing_order(6, (1, 4)) == [
        (1, False), (4, False), (2, False), (3, False), (5, False), (0, True),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ heads
def test_srpp_and_bd_change_the_loss_and_their_gradients_reach_the_heads(mni):
    dataset = open_training_dataset(mni, labels=[WM])
    index = dataset.check(axial, IntensityPreparation())
    store = CaseStore(dataset, axial, IntensityPreparation(), SIZE, torch.device("cpu"))
    sampler = ClipSampler(
        store, index, ["mni_000"], mode="3d", clip_length=3, prompt_slices=1,
        prompt_kinds=("box",), batch_size=1, rng=np.random.default_rng(1),
    )  # fmt: skip
    batch = sampler.next_batch()
    sam = build_predictor(TINY_21, image_size=SIZE, seed=0)
    weights = LossWeights()
    plain = FinetuneModel(sam, weights).train()
    torch.manual_seed(0)  # the same dropout masks in every forward below
    base = plain(batch)
    assert "srpp" not in base and "bd" not in base
    grads_plain = _grads(plain, base["total"])

    for name, kwargs in (("srpp", {"srpp": srpp_head_for(sam)}), ("bd", {"boundary": boundary_head_for(sam)})):
        model = FinetuneModel(sam, weights, **kwargs).train()
        torch.manual_seed(0)
        losses = model(batch)
        assert torch.allclose(losses["seg"], base["seg"])  # the segmentation part is the same...
        aux = losses[name]
        assert aux > 0
        weight = weights.srpp if name == "srpp" else weights.bd
        assert torch.allclose(losses["total"], base["total"] + weight * aux)  # ...and the head adds to it
        grads = _grads(model, losses["total"])
        head = model.srpp if name == "srpp" else model.boundary
        assert head is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        # its gradient also reaches SAM 2's trainable modules: memory attention (BD reads the memory-
        # conditioned features), the decoder's stride-8 projection (SRPP reads the slice's own features)
        key = "sam.memory_attention.layers.0.linear1.weight" if name == "bd" else "sam.sam_mask_decoder.conv_s1.weight"
        assert not torch.allclose(grads[key], grads_plain[key])
        for p in model.parameters():
            p.grad = None


def test_2d_mode_trains_single_slices_without_memory(mni):
    dataset = open_training_dataset(mni, labels=[WM])
    index = dataset.check(axial, IntensityPreparation())
    store = CaseStore(dataset, axial, IntensityPreparation(), SIZE, torch.device("cpu"))
    sampler = ClipSampler(
        store, index, ["mni_000", "mni_001"], mode="2d", clip_length=8, prompt_slices=1,
        prompt_kinds=("box", "points"), batch_size=2, rng=np.random.default_rng(2),
    )  # fmt: skip
    sam = build_predictor(TINY_21, image_size=SIZE, seed=0)
    model = FinetuneModel(sam, LossWeights(), srpp=None, boundary=boundary_head_for(sam)).train()
    losses = model(sampler.next_batch())
    assert "srpp" not in losses and all(torch.isfinite(v) for v in losses.values())
    grads = _grads(model, losses["total"])
    assert any(k.startswith("sam.sam_mask_decoder.") for k in grads)
    assert not any(k.startswith(("sam.memory_encoder.", "sam.image_encoder.")) for k in grads)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_best_model_keeps_its_weights_when_the_latest_is_rewritten(tmp_path):
    from medsam2.finetune.export import export_checkpoint, keep_copy

    layer = torch.nn.Linear(2, 2)
    meta = {"config": TINY_21, "image_size": SIZE, "intensity": "minmax"}
    export_checkpoint(tmp_path / "model.pt", layer, **meta)
    keep_copy(tmp_path / "model.pt", tmp_path / "best.pt")
    kept = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    export_checkpoint(tmp_path / "model.pt", layer, **meta)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    latest = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(best["model"]["weight"], kept["weight"]) and best["config"] == TINY_21
    assert torch.equal(latest["model"]["weight"], kept["weight"] + 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "model.pt"]  # no temporary left


def test_gradient_accumulation_averages_micro_batches_into_one_step():
    from contextlib import nullcontext

    from medsam2.finetune.trainer import _optimizer_step

    weight = torch.nn.Parameter(torch.tensor([2.0]))

    class Engine(torch.nn.Module):  # loss of micro-batch b: b * w (gradient b)
        def forward(self, b):
            total = b * weight.sum()
            return {"total": total, "seg": total}

    class Batches:
        def __init__(self):
            self.values = iter([1.0, 3.0])

        def next_batch(self):
            return next(self.values)

    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = FinetuneSettings("d", "o", accumulate=2, grad_clip=0.0)
    record = _optimizer_step(Engine(), Batches(), optimizer, scheduler, [weight], settings, nullcontext(), False)
    assert weight.item() == pytest.approx(2.0 - 2.0)  # one step with the mean gradient (1 + 3) / 2
    assert record["total"] == pytest.approx((1.0 * 2 + 3.0 * 2) / 2) and record["lr"] == 1.0
    assert scheduler.last_epoch == 1 and weight.grad is None  # stepped once, gradients cleared


def test_settings_defaults_follow_the_notes():
    three = FinetuneSettings("d", "o", mode="3d")
    two = FinetuneSettings("d", "o", mode="2d")
    assert three.effective_srpp_weight == 0.01 and three.bd_weight == 0.1
    assert two.effective_srpp_weight == 0.0 and two.prompt_kinds == ("box", "points")
    with pytest.raises(MedSAM2Error, match="2D"):
        FinetuneSettings("d", "o", mode="2d", srpp_weight=0.5)
    with pytest.raises(MedSAM2Error, match="box, points"):
        FinetuneSettings("d", "o", mode="2d", prompts=("mask",))
    with pytest.raises(MedSAM2Error, match="window"):
        FinetuneSettings("d", "o", intensity="400,x")


# ------------------------------------------------------------------------------------------ torchrun
def test_torchrun_two_processes_train_with_no_change(tmp_path, mni, start_checkpoint):
    """The same command under torchrun (2 CPU processes, gloo): one result, gradients averaged."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedSAM2Slicer")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "medsam2.cli.finetune", str(mni), "--checkpoint", str(start_checkpoint),
        "--out", str(out), "--label", WM, "--epochs", "1", "--steps", "2", "--clip-length", "3",
        "--val-fraction", "0.34", "--device", "cpu", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 1 and answers[0]["ok"] and answers[0]["step"] == 2
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["rng"]["world_size"] == 2 and len(state["rng"]["numpy"]) == 2
    assert [r["scored"] for r in state["history"]["validation"]] == [2, 2]  # one case per process, summed
    from medsam2.models.registry import load_model

    load_model(checkpoint=out / "model.pt")
