"""Bad input to every ``medsam2`` command, through the installed console script: one clear line on
stderr (no traceback), the exit code of its class (2 bad input, 3 model, 5 batch with failed cases),
and no user file lost or half-written: an existing output is left exactly as it was, even with
``--overwrite``, and a failed run leaves no temporary file behind."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from console import run_medsam2
from console_fixtures import CENTRE_IJK, blob_labels, one_line_error, write_dicom, write_nifti

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests

USER_DATA = b"the user's earlier result\n"


@pytest.fixture(scope="module")
def files(ct_nifti, tmp_path_factory) -> Path:
    """Broken and awkward inputs next to a good copy of the CT."""
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copy(ct_nifti, root / "ct.nii.gz")
    (root / "garbage.nii.gz").write_bytes(b"not an image at all")
    whole = ct_nifti.read_bytes()
    (root / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    raw = gzip.decompress(whole)
    (root / "cut.nii").write_bytes(raw[: len(raw) - 500])
    series = write_dicom(root / "cut-series")
    cut = sorted(series.iterdir())[3]
    whole_file = cut.read_bytes()
    cut.write_bytes(whole_file[: whole_file.find(b"\xe0\x7f\x10\x00")])  # a copy that stopped at the pixels
    (root / "notdicom").mkdir()
    (root / "notdicom" / "readme.txt").write_text("no images here")
    painted = np.zeros_like(blob_labels())
    painted[4][blob_labels()[4] > 0] = 2  # object 2, on the slice the click of object 1 is on
    write_nifti(root / "painted.nii.gz", painted)
    (root / "prompts.json").write_text("{ this is not json")
    (root / "not-a-model.pt").write_bytes(b"PK\x03\x04 half a zip")
    (root / "a-file").write_bytes(USER_DATA)
    return root


def _argv(template: tuple[str, ...], files: Path, tmp_path: Path) -> list[str]:
    return [a.replace("{f}", str(files)).replace("{tmp}", str(tmp_path)) for a in template]


def _assert_nothing_left(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


SEGMENT = ("segment",)
OUT = ("-o", "{tmp}/out.seg.nrrd")
CLICK = ("--point-ijk", CENTRE_IJK)
DEMO = ("demo", "--random-weights", "--resolution", "2", "--image-size", "128", "--device", "cpu")


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (SEGMENT + ("{f}/missing.nii.gz",) + OUT + CLICK, 2, "does not exist"),
        (SEGMENT + ("{f}/garbage.nii.gz",) + OUT + CLICK, 2, "garbage.nii.gz"),
        (SEGMENT + ("{f}/cut.nii.gz",) + OUT + CLICK, 2, "truncated"),
        (SEGMENT + ("{f}/cut.nii",) + OUT + CLICK, 2, "truncated"),
        (SEGMENT + ("{f}/notdicom",) + OUT + CLICK, 2, "not a DICOM file"),
        (SEGMENT + ("{f}/cut-series",) + OUT + CLICK, 2, "truncated"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + ("--point", "a,b,c"), 2, "three numbers"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + ("--box-ijk", "1,2,3"), 2, "six numbers"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + ("--point-ijk", "100,1,1"), 2, "outside the volume"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + ("--prompts", "{f}/prompts.json"), 2, "prompts.json"),
        (SEGMENT + ("{f}/ct.nii.gz", "-o", "{tmp}/no/such/folder/out.seg.nrrd") + CLICK, 2, "does not exist"),
        (SEGMENT + ("{f}/ct.nii.gz", "-o", "{tmp}", "--overwrite") + CLICK, 2, "is a folder"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + CLICK + ("--checkpoint", "{f}/not-a-model.pt"), 3, "not-a-model.pt"),
        (SEGMENT + ("{f}/ct.nii.gz",) + OUT + CLICK + ("--checkpoint", "{f}/missing.pt"), 3, "does not exist"),
        (("batch", "{f}/missing.csv"), 2, "does not exist"),
        (("batch", "{f}/prompts.json"), 2, "not valid JSON"),
        (DEMO + ("--output", "{f}/a-file"), 2, "is a file"),
        (("models", "verify", "--checkpoint", "{f}/not-a-model.pt"), 3, "not-a-model.pt"),
        (("models", "verify", "no-such-model"), 3, "unknown model"),
        (("models", "download", "sam2-tiny", "--cache-dir", "{tmp}/cache"), 3, "HF_HUB_OFFLINE"),
        (("evaluate", "{f}/missing", "--out", "{tmp}/eval", "--checkpoint", "{f}/missing.pt"), 2, "does not exist"),
        (("finetune", "{f}/notdicom", "--out", "{tmp}/ft", "--checkpoint", "{f}/missing.pt"), 2, "not a dataset"),
        (("serve", "--token-file", "{f}/missing-token.txt", "--checkpoint", "{f}/missing.pt"), 2, "token file"),
    ],
    ids=lambda v: "-".join(v[:2]).replace("{f}/", "").replace("{tmp}/", "") if isinstance(v, tuple) else None,
)
def test_bad_input_is_one_line(argv, code, words, files, model_flags, tmp_path):
    given = _argv(argv, files, tmp_path)
    flags = [] if "--checkpoint" in given or given[0] not in ("segment", "batch") else model_flags
    done = run_medsam2(*given, *flags)
    assert done.returncode == code, done.stdout + done.stderr
    assert words in one_line_error(done)
    assert not (tmp_path / "out.seg.nrrd").exists()
    _assert_nothing_left(tmp_path)
    assert (files / "a-file").read_bytes() == USER_DATA


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--point-ijk", "100,1,1"), "outside the volume"),  # fails after the model and volume are loaded
        (CLICK + ("--checkpoint", "{f}/not-a-model.pt"), "not-a-model.pt"),
        # two objects on the same voxels cannot share one label map: found while writing, after the run
        (CLICK + ("--mask", "{f}/painted.nii.gz"), "overlap"),
    ],
    ids=["prompt-outside", "wrong-model", "fails-while-writing"],
)
def test_failed_run_leaves_an_existing_output_as_it_was_even_with_overwrite(extra, words, files, model_flags, tmp_path):
    output = tmp_path / "result.nii.gz"
    output.write_bytes(USER_DATA)
    # --quiet: no progress bars on stderr, so the error is all there is
    given = _argv(("segment", "{f}/ct.nii.gz", "-o", str(output), "--overwrite", "--quiet", *extra), files, tmp_path)
    done = run_medsam2(*given, *([] if "--checkpoint" in given else model_flags))
    assert done.returncode in (2, 3) and words in one_line_error(done)
    assert output.read_bytes() == USER_DATA
    _assert_nothing_left(tmp_path)


def test_output_named_like_an_input_is_refused_even_with_overwrite(files, model_flags, tmp_path):
    volume = tmp_path / "scan.nii.gz"
    shutil.copy(files / "ct.nii.gz", volume)
    painted = tmp_path / "painted.nii.gz"
    shutil.copy(files / "painted.nii.gz", painted)
    before = volume.read_bytes(), painted.read_bytes()
    for output in (volume, painted):
        done = run_medsam2("segment", volume, "-o", output, "--overwrite", "--mask", painted, *model_flags)
        assert done.returncode == 2 and "write the result to another file" in one_line_error(done)
    assert (volume.read_bytes(), painted.read_bytes()) == before


def test_batch_bad_rows_fail_alone_and_never_touch_existing_outputs(files, model_flags, tmp_path):
    (tmp_path / "kept.seg.nrrd").write_bytes(USER_DATA)
    manifest = tmp_path / "cases.json"
    cases = [
        {"input": str(files / "ct.nii.gz"), "output": "kept.seg.nrrd", "point_ijk": [CENTRE_IJK], "overwrite": True},
        {"input": str(files / "cut.nii.gz"), "output": "b.seg.nrrd", "point_ijk": [CENTRE_IJK]},
        {"input": str(files / "ct.nii.gz"), "output": "c.seg.nrrd", "no_such_option": "1"},
        {"input": str(files / "ct.nii.gz"), "output": "d.seg.nrrd", "point_ijk": ["100,1,1"]},
        {"input": str(files / "ct.nii.gz"), "output": "e.seg.nrrd", "point_ijk": [CENTRE_IJK]},
    ]
    manifest.write_text(json.dumps(cases))
    done = run_medsam2("batch", manifest, "--json", *model_flags)
    assert done.returncode == 5, done.stderr
    summary = json.loads(done.stdout)
    status = [r["status"] for r in summary["results"]]
    assert status == ["skipped (output exists)", "failed", "failed", "failed", "done"]
    errors = [r.get("error", "") for r in summary["results"]]
    assert "truncated" in errors[1] and "no_such_option" in errors[2].replace("-", "_")
    assert "outside the volume" in errors[3]
    assert (tmp_path / "kept.seg.nrrd").read_bytes() == USER_DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.json", "e.seg.nrrd", "kept.seg.nrrd"]
