"""``medsam2 models list``, ``medsam2 models verify --checkpoint`` and ``medsam2 demo --random-weights``
through the installed console script (offline: HF_HUB_OFFLINE=1, an empty model cache)."""

from __future__ import annotations

import json

import numpy as np
from console import run_medsam2
from PIL import Image

from conftest import TEST_IMAGE_SIZE, TINY_21
from medsam2.models import catalogue

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests


def test_models_list_shows_the_catalogue(tmp_path):
    cache = tmp_path / "empty-cache"
    table = run_medsam2("models", "list", "--cache-dir", cache)
    assert table.returncode == 0, table.stderr
    names = [entry.name for entry in catalogue.list_models()]
    rows = table.stdout.splitlines()
    assert rows[0].split()[:3] == ["NAME", "SIZE", "CACHED"]
    assert [row.split()[0] for row in rows[1 : 1 + len(names)]] == names
    assert f"cache: {cache}" in rows[-1]

    listed = run_medsam2("models", "list", "--cache-dir", cache, "--json")
    models = json.loads(listed.stdout)["models"]
    assert listed.returncode == 0 and [m["name"] for m in models] == names
    assert not any(m["cached"] for m in models) and sum(m["default"] for m in models) == 1


def test_models_verify_loads_a_local_checkpoint(console_checkpoint):
    done = run_medsam2("models", "verify", "--checkpoint", console_checkpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{console_checkpoint}: loads into {TINY_21} ({TEST_IMAGE_SIZE} px)"


def test_demo_with_random_weights_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    done = run_medsam2(
        "demo", "--random-weights", "--resolution", "2", "--image-size", TEST_IMAGE_SIZE, "--device", "cpu",
        "--output", out, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "random weights" in report["model"] and report["voxels"] > 0
    segmentation = out / "mni152_ventricle.seg.nrrd"
    assert report["segmentation"] == str(segmentation) and segmentation.is_file()
    montage = np.asarray(Image.open(out / "mni152_ventricle_montage.png"))
    assert montage.ndim == 3 and montage.shape[0] > 100 and montage.std() > 0
