"""Reading DICOM series (and NRRD/NIfTI/MetaImage) into [k, j, i] arrays with LPS geometry.

Series are written from the MNI152 template on top of real scanner headers; the reader's output is
checked against the values/geometry written and against SimpleITK's GDCM series reader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import (
    ct_values,
    mni_volume,
    mr_values,
    pydicom_data_file,
    rotation,
    sitk_read_series,
    write_enhanced,
    write_series,
)

from medsam2.dicom.series import list_dicom_series, read_dicom_series
from medsam2.errors import InvalidVolumeError
from medsam2.geometry import VolumeGeometry
from medsam2.io.volumes import read_volume

OBLIQUE = rotation(20.0, -10.0, 30.0)


def assert_same_geometry(a: VolumeGeometry, b: VolumeGeometry, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


def need_pydicom_data(name: str) -> Path:
    path = pydicom_data_file(name)
    if path is None:
        pytest.skip(f"{name} not available (PyPI package pydicom-data)")
    return path


@pytest.fixture(scope="module")
def mni():
    return mni_volume()


def test_ct_series_descending_instances_shuffled_names(tmp_path, mni):
    values, geometry = mni
    written = write_series(tmp_path / "ct", ct_values(values), geometry, descending=True)
    series = read_dicom_series(tmp_path / "ct")
    assert series.array.dtype == np.int16  # HU with slope 1 / intercept -1024 fit int16
    np.testing.assert_array_equal(series.array, written.values)
    assert_same_geometry(series.geometry, geometry)
    ref_array, ref_geometry = sitk_read_series(tmp_path / "ct")
    np.testing.assert_array_equal(series.array, ref_array)
    assert_same_geometry(series.geometry, ref_geometry)
    # Slice k references the file written for k (instance numbers run the other way).
    for k in (0, len(written.files) - 1):
        ds = series.datasets[series.frames[k].dataset_index]
        assert int(ds.InstanceNumber) == len(written.files) - k
        assert "PixelData" not in ds  # headers only: the voxels live in the array
    assert series.study_instance_uid == written.study_uid
    assert series.series_instance_uid == written.series_uid
    assert series.frame_of_reference_uid == written.frame_of_reference_uid
    assert series.modality == "CT" and not series.is_multiframe


def test_oblique_mr_with_rescale_slope(tmp_path, mni):
    values, _ = mni
    geometry = VolumeGeometry((1.5, 2.0, 2.5), (10.0, -20.0, 30.0), tuple(OBLIQUE.ravel()))
    written = write_series(
        tmp_path / "mr", mr_values(values), geometry, modality="MR", slope=2.5, intercept=-10
    )
    series = read_dicom_series(tmp_path / "mr")
    assert series.array.dtype == np.float32
    np.testing.assert_allclose(series.array, written.values, rtol=0, atol=1e-3)
    assert_same_geometry(series.geometry, geometry)
    ref_array, ref_geometry = sitk_read_series(tmp_path / "mr")
    np.testing.assert_allclose(series.array, ref_array, atol=1e-3)
    assert_same_geometry(series.geometry, ref_geometry)


def test_stack_running_against_the_normal_is_reordered(tmp_path, mni):
    """Slice positions decreasing along row x column: k is re-ordered to run along the normal, and every
    voxel keeps its patient position."""
    values, geometry = mni
    flipped = geometry.direction_matrix.copy()
    flipped[:, 2] *= -1  # left-handed stack: positions go against the normal
    source = VolumeGeometry(geometry.spacing, geometry.origin, tuple(flipped.ravel()))
    written = write_series(tmp_path / "desc", ct_values(values), source)
    series = read_dicom_series(tmp_path / "desc")
    np.testing.assert_array_equal(series.array, written.values[::-1])
    n = values.shape[0] - 1
    np.testing.assert_allclose(
        series.geometry.origin, source.ijk_to_lps_matrix()[:3] @ [0, 0, n, 1], atol=1e-5
    )
    assert np.linalg.det(series.geometry.direction_matrix) > 0
    _, ref_geometry = sitk_read_series(tmp_path / "desc")
    assert_same_geometry(series.geometry, ref_geometry)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe(tmp_path, mni, modality):
    values, _ = mni
    geometry = VolumeGeometry((1.5, 2.0, 2.5), (10.0, -20.0, 30.0), tuple(OBLIQUE.ravel()))
    unit = ct_values(values) if modality == "CT" else mr_values(values)
    slope, intercept = (1.0, -1024.0) if modality == "CT" else (0.5, 3.0)
    written = write_enhanced(
        tmp_path / "enh" / "multi.dcm",
        unit,
        geometry,
        modality=modality,
        slope=slope,
        intercept=intercept,
        descending=True,
    )
    series = read_dicom_series(tmp_path / "enh")
    assert series.is_multiframe and len(series.datasets) == 1
    np.testing.assert_allclose(series.array, written.values, atol=1e-3)
    assert_same_geometry(series.geometry, geometry)
    # Frames were stored last-slice-first, so slice 0 is the last frame.
    assert series.frames[0].frame_number == values.shape[0]
    assert series.frames[-1].frame_number == 1


def test_real_enhanced_ct_from_pydicom_data():
    path = need_pydicom_data("eCT_Supplemental.dcm")
    series = read_dicom_series(path)
    ds = pydicom.dcmread(path)
    assert series.array.shape == (2, 512, 512)
    # Frame positions z = -159 (frame 1) and -149 (frame 2); the normal points to -z, so frame 2 comes first.
    assert [f.frame_number for f in series.frames] == [2, 1]
    np.testing.assert_allclose(series.geometry.spacing, (0.388672, 0.388672, 10.0))
    np.testing.assert_allclose(series.geometry.origin, (99.5, -301.5, -149.0))
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ds.pixel_array[::-1].astype(np.float64) * float(transform.RescaleSlope) + float(
        transform.RescaleIntercept
    )
    np.testing.assert_array_equal(series.array, expected)


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_real_single_files_match_simpleitk(name):
    path = need_pydicom_data(name)
    series = read_dicom_series(path)
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(series.array, sitk.GetArrayFromImage(image), atol=1e-3)
    np.testing.assert_allclose(series.geometry.origin, image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(series.geometry.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(series.geometry.direction, image.GetDirection(), atol=1e-5)


@pytest.mark.parametrize(
    ("compressed", "plain"), [("693_J2KR.dcm", "693_UNCR.dcm"), ("MR2_J2KR.dcm", "MR2_UNCR.dcm")]
)
def test_jpeg2000_lossless_matches_uncompressed_twin(compressed, plain):
    a, b = read_dicom_series(need_pydicom_data(compressed)), read_dicom_series(need_pydicom_data(plain))
    np.testing.assert_array_equal(a.array, b.array)
    assert a.geometry == b.geometry


# --- bad input ---------------------------------------------------------------------------------------


@pytest.fixture()
def ct_folder(tmp_path, mni):
    values, geometry = mni
    written = write_series(tmp_path / "ct", ct_values(values[:12]), geometry, names="instance")
    return tmp_path / "ct", written


def one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(InvalidVolumeError, match=match) as info:
        read_dicom_series(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_two_series_in_one_folder(ct_folder, mni):
    folder, written = ct_folder
    values, geometry = mni
    other = write_series(
        folder / "sub", mr_values(values[:5]), geometry, modality="MR", description="T1 axial"
    )
    message = one_line_error(folder, "holds 2 image series")
    assert written.series_uid in message and other.series_uid in message and "'T1 axial'" in message
    chosen = read_dicom_series(folder, series_uid=other.series_uid)
    assert chosen.array.shape[0] == 5
    assert {s.series_instance_uid for s in list_dicom_series(folder)} == {
        written.series_uid,
        other.series_uid,
    }


def test_missing_slice_names_neighbours(ct_folder):
    folder, written = ct_folder
    written.files[5].unlink()  # IM0006: between IM0005 and IM0007
    message = one_line_error(folder, "1 slice\\(s\\) missing")
    assert "IM0005.dcm" in message and "IM0007.dcm" in message


def test_non_uniform_spacing(tmp_path, mni):
    values, geometry = mni
    folder = tmp_path / "nonuniform"
    write_series(folder, ct_values(values[:8]), geometry, names="instance")
    ds = pydicom.dcmread(folder / "IM0008.dcm")
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.7
    ds.save_as(folder / "IM0008.dcm")
    message = one_line_error(folder, "non-uniform slice spacing")
    assert "IM0007.dcm" in message and "IM0008.dcm" in message


def test_gantry_tilt_rejected(tmp_path, mni):
    values, geometry = mni
    write_series(
        tmp_path / "tilt", ct_values(values[:8]), geometry, shear_mm_per_slice=0.5, gantry_tilt_deg=14.0
    )
    message = one_line_error(tmp_path / "tilt", "gantry tilt")
    assert "14 deg" in message


def test_duplicate_positions(ct_folder):
    folder, written = ct_folder
    ds = pydicom.dcmread(written.files[3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "echo2.dcm")
    one_line_error(folder, "same position")


def test_truncated_file_named(ct_folder):
    folder, written = ct_folder
    data = written.files[4].read_bytes()
    written.files[4].write_bytes(data[: len(data) // 2])
    message = one_line_error(folder, "IM0005.dcm")
    assert "corrupt" in message or "decode" in message


def test_garbage_file_named(ct_folder):
    folder, _ = ct_folder
    (folder / "notes.txt").write_text("radiologist notes, not DICOM\n")
    one_line_error(folder, "notes.txt is not a DICOM file")


def test_non_image_object_named(ct_folder):
    folder, written = ct_folder
    ds = pydicom.dcmread(written.files[0], stop_before_pixels=True)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: no pixels
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "report.dcm")
    message = one_line_error(folder, "report.dcm is an Enhanced SR object, not an image")
    assert written.series_uid in message  # the fix: choose the image series explicitly
    assert read_dicom_series(folder, series_uid=written.series_uid).array.shape[0] == 12


def test_only_non_image_objects(tmp_path):
    liver_seg = pydicom_data_file("liver.dcm")
    if liver_seg is None:
        pytest.skip("liver.dcm not available (PyPI package pydicom-data)")
    shutil.copy(liver_seg, tmp_path / "seg.dcm")
    one_line_error(tmp_path, "seg.dcm is a Segmentation object, not an image")


def test_colour_image_refused(tmp_path):
    shutil.copy(pydicom_data_file("SC_rgb.dcm"), tmp_path / "rgb.dcm")
    one_line_error(tmp_path, "colour image")


def test_empty_and_missing_paths(tmp_path):
    one_line_error(tmp_path, "is empty")
    one_line_error(tmp_path / "nope", "does not exist")


# --- NRRD / NIfTI / MetaImage ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha", ".mhd"])
def test_read_volume_formats(tmp_path, mni, suffix):
    values, _ = mni
    geometry = VolumeGeometry((1.5, 2.0, 2.5), (10.0, -20.0, 30.0), tuple(OBLIQUE.ravel()))
    image = sitk.GetImageFromArray(ct_values(values).astype(np.int16))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(image, str(path))
    array, read_geometry = read_volume(path)
    np.testing.assert_array_equal(array, ct_values(values))
    assert_same_geometry(read_geometry, geometry, atol=1e-4)  # NIfTI stores float32 quaternions


def test_read_volume_dicom_folder(ct_folder):
    folder, written = ct_folder
    array, geometry = read_volume(folder)
    np.testing.assert_array_equal(array, written.values)
    assert_same_geometry(geometry, written.geometry)


def test_read_volume_rejects_vector_and_missing(tmp_path):
    vec = sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    with pytest.raises(InvalidVolumeError, match="3 components per voxel"):
        read_volume(tmp_path / "vec.nrrd")
    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(InvalidVolumeError, match="cannot read volume") as info:
        read_volume(tmp_path / "broken.nrrd")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidVolumeError, match="does not exist"):
        read_volume(tmp_path / "absent.nii.gz")
