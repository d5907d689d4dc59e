"""DICOM test inputs written with pydicom from real data: the MNI152 T1 template shipped in nilearn,
stacked as CT-like and MR-like series on top of real scanner headers (pydicom's own CT_small/MR_small
test files, pydicom-data's Philips MR), plus enhanced multi-frame files with functional groups.

Writers take the intended ``[k, j, i]`` values and LPS geometry so tests can compare what a reader
returns against what was written; an independent reader (SimpleITK/GDCM) checks the writer itself.
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsam2.geometry import VolumeGeometry

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def pydicom_data_file(name: str) -> Optional[Path]:
    """A file from pydicom's test data or the pydicom-data package, or None when it is not installed."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name, download=False)
    except TypeError:  # older pydicom without the download argument
        found = get_testdata_file(name)
    except Exception:  # noqa: BLE001 - a missing external data source is "not installed"
        return None
    return Path(found) if found else None


@functools.cache
def _mni_cached() -> tuple[np.ndarray, VolumeGeometry]:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)  # nibabel [i,j,k] -> [k,j,i]
    affine = np.asarray(img.affine, dtype=float)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    columns = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    geometry = VolumeGeometry(
        spacing=tuple(spacing),
        origin=tuple(ras_to_lps @ affine[:3, 3]),
        direction=tuple((columns / spacing).ravel()),
    )
    return data, geometry


def mni_volume(k_range: tuple[int, int] = (20, 60)) -> tuple[np.ndarray, VolumeGeometry]:
    """MNI152 T1 (2 mm, values 0..1) as a ``[k, j, i]`` float array with its LPS geometry, cut to axial
    slices ``k_range`` so tests stay small; origin moves with the cut."""
    data, geometry = _mni_cached()
    lo, hi = k_range
    origin = geometry.ijk_to_lps_matrix() @ np.array([0.0, 0.0, lo, 1.0])
    return data[lo:hi].copy(), VolumeGeometry(geometry.spacing, tuple(origin[:3]), geometry.direction)


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix (about x, then y, then z) for oblique test geometries."""
    rx, ry, rz = np.radians([rx_deg, ry_deg, rz_deg])
    mx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    my = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    mz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return mz @ my @ mx


def ct_values(unit: np.ndarray) -> np.ndarray:
    """MNI intensities 0..1 mapped to a CT-like Hounsfield range (air -1000 up to ~+1000)."""
    return np.round(unit * 2000.0 - 1000.0)


def mr_values(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 1200.0)


@dataclass
class WrittenSeries:
    files: list[Path]  # in instance (acquisition) order
    values: np.ndarray  # the real-world [k, j, i] values the files encode, in k order of ``geometry``
    geometry: VolumeGeometry
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str


def _stored(values: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """(stored pixels, the real values they decode to): decoding stored*slope+intercept is what readers do."""
    stored = np.round((values - intercept) / slope)
    signed = stored.min() < 0
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError("test values do not fit 16-bit storage")
    stored = stored.astype(dtype)
    return stored, stored.astype(np.float64) * slope + intercept


def _template(modality: str, template: Optional[Path]) -> Dataset:
    if template is None:
        template = pydicom_data_file("CT_small.dcm" if modality == "CT" else "MR_small.dcm")
    assert template is not None, "pydicom's own test files are missing"
    ds = pydicom.dcmread(template, stop_before_pixels=True)
    # Values that describe the template's own pixels (or overlays on them) would contradict ours.
    for keyword in (
        "LargestImagePixelValue",
        "SmallestImagePixelValue",
        "PixelPaddingValue",
        "ImagesInAcquisition",
        "SliceLocation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "GantryDetectorTilt",
        "SpacingBetweenSlices",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF or t.group == 0x7FE0]:
        del ds[tag]
    return ds


def write_series(
    folder: Path,
    values: np.ndarray,
    geometry: VolumeGeometry,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    descending: bool = False,
    template: Optional[Path] = None,
    shear_mm_per_slice: float = 0.0,
    gantry_tilt_deg: Optional[float] = None,
    names: str = "shuffled",
    study_uid: Optional[str] = None,
    series_uid: Optional[str] = None,
    series_number: int = 3,
    description: str = "",
) -> WrittenSeries:
    """Write ``values`` ([k, j, i], real-world units) as single-frame CT or MR Image files in ``folder``.

    ``descending`` numbers instances from the last k to the first (positions decrease with instance
    number, as many head-first scanners write them); ``names="shuffled"`` gives files random names so no
    reader can rely on file name order; ``shear_mm_per_slice`` moves each slice sideways (gantry tilt).
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored, decoded = _stored(values, slope, intercept)
    base = _template(modality, template)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    matrix = geometry.ijk_to_lps_matrix()
    row_dir, col_dir = geometry.direction_matrix[:, 0], geometry.direction_matrix[:, 1]
    order = list(range(values.shape[0]))
    if descending:
        order.reverse()
    files = []
    rng = random.Random(series_uid)
    for instance, k in enumerate(order, start=1):
        ds = copy.deepcopy(base)
        sop_uid = generate_uid()
        ds.SOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = instance
        if description:
            ds.SeriesDescription = description
        position = matrix @ np.array([0.0, 0.0, k, 1.0])
        position[:3] += shear_mm_per_slice * k * row_dir
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]
        ds.SliceThickness = f"{geometry.spacing[2]:.6f}"
        if gantry_tilt_deg is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt_deg:.4f}"
        ds.Rows, ds.Columns = int(values.shape[1]), int(values.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        if modality == "CT" or slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept:g}"
            if modality != "CT":
                ds.RescaleType = "US"
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[k]).tobytes())
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{rng.getrandbits(40):010x}.dcm" if names == "shuffled" else f"IM{instance:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return WrittenSeries(files, decoded, geometry, study_uid, series_uid, for_uid)


def write_enhanced(
    path: Path,
    values: np.ndarray,
    geometry: VolumeGeometry,
    *,
    modality: str = "MR",
    slope: float = 1.0,
    intercept: float = 0.0,
    descending: bool = False,
) -> WrittenSeries:
    """Write ``values`` as one Enhanced CT/MR multi-frame file: geometry in functional groups, orientation
    and pixel measures shared, plane position per frame, rescale in Pixel Value Transformation."""
    stored, decoded = _stored(values, slope, intercept)
    study_uid, series_uid, for_uid, sop_uid = (generate_uid() for _ in range(4))
    order = list(range(values.shape[0]))
    if descending:
        order.reverse()
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT if modality == "CT" else ENHANCED_MR
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "MNI^Template", "MNI152", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 5, 1
    ds.Manufacturer = "MedSAM2Slicer tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "120000", "20240101120000"
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = int(values.shape[1]), int(values.shape[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0

    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [
        f"{v:.8f}" for v in np.concatenate([geometry.direction_matrix[:, 0], geometry.direction_matrix[:, 1]])
    ]
    measures = Dataset()
    measures.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]
    measures.SliceThickness = f"{geometry.spacing[2]:.6f}"
    measures.SpacingBetweenSlices = f"{geometry.spacing[2]:.6f}"
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    transform.RescaleType = "HU" if modality == "CT" else "US"
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    dim_uid = generate_uid()
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00200032
    index.FunctionalGroupPointer = 0x00209113
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    ds.DimensionIndexSequence = DicomSequence([index])

    matrix = geometry.ijk_to_lps_matrix()
    per_frame = []
    for n, k in enumerate(order, start=1):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in (matrix @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        content = Dataset()
        content.DimensionIndexValues = [n]
        content.InStackPositionNumber = n
        content.StackID = "1"
        item.PlanePositionSequence = DicomSequence([position])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[order]).tobytes())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return WrittenSeries([path], decoded, geometry, study_uid, series_uid, for_uid)


def sitk_read_series(folder: Path) -> tuple[np.ndarray, VolumeGeometry]:
    """The same folder read by SimpleITK's GDCM series reader: an independent geometry and pixel reference."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), VolumeGeometry(
        image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    )
