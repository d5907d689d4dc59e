"""``medsam2 evaluate`` and ``medsam2 finetune`` as users run them: the installed console script on a
small labelled dataset (images/ + labels/), with the local random-weight checkpoint; the fine-tuned
model then loads with ``medsam2 models verify`` and segments with ``medsam2 segment``."""

from __future__ import annotations

import csv
import json

from console import run_medsam2
from console_fixtures import CENTRE_IJK

from conftest import TEST_IMAGE_SIZE, TINY_21

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests


def test_evaluate_writes_case_tables_and_summary(labelled_dataset, model_flags, tmp_path):
    out = tmp_path / "eval"
    done = run_medsam2("evaluate", labelled_dataset, "--out", out, "--prompt", "box", "--quiet", *model_flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"summary: {out / 'summary.md'}"
    for n in range(3):
        with open(out / "cases" / f"case{n}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(0.0 <= float(row["dice"]) <= 1.0 for row in rows), rows
    assert "case" in (out / "summary.md").read_text() and (out / "metrics.csv").is_file()


def test_finetune_a_few_steps_then_use_the_model(labelled_dataset, model_flags, ct_nifti, tmp_path):
    out = tmp_path / "tuned"
    done = run_medsam2(
        "finetune", labelled_dataset, "--out", out, "--epochs", "1", "--steps", "2", "--clip-length", "3",
        "--val-fraction", "0.34", "--json", *model_flags,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["step"] == 2 and report["epoch"] == 1
    model = out / "best.pt"
    assert report["model"] == str(model) and model.is_file()
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == [1, 2]

    verified = run_medsam2("models", "verify", "--checkpoint", model)
    assert verified.returncode == 0, verified.stderr
    assert f"loads into {TINY_21} ({TEST_IMAGE_SIZE} px)" in verified.stdout
    segmented = tmp_path / "tuned.seg.nrrd"
    click = ("--point-ijk", CENTRE_IJK)
    done = run_medsam2("segment", ct_nifti, "-o", segmented, *click, "--checkpoint", model, "--device", "cpu")
    assert done.returncode == 0 and segmented.is_file(), done.stderr
