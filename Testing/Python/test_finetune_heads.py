"""SAM2-3dMed's training heads learn what they are for (issue 17), and torchrun follows one process.

Each head is trained alone on clips where its answer is learnable, and its loss must fall well below
the trivial baseline within a fixed number of steps: SRPP on slices whose features encode their
position in the volume (an anatomy-like blob that moves and grows from slice to slice), against the
loss of predicting a zero offset for every pair; BD on features that show a known object, against the
best constant (all-background) prediction. Then a two-process torchrun job on the CPU (gloo) gives the
same first-epoch losses as one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam2.finetune.heads import BoundaryHead, SRPPHead
from medsam2.finetune.losses import boundary_loss, boundary_targets, srpp_loss

REPO = Path(__file__).resolve().parents[2]
CLIP = 8
ZERO_OFFSET_LOSS = CLIP * (CLIP + 1) / 6  # mean (j - i)^2 over the ordered pairs of an 8-slice clip: 12


# ------------------------------------------------------------------------------------------ SRPP
def position_clips(rng: np.random.Generator, batch: int, channels: int = 16, size: int = 8) -> torch.Tensor:
    """(T, B, C, H, W) features of clips cut at random depths from a 40-slice "volume": a blob whose
    row, width and brightness follow the slice's depth, with a per-clip intensity scale and noise."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    # how each channel mixes blob and background: fixed, as an encoder's channels are
    mix = np.random.default_rng(7).normal(size=(channels, 2)).astype(np.float32)
    clips = np.zeros((CLIP, batch, channels, size, size), np.float32)
    for b in range(batch):
        start, scale = int(rng.integers(0, 40 - CLIP)), float(rng.uniform(0.7, 1.3))
        for t in range(CLIP):
            depth = (start + t) / 40.0
            centre, width = 1.0 + 5.0 * depth, 1.0 + 1.5 * depth
            blob = np.exp(-(((rows - centre) ** 2) + (cols - size / 2) ** 2) / (2 * width**2))
            maps = np.stack([blob, np.ones_like(blob)])  # (2, H, W)
            clips[t, b] = scale * np.einsum("ck,khw->chw", mix, maps)
    clips += rng.normal(0, 0.05, clips.shape).astype(np.float32)
    return torch.from_numpy(clips)


def test_srpp_head_alone_learns_slice_offsets_well_below_the_zero_offset_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = SRPPHead(feature_dim=16)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    held_out = position_clips(np.random.default_rng(99), batch=16)
    with torch.no_grad():
        before = float(srpp_loss(*head(held_out)))
        _, true = head(held_out)
    assert float((true**2).mean()) == pytest.approx(ZERO_OFFSET_LOSS)  # the baseline is what we think it is
    for _ in range(150):
        loss = srpp_loss(*head(position_clips(rng, batch=2)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted, true = head(held_out)
    after = float(srpp_loss(predicted, true))
    assert after < 0.15 * ZERO_OFFSET_LOSS, (before, after)
    # the order is right, not just the spread: the predicted offsets carry the sign of j - i
    assert float((torch.sign(predicted) == torch.sign(true)).float().mean()) > 0.95


def test_srpp_offsets_are_antisymmetric_and_in_slice_order():
    """The pair (j, i) is predicted as minus (i, j), and targets follow the clip's slice order."""
    head = SRPPHead(feature_dim=16)
    features = position_clips(np.random.default_rng(3), batch=1)
    with torch.no_grad():
        predicted, true = head(features)
        reversed_clip, _ = head(features.flip(0))  # the same slices read the other way round
    t = features.size(0)
    pairs = [(i, j) for i in range(t) for j in range(t) if i != j]
    assert [float(v) for v in true] == [float(j - i) for i, j in pairs]
    lookup = {pair: float(v) for pair, v in zip(pairs, predicted)}
    for i, j in pairs:
        assert lookup[(i, j)] == pytest.approx(-lookup[(j, i)], abs=1e-5)
    lookup_reversed = {pair: float(v) for pair, v in zip(pairs, reversed_clip)}
    assert lookup_reversed[(0, t - 1)] == pytest.approx(lookup[(t - 1, 0)], abs=1e-4)


# ------------------------------------------------------------------------------------------ BD
def boundary_batch(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Features of a random rectangle at strides 16, 8 and 4 (as SAM 2's levels are, 8x8 / 16x16 /
    32x32 for a 128 px input) with noise; returns (top level, [stride 4, stride 8], mask at stride 4)."""
    masks = torch.zeros(batch, 1, 32, 32)
    for b in range(batch):
        r0, c0 = (int(v) for v in rng.integers(2, 14, size=2))
        h, w = (int(v) for v in rng.integers(8, 16, size=2))
        masks[b, 0, r0 : r0 + h, c0 : c0 + w] = 1
    noise = torch.Generator().manual_seed(int(rng.integers(1 << 30)))

    def level(stride_factor: int, channels: int) -> torch.Tensor:
        m = F.avg_pool2d(masks, stride_factor) if stride_factor > 1 else masks
        signal = m.expand(-1, channels, -1, -1) * torch.linspace(-1, 1, channels)[None, :, None, None]
        return signal + 0.1 * torch.randn(signal.shape, generator=noise)

    return level(4, 32), [level(1, 8), level(2, 16)], masks


def boundary_f1(logits: torch.Tensor, band: torch.Tensor) -> float:
    pred, truth = logits > 0, band > 0.5
    tp = float((pred & truth).sum())
    return 2 * tp / max(1.0, 2 * tp + float((pred & ~truth).sum()) + float((~pred & truth).sum()))


def test_boundary_head_alone_finds_a_known_boundary_well_below_the_all_background_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = BoundaryHead(feature_dim=32, skip_channels=(8, 16))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    top, skips, masks = boundary_batch(np.random.default_rng(99), batch=16)
    band = boundary_targets(masks)
    # The best an all-background (constant) prediction can do under the class-balanced loss is logit 0.
    constant = min(float(boundary_loss(torch.full_like(band, v), band)) for v in (-4.0, -1.0, 0.0, 1.0))
    assert constant == pytest.approx(float(boundary_loss(torch.zeros_like(band), band)))
    assert boundary_f1(torch.full_like(band, -10.0), band) == 0.0
    for _ in range(120):
        t, s, m = boundary_batch(rng, batch=4)
        loss = boundary_loss(head(t, s), boundary_targets(m))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = head(top, skips)
    after = float(boundary_loss(logits, band))
    assert after < 0.5 * constant, (constant, after)
    # and the predicted band lies on the object's edge: far better than calling every pixel an edge
    # (class balancing trades precision for recall at the 0.5 threshold, so F1 is not near 1 here)
    everywhere = boundary_f1(torch.full_like(band, 10.0), band)
    assert boundary_f1(logits, band) > max(0.5, 2 * everywhere), everywhere


# ------------------------------------------------------------------------------------------ torchrun
def _no_dropout_config(tmp_path: Path) -> Path:
    """The packaged SAM 2.1 tiny config with memory attention's dropout off. Dropout masks are drawn
    per process: with them, one process of 2 clips and two of 1 clip differ by dropout noise, not by
    how the batch is shared out, which is what the comparison is about."""
    import sam2

    text = (Path(sam2.__file__).parent / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml").read_text()
    assert "dropout: 0.1" in text
    path = tmp_path / "sam2.1_hiera_t_nodropout.yaml"
    path.write_text(text.replace("dropout: 0.1", "dropout: 0.0"))
    return path


@pytest.fixture(scope="module")
def mni_tissue(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from mni_tissue import build_mni_tissue
    finally:
        sys.path.pop(0)
    return build_mni_tissue(tmp_path_factory.mktemp("mni") / "Task00_MNI", count=3, slices=10)


def _train(tmp_path: Path, dataset: Path, checkpoint: Path, name: str, processes: int, batch: int) -> dict:
    out = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedSAM2Slicer"), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [
        sys.executable, *(launcher if processes > 1 else []), "-m", "medsam2.cli.finetune",
        str(dataset), "--checkpoint", str(checkpoint), "--out", str(out), "--label", "white matter",
        "--epochs", "1", "--steps", "3", "--clip-length", "3", "--batch", str(batch), "--val-fraction", "0.34",
        "--lr", "5e-4", "--device", "cpu", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "history.json").read_text())


def test_torchrun_two_processes_give_the_losses_of_one_process_with_the_same_global_batch(tmp_path, mni_tissue):
    from medsam2.models.build import build_predictor

    config = _no_dropout_config(tmp_path)
    model = build_predictor(str(config), image_size=128, seed=0)
    checkpoint = tmp_path / "start.pt"
    torch.save({"model": model.state_dict(), "config": str(config), "image_size": 128}, checkpoint)

    one = _train(tmp_path, mni_tissue, checkpoint, "one", processes=1, batch=2)["train"]
    two = _train(tmp_path, mni_tissue, checkpoint, "two", processes=2, batch=1)["train"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("total", "seg", "srpp", "bd"):
            assert key in a and b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (key, a, b)
    # the heads learn at their own rate beside the model's (warm-up scales both alike)
    state = torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and [g["initial_lr"] for g in groups] == pytest.approx([5e-4, 1e-3])


def test_boundary_loss_is_class_balanced():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    edge = boundary_targets(mask)
    assert edge.sum() > 0 and edge[..., 16, 16] == 0 and edge[..., 8, 16] == 1
    perfect, inverted = edge * 20 - 10, (1 - edge) * 20 - 10
    assert boundary_loss(perfect, edge) < 1e-3 < boundary_loss(inverted, edge)
    # predicting "no boundary" everywhere is as bad as "boundary" everywhere: rare pixels weigh as much
    none, everywhere = torch.full_like(edge, -10.0), torch.full_like(edge, 10.0)
    assert boundary_loss(none, edge) == pytest.approx(float(boundary_loss(everywhere, edge)), rel=0.05)
