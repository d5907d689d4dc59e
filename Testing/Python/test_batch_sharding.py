"""``medsam2 batch`` under torchrun (two CPU processes share the manifest) and opening the next case
ahead of time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TEST_IMAGE_SIZE, TINY_21
from medsam2.cli.batch_workers import CaseOpener, device_for_rank
from medsam2.cli.common import ModelCache
from medsam2.cli.segment import SegmentJob
from medsam2.distributed import RankInfo
from medsam2.models.build import save_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tiny_predictor, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny128.pt"
    save_checkpoint(path, tiny_predictor)
    return path


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory, mni_volume):
    data, spacing, origin = mni_volume
    hu = (data[70:78:2, 60:160:2, 50:140:2] * 1000 - 100).astype(np.int16)  # 4 slices: quick
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(s * 2 for s in spacing))
    image.SetOrigin(origin)
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def model_args(checkpoint: Path) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--config",
        TINY_21,
        "--image-size",
        str(TEST_IMAGE_SIZE),
        "--device",
        "cpu",
    ]


def test_batch_under_torchrun_shards_the_manifest(ct_file, checkpoint, tmp_path):
    manifest = tmp_path / "cases.csv"
    rows = "".join(f'{ct_file},case{n}.nii.gz,"20,22,{n % 4}",seg{n}\n' for n in range(1, 4))
    manifest.write_text("input,output,point_ijk,label\n" + rows)
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedSAM2Slicer"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "medsam2.cli", "batch", str(manifest), "--json", *model_args(checkpoint),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 1, done.stdout  # rank 0 speaks for the job
    summary = answers[0]
    assert summary["processes"] == 2 and summary["cases"] == 3 and summary["done"] == 3
    assert [(r["case"], r["rank"]) for r in summary["results"]] == [(1, 0), (2, 1), (3, 0)]
    assert all((tmp_path / f"case{n}.nii.gz").is_file() for n in range(1, 4))
    assert not (tmp_path / ".medsam2-batch").exists()  # the per-rank records are merged and removed


def test_device_for_rank():
    two = RankInfo(rank=1, world_size=2, local_rank=1, launched=True)
    assert device_for_rank("cpu", two) == "cpu"
    assert device_for_rank("cuda:0", RankInfo(0, 1, 0, False)) == "cuda:0"  # not sharded: as given


def test_the_next_case_is_opened_ahead(ct_file, checkpoint, tmp_path):
    from medsam2.cli.segment import add_segment_options

    parser = argparse.ArgumentParser()
    add_segment_options(parser)  # a manifest row's options, the model's among them
    args = parser.parse_args(["--point-ijk", "20,22,1", *model_args(checkpoint)])
    opener = CaseOpener(ModelCache())
    job = SegmentJob(str(ct_file), tmp_path / "a.nii.gz", args)
    opener.start(job)
    opened = opener.take(job)
    assert opened is not None and opened[2].shape == (4, 50, 45)
    assert opener.take(job) is None  # taken once
    opened[2].close()

    missing = SegmentJob(str(tmp_path / "missing.nii.gz"), tmp_path / "b.nii.gz", args)
    opener.start(missing)
    assert opener.take(missing) is None  # segment_one opens it again and reports the error
