"""A prompted slice always keeps its result: one-way propagation and --stop-when-absent with prompts on
several slices, run through the installed ``medsam2 segment`` command."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from console import run_medsam2

from conftest import TEST_IMAGE_SIZE, TINY_21, always_absent
from medsam2.models.build import save_checkpoint

SHAPE = (16, 40, 36)  # k, j, i
PROMPTED = (3, 12)


@pytest.fixture(scope="module")
def absent_checkpoint(tiny_predictor, tmp_path_factory):
    """A model whose object-score head says "absent" on every tracked slice, so --stop-when-absent
    ends each direction after K slices; prompted slices (mask prompts) are present by construction."""
    absent = always_absent(tiny_predictor)
    path = tmp_path_factory.mktemp("ckpt") / "absent128.pt"
    save_checkpoint(path, absent)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A blob volume and a label file painting the blob on two slices far apart."""
    folder = tmp_path_factory.mktemp("case")
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((j - 20) ** 2 + (i - 18) ** 2) < 64
    volume = np.where(blob, 800, -200).astype(np.int16) + (k * 3).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    for s in PROMPTED:
        labels[s][blob[s]] = 1
    for name, array in (("ct.nrrd", volume), ("painted.nrrd", labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / name))
    return folder


def segment(case, checkpoint, out, *extra):
    done = run_medsam2(
        "segment", case / "ct.nrrd", "-o", out, "--mask", case / "painted.nrrd",
        "--checkpoint", checkpoint, "--config", TINY_21, "--image-size", TEST_IMAGE_SIZE, "--device", "cpu",
        "--quiet", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


@pytest.mark.parametrize("direction", ["backward", "forward", "both"])
def test_one_way_propagation_keeps_every_prompted_slice(case, tiny_predictor, tmp_path, direction):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, tiny_predictor)
    mask = segment(case, checkpoint, tmp_path / "out.nii.gz", "--direction", direction)
    for s in PROMPTED:
        assert mask[s].any(), f"prompted slice {s} came back empty with --direction {direction}"
    if direction == "backward":  # backward from the last prompted slice: everything below it visited
        assert not mask[PROMPTED[1] + 1 :].any()


def test_stop_when_absent_resumes_at_the_next_prompted_slice(case, absent_checkpoint, tmp_path):
    mask = segment(case, absent_checkpoint, tmp_path / "out.nii.gz", "--stop-when-absent", "2")
    per_slice = mask.reshape(SHAPE[0], -1).any(axis=1)
    for s in PROMPTED:
        assert per_slice[s], f"prompted slice {s} was emptied by --stop-when-absent"
    # Each direction ends two absent slices after a prompted slice and stays empty until the next one.
    assert not per_slice[PROMPTED[0] + 3 : PROMPTED[1] - 2].any()
    assert not per_slice[PROMPTED[1] + 3 :].any() and not per_slice[: PROMPTED[0] - 2].any()
