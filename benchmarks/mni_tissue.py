"""A small Decathlon-layout dataset from nilearn's packaged MNI152 template and its tissue maps.

nilearn ships one subject (the MNI152 2009 template) with grey-matter and white-matter probability
maps. The "cases" are copies of that one subject: each an axial slab (its own first slice, so shifted
in z by up to 6 slices), shifted in plane by a few voxels, mirrored left-right on every other case, with its own
intensity scale, gamma and noise. Labels: 1 grey matter (map > 0.5), 2 white matter (map > 0.5).
They are not independent patients, and a score on them says how well a model learns this anatomy
under these perturbations, nothing about generalisation to other subjects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
SPACING_MM = 4.0  # the 2 mm template taken every other voxel: about 44 x 52 voxels in plane


def _write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((SPACING_MM,) * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def mni_tissue_cases(count: int, slices: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (image, label) pairs [k, j, i] of ``slices`` axial slices each (see the module notes)."""
    from nilearn import datasets

    template = np.asanyarray(datasets.load_mni152_template(resolution=2).dataobj).astype(np.float32)
    gm = np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj).astype(np.float32)
    wm = np.asanyarray(datasets.load_mni152_wm_template(resolution=2).dataobj).astype(np.float32)
    template, gm, wm = (v[::2, ::2, ::2] for v in (template, gm, wm))  # nibabel (i, j, k), 4 mm
    depth = template.shape[2]
    # Slab starts within a few slices of one another: every copy covers much the same anatomy, as the
    # cases of one organ's dataset do (a first version spread them from the skull base to the vertex,
    # and the held-in copies then showed anatomy the others never did).
    first_highest = min(18, depth - slices)
    first_lowest = max(0, first_highest - 6)
    rng = np.random.default_rng(seed)
    cases = []
    for n in range(count):
        k0 = int(round(first_lowest + (first_highest - first_lowest) * n / max(1, count - 1)))
        di, dj = (int(v) for v in rng.integers(-3, 4, size=2))
        flip = n % 2 == 1

        def cut(v: np.ndarray, k0: int = k0, di: int = di, dj: int = dj, flip: bool = flip) -> np.ndarray:
            v = np.roll(v, (di, dj), axis=(0, 1))[:, :, k0 : k0 + slices]
            v = v[::-1] if flip else v
            return np.ascontiguousarray(np.transpose(v, (2, 1, 0)))

        label = np.zeros(cut(template).shape, np.uint8)
        label[cut(gm) > 0.5] = 1
        label[cut(wm) > 0.5] = 2
        base = cut(template)
        base = base / max(float(base.max()), 1e-6)
        gamma = float(rng.uniform(0.8, 1.25))
        scale = float(rng.uniform(600, 1200))
        image = scale * base**gamma + rng.normal(0, 0.02 * scale, base.shape)
        cases.append((image.astype(np.float32), label))
    return cases


def build_mni_tissue(root: Path, count: int = 6, slices: int = 20, seed: int = 0) -> Path:
    """Write the cases as a Decathlon task folder (imagesTr, labelsTr, dataset.json) under ``root``."""
    training = []
    for n, (image, label) in enumerate(mni_tissue_cases(count, slices, seed)):
        case = f"mni_{n:03d}"
        _write(root / "imagesTr" / f"{case}.nii.gz", image)
        _write(root / "labelsTr" / f"{case}.nii.gz", label)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"name": "MNI152 tissue copies", "modality": {"0": "MRI"}, "labels": LABELS, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
