"""``medsam2 segment`` as users run it: the installed console script, a volume file or a DICOM series
in, the result files out, checked on disk."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import SimpleITK as sitk
from console import run_medsam2
from console_fixtures import CENTRE_IJK, CENTRE_RAS, SHAPE

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests


def test_volume_file_to_seg_nrrd_and_label_map(ct_nifti, model_flags, tmp_path):
    out = tmp_path / "blob.seg.nrrd"
    done = run_medsam2("segment", ct_nifti, "-o", out, "--point", CENTRE_RAS, "--label", "blob", "--json", *model_flags)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["output"] == str(out) and report["format"] == "seg.nrrd"
    assert report["segments"]["blob"]["voxels"] > 0
    assert report["segments"]["blob"]["slices"] == [0, SHAPE[0] - 1]  # the slices the run covered
    header = out.read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Name:=blob" in header

    labelmap = tmp_path / "blob.nii.gz"
    done = run_medsam2("segment", ct_nifti, "-o", labelmap, "--point-ijk", CENTRE_IJK, "--quiet", *model_flags)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    written, source = sitk.ReadImage(str(labelmap)), sitk.ReadImage(str(ct_nifti))
    labels = sitk.GetArrayFromImage(written)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1} and labels.any()
    assert np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetSpacing(), source.GetSpacing())
    # the same click as RAS millimetres and as a voxel index: the same mask
    assert int(labels.sum()) == report["segments"]["blob"]["voxels"]


def test_dicom_series_to_dicom_seg(ct_series, model_flags, tmp_path):
    out = tmp_path / "blob.dcm"
    done = run_medsam2("segment", ct_series, "-o", out, "--point-ijk", CENTRE_IJK, "--label", "lesion", *model_flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (lesion: ")
    seg = pydicom.dcmread(out)
    source = pydicom.dcmread(next(ct_series.iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert int(seg.NumberOfFrames) >= 1 and seg.pixel_array.any()
