"""The engine's resize equals PIL's ``Image.resize`` of an 8-bit RGB frame (what sam2's frame loader and
MedSAM2's inference scripts call), on real slices, shrinking and enlarging, square and not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import mni_t1
from medsam2 import IntensityPreparation
from medsam2.preparation import SlicePreparer
from medsam2.resampling import resize_grey_levels


@pytest.fixture(scope="module")
def grey_slices() -> np.ndarray:
    data, _, _ = mni_t1(1)
    k = data.shape[0] // 2
    # a window that saturates part of the slice, where an unclipped bicubic overshoots most
    return np.uint8(np.clip((data[k - 3 : k + 3] - 0.3) / 0.5, 0.0, 1.0) * 255.0)


def _pil(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).convert("RGB").resize(size))[..., 0] for f in frames])


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, cols, size", [(233, 197, 128), (96, 80, 128), (233, 197, 512), (128, 100, 128)])
def test_matches_pil_bicubic(grey_slices, rows, cols, size, device):
    frames = torch.from_numpy(grey_slices[:, :rows, :cols]).float()[:, None].to(device)
    ours = resize_grey_levels(frames, size)[:, 0].cpu().numpy()
    frames = grey_slices[:, :rows, :cols]
    theirs = _pil(frames, (size, size)).astype(np.float32)
    differ = np.abs(ours - theirs)
    assert differ.max() <= 1.0, f"a pixel is {differ.max():g} grey levels off PIL"
    # one level off only where float and PIL's fixed point round a tie differently
    assert np.count_nonzero(differ) <= 1e-4 * differ.size, f"{np.count_nonzero(differ)} pixels differ"


def test_preparer_cuts_to_eight_bits_as_medsam2(grey_slices):
    hu = grey_slices[:, :117, :99].astype(np.float32) * 4.0 - 400.0  # -400..620 HU
    window = IntensityPreparation.window(1000.0, 100.0)
    prep = SlicePreparer(torch.from_numpy(hu), window, 128)
    expected = np.uint8((np.clip(hu, -400.0, 600.0) + 400.0) / 1000.0 * 255.0)  # MedSAM2's cast truncates
    levels = prep.grey_levels(list(range(len(hu)))).numpy()
    assert np.array_equal(levels, expected)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    model_input = prep([0, 1]).numpy()
    reference = (_pil(expected[:2], (128, 128))[:, None] / 255.0 - mean) / std
    assert model_input.shape == (2, 3, 128, 128)
    assert np.abs(model_input - reference).max() <= 1.0 / 255.0 / 0.224 + 1e-5  # one grey level at most
