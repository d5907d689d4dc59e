"""``medsam2 batch`` as users run it: the example printed by ``medsam2 batch --help``, as CSV and as JSON,
run from another folder, with inputs placed where the example names them."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest
import SimpleITK as sitk
from console import run_medsam2
from console_fixtures import SHAPE, blob_volume, write_dicom, write_nifti

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests


@pytest.fixture(scope="module")
def help_example() -> tuple[str, str]:
    """(CSV text, JSON text) of the example in ``medsam2 batch --help``."""
    shown = run_medsam2("batch", "--help")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("Example (cases.csv"))
    end = next(n for n, line in enumerate(lines) if line.startswith("The same as JSON:"))
    csv_text = "\n".join(line.strip() for line in lines[start + 1 : end]) + "\n"
    tail = " ".join(lines[end:])
    json_text = tail[tail.index("[") : tail.index("]", tail.index("...")) + 1]
    # the help shows the first case and "..." for the others
    return csv_text, json_text.replace(", ...]", "]")


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    """ct/case1.nii.gz, ct/case2.nii.gz and dicom/case3/ placed so the example's clicks are inside them."""
    root = tmp_path_factory.mktemp("batch-example")
    write_nifti(root / "ct" / "case1.nii.gz", blob_volume(seed=1))
    write_nifti(root / "ct" / "case2.nii.gz", blob_volume(seed=2))
    write_dicom(root / "dicom" / "case3")
    return root


def test_help_example_csv_runs_as_printed(help_example, example_folder, model_flags, tmp_path):
    csv_text, _ = help_example
    assert csv_text.splitlines()[0] == "input,output,point,preset,label"
    study = tmp_path / "study"
    shutil.copytree(example_folder, study)
    (study / "cases.csv").write_text(csv_text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_medsam2("batch", study / "cases.csv", *model_flags, cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "batch: 3 done, 0 skipped, 0 failed"
    for name in ("case1.seg.nrrd", "case2.seg.nrrd"):
        header = (study / name).read_bytes()[:4000].decode("latin-1")
        assert "Segment0_Name:=liver" in header
    seg = pydicom.dcmread(study / "case3.dcm")
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert not list(elsewhere.iterdir())

    again = run_medsam2("batch", study / "cases.csv", *model_flags, cwd=elsewhere)
    assert again.returncode == 0 and "batch: 0 done, 3 skipped, 0 failed" in again.stdout


def test_help_example_json_with_output_dir(help_example, example_folder, model_flags, tmp_path):
    _, json_text = help_example
    cases = json.loads(json_text)
    first = {"input": "ct/case1.nii.gz", "output": "case1.seg.nrrd", "point": ["-60,20,110"]}
    assert cases == [{**first, "preset": "abdomen", "label": "liver"}]
    manifest = example_folder / "cases.json"
    manifest.write_text(json_text)
    results = tmp_path / "results"
    done = run_medsam2("batch", manifest, "--output-dir", results, "--json", *model_flags)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert (summary["cases"], summary["done"], summary["failed"]) == (1, 1, 0)
    assert summary["results"][0]["output"] == str(results / "case1.seg.nrrd")
    assert summary["results"][0]["segments"]["liver"]["voxels"] > 0
    image = sitk.ReadImage(str(results / "case1.seg.nrrd"))
    assert sitk.GetArrayFromImage(image).shape[-3:] == SHAPE
