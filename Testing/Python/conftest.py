"""Shared fixtures: small random-weight SAM2 models built from the real sam2 configs, and real volumes.

Weights cannot be downloaded on CI machines, so models are the packaged sam2.1 tiny config at 128 px with
seeded random weights. They segment nothing meaningful, but they run every code path of the real
architecture, deterministically, in about a second per propagation on a CPU.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

# the console tests share their inputs through this plugin module; its asserts report like a test's
pytest.register_assert_rewrite("console_fixtures")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# sam2 warns once per process that its CUDA hole-filling extension is absent on CPU-only builds.
warnings.filterwarnings("ignore", message=".*cannot import name '_C' from 'sam2'.*")

TINY_21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
TEST_IMAGE_SIZE = 128


def always_absent(model):
    """A copy of ``model`` (a predictor) whose object score says "absent" on every tracked slice (prompted
    slices, e.g. mask prompts, stay present), so a direction ends where --stop-when-absent says."""
    import copy

    import torch

    absent = copy.deepcopy(model)
    with torch.no_grad():
        absent.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-50.0)
    return absent


@pytest.fixture(scope="session")
def tiny_predictor():
    from medsam2.models.build import build_predictor

    return build_predictor(TINY_21, image_size=TEST_IMAGE_SIZE, seed=0)


def mni_t1(resolution: int = 1) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """nilearn's MNI152 T1 template as a [k, j, i] float32 array with its spacing and LPS origin."""
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=resolution)
    data = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)  # (x,y,z) -> [k,j,i]
    affine = img.affine
    spacing = tuple(float(v) for v in np.abs(np.diag(affine)[:3]))
    origin_ras = affine[:3, 3]
    origin_lps = (-float(origin_ras[0]), -float(origin_ras[1]), float(origin_ras[2]))
    return data, spacing, origin_lps  # type: ignore[return-value]


@pytest.fixture(scope="session")
def mni_volume():
    return mni_t1(resolution=1)


# `medsam2 serve` as users start it (served.py): module-scoped, so each server test file gets its own.
from served import checkpoint, server, users_file  # noqa: E402, F401

# The server tests' model and phantom cases (server_cases.py), module-scoped too; a test module's own
# `predictor` or `cases` fixture takes precedence.
from server_cases import cases, predictor  # noqa: E402, F401
