"""The command line end to end: real files in, real files out, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TEST_IMAGE_SIZE, TINY_21
from medsam2.cli import main
from medsam2.models.build import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_predictor, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny128.pt"
    save_checkpoint(path, tiny_predictor)
    return path


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory, mni_volume):
    """A CT-like NIfTI (Hounsfield-like int16) cut from the MNI152 template, oblique-free, anisotropic."""
    data, spacing, origin = mni_volume
    crop = data[70:86:2, 60:160:2, 50:140:2]
    hu = (crop * 1000 - 100).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((spacing[0] * 2, spacing[1] * 2, spacing[2] * 2))
    image.SetOrigin(origin)
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, hu.shape


def model_args(checkpoint):
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


def centre_ras(path):
    image = sitk.ReadImage(str(path))
    size = image.GetSize()
    lps = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
    return f"{-lps[0]},{-lps[1]},{lps[2]}"


def test_segment_writes_seg_nrrd_and_labelmap(ct_file, checkpoint, tmp_path, capsys):
    path, shape = ct_file
    out = tmp_path / "out.seg.nrrd"
    code = main(
        [
            "segment",
            str(path),
            "-o",
            str(out),
            "--point",
            centre_ras(path),
            "--label",
            "lesion",
            "--preset",
            "soft_tissue",
            "--json",
            *model_args(checkpoint),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and "lesion" in report["segments"]
    assert out.is_file()
    out2 = tmp_path / "out.nii.gz"
    assert (
        main(
            [
                "segment",
                str(path),
                "-o",
                str(out2),
                "--point-ijk",
                "22,25,4",
                "--quiet",
                "--largest-component",
                *model_args(checkpoint),
            ]
        )
        == 0
    )
    labelmap = sitk.ReadImage(str(out2))
    assert sitk.GetArrayFromImage(labelmap).shape == shape
    assert np.allclose(labelmap.GetOrigin(), sitk.ReadImage(str(path)).GetOrigin())


def test_existing_output_is_never_overwritten_without_asking(ct_file, checkpoint, tmp_path, capsys):
    path, _ = ct_file
    out = tmp_path / "keep.nii.gz"
    out.write_bytes(b"user data")
    code = main(["segment", str(path), "-o", str(out), "--point-ijk", "22,25,4", *model_args(checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"user data"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "missing.nii.gz", "-o", "{tmp}/o.seg.nrrd", "--point", "0,0,0"], "does not exist"),
        (["segment", "{vol}", "-o", "{tmp}/o.txt", "--point", "0,0,0"], "output format"),
        (["segment", "{vol}", "-o", "{tmp}/o.seg.nrrd"], "no prompts"),
        (["segment", "{vol}", "-o", "{tmp}/o.seg.nrrd", "--point", "1,2"], "three numbers"),
        (["segment", "{vol}", "-o", "{tmp}/o.seg.nrrd", "--point", "5000,0,0"], "outside the volume"),
        (["segment", "{vol}", "-o", "{tmp}/o.dcm", "--point", "0,0,0"], "DICOM input"),
        (["segment", "{vol}", "-o", "{tmp}/o.seg.nrrd", "--point-ijk", "1,1,1", "--slices", "9"], "START:END"),
        (["segment", "{vol}", "-o", "{tmp}/o.seg.nrrd", "--point-ijk", "1,1,1", "--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(ct_file, checkpoint, tmp_path, capsys, argv, message):
    path, _ = ct_file
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{vol}", str(path)) for a in argv]
    code = main(argv + model_args(checkpoint)[:6])
    err = capsys.readouterr().err.strip()
    assert code in (2, 4), err
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_batch_is_resumable_and_survives_a_bad_case(ct_file, checkpoint, tmp_path, capsys):
    path, _ = ct_file
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        f"input,output,point_ijk,label\n{path},a.seg.nrrd,22;25;4,first\n".replace("22;25;4", '"22,25,4"')
        + f'{tmp_path}/missing.nii.gz,b.seg.nrrd,"1,1,1",second\n'
        + f'{path},c.nii.gz,"20,20,3",third\n'
    )
    code = main(["batch", str(manifest), "--json", *model_args(checkpoint)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 5 and summary["done"] == 2 and summary["failed"] == 1
    assert "does not exist" in summary["results"][1]["error"]
    assert (tmp_path / "a.seg.nrrd").is_file() and (tmp_path / "c.nii.gz").is_file()
    before = (tmp_path / "a.seg.nrrd").stat().st_mtime_ns
    code = main(["batch", str(manifest), "--json", *model_args(checkpoint)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 2 and (tmp_path / "a.seg.nrrd").stat().st_mtime_ns == before


def test_version_and_usage_errors():
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("medsam2 ")
    bad = subprocess.run([sys.executable, "-m", "medsam2.cli", "segment"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_demo_with_random_weights(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--random-weights",
            "--resolution",
            "2",
            "--image-size",
            str(TEST_IMAGE_SIZE),
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and "random weights" in report["model"]
    assert (tmp_path / "mni152_ventricle.seg.nrrd").is_file()
    from PIL import Image

    assert Image.open(tmp_path / "mni152_ventricle_montage.png").size[0] > 0


def test_demo_offline_without_weights_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    code = main(["demo", "--device", "cpu", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out.strip()
    assert code == 3 and len(out.splitlines()) == 1
    assert "CHECKPOINT=" in out and not (tmp_path / "out").exists()


def test_dicom_series_in_dicom_seg_out(checkpoint, tmp_path, capsys):
    """A CT series folder in, a DICOM-SEG out that references it and passes dciodvfy."""
    import pydicom
    from dicom_factory import ct_values, mni_volume, write_series
    from dicom_tools import dciodvfy_errors

    values, geometry = mni_volume((30, 38))
    series_dir = tmp_path / "series"
    series_dir.mkdir()
    write_series(series_dir, ct_values(values), geometry, modality="CT", descending=True)
    out = tmp_path / "result.dcm"
    code = main(
        [
            "segment",
            str(series_dir),
            "-o",
            str(out),
            "--point-ijk",
            "48,58,4",
            "--label",
            "liver",
            "--json",
            *model_args(checkpoint),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    seg = pydicom.dcmread(out)
    source = pydicom.dcmread(next(series_dir.iterdir()))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert "MedSAM2Slicer" in seg.SegmentSequence[0].SegmentAlgorithmName
    assert dciodvfy_errors(out) == []


def test_demo_click_is_on_the_ventricle():
    """The demo's prompt must sit on dark CSF, not on the white matter around the ventricle."""
    from nilearn import datasets

    from medsam2.cli.demo import DEMO_POINT_RAS
    from medsam2.geometry import VolumeGeometry

    img = datasets.load_mni152_template(resolution=1)
    volume = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    i, j, k = np.round(VolumeGeometry.from_ijk_to_ras_matrix(img.affine).ras_to_ijk([DEMO_POINT_RAS])[0]).astype(int)
    white_matter = volume[k, j, i - 16]  # 16 mm further left: corona radiata
    assert volume[k, j, i] < 0.35 < white_matter
