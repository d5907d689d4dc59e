"""Inputs for the console tests (``test_console_*.py``), built once per test session: one random-weight
checkpoint that describes itself (config and input size inside, so ``--checkpoint FILE`` is all a
command needs), small CT-like volumes on disk (NIfTI and a DICOM series) and a small labelled dataset;
and the checks every console test makes on what a command printed.

The volumes are a bright blob in darker tissue, 8 slices of 40 x 36 voxels, placed where the example
of ``medsam2 batch --help`` clicks, so that example runs as printed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_IMAGE_SIZE, TINY_21
from medsam2.geometry import VolumeGeometry

SHAPE = (8, 40, 36)  # k, j, i
SPACING = (2.0, 2.0, 4.0)  # i, j, k in mm
# LPS origins that put the volume around the help example's clicks (RAS -60,20,110 to -50,25,101 for
# the NIfTI cases, RAS 12.5,-30,40 for the DICOM case).
NIFTI_ORIGIN = (20.0, -59.0, 89.0)
DICOM_ORIGIN = (-47.5, -9.0, 26.0)
CENTRE_IJK = "18,20,4"
CENTRE_RAS = "-56,19,105"  # the same voxel in RAS mm


def blob_volume(seed: int = 0) -> np.ndarray:
    """Hounsfield-like int16: air-free soft tissue (-100) with a bright ellipsoid (+300), some noise."""
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    rng = np.random.default_rng(seed)
    inside = ((j - 20) / 9.0) ** 2 + ((i - 18) / 8.0) ** 2 + ((k - 4) / 5.0) ** 2 < 1.0
    values = np.where(inside, 300.0, -100.0) + rng.normal(0.0, 10.0, SHAPE)
    values[:, :, :3] = -1000.0  # a strip of air, so the volume reads as CT
    return values.astype(np.int16)


def blob_labels() -> np.ndarray:
    return (blob_volume() > 100).astype(np.uint8)


def write_nifti(path: Path, array: np.ndarray, origin: tuple[float, float, float] = NIFTI_ORIGIN) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom(folder: Path, origin: tuple[float, float, float] = DICOM_ORIGIN) -> Path:
    from dicom_factory import write_series

    write_series(folder, blob_volume().astype(np.float64), VolumeGeometry(SPACING, origin), modality="CT")
    return folder


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``medsam2: error: ...`` line a failed command prints (no traceback, no noise)."""
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert "error" in err, err
    return err


@pytest.fixture(scope="session")
def console_checkpoint(tiny_predictor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("console-model") / "tiny128.pt"
    torch.save({"model": tiny_predictor.state_dict(), "config": TINY_21, "image_size": TEST_IMAGE_SIZE}, path)
    return path


@pytest.fixture(scope="session")
def model_flags(console_checkpoint) -> list[str]:
    return ["--checkpoint", str(console_checkpoint), "--device", "cpu"]


@pytest.fixture(scope="session")
def ct_nifti(tmp_path_factory) -> Path:
    return write_nifti(tmp_path_factory.mktemp("console-ct") / "ct.nii.gz", blob_volume())


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory) -> Path:
    return write_dicom(tmp_path_factory.mktemp("console-dicom") / "series")


@pytest.fixture(scope="session")
def labelled_dataset(tmp_path_factory) -> Path:
    """Three cases in the images/ + labels/ layout, each blob shifted a little."""
    root = tmp_path_factory.mktemp("console-data") / "blobs"
    for n in range(3):
        image, labels = np.roll(blob_volume(seed=n), 2 * n, axis=2), np.roll(blob_labels(), 2 * n, axis=2)
        write_nifti(root / "images" / f"case{n}.nii.gz", image)
        write_nifti(root / "labels" / f"case{n}.nii.gz", labels)
    return root
