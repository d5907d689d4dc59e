"""DICOM-SEG export, proven with tools nobody here wrote: dciodvfy (dicom3tools) validates every SEG,
dcmqi's segimage2itkimage reconstructs the masks, pydicom and highdicom read labels, codes and references.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import (
    ct_values,
    mni_volume,
    mr_values,
    pydicom_data_file,
    rotation,
    write_enhanced,
    write_series,
)
from dicom_tools import dciodvfy_errors, dcmqi_read
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medsam2.dicom.seg_export import SegExportError, build_dicom_seg, write_dicom_seg
from medsam2.dicom.series import DicomSeries, read_dicom_series
from medsam2.dicom.terminology import _FINDINGS, _ORGANS, ABNORMAL_STRUCTURE, LEFT, RIGHT, TISSUE, terminology_for
from medsam2.geometry import VolumeGeometry
from medsam2.io.segments import Segment

MODEL = "SAM2.1 hiera tiny"
CHECKPOINT = "/models/sam2.1_hiera_tiny.pt"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> DicomSeries:
    values, geometry = mni_volume()
    folder = tmp_path_factory.mktemp("ct")
    write_series(folder, ct_values(values), geometry, descending=True)
    return read_dicom_series(folder)


@pytest.fixture(scope="module")
def oblique_mr(tmp_path_factory) -> DicomSeries:
    values, _ = mni_volume((30, 50))
    geometry = VolumeGeometry(
        (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), tuple(rotation(20.0, -10.0, 30.0).ravel())
    )
    folder = tmp_path_factory.mktemp("mr")
    write_series(folder, mr_values(values), geometry, modality="MR", slope=2.5, intercept=-10.0)
    return read_dicom_series(folder)


def box(shape, k, j, i) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[k[0] : k[1], j[0] : j[1], i[0] : i[1]] = 1
    return mask


def source_uid_by_k(series: DicomSeries) -> list[str]:
    return [str(series.datasets[f.dataset_index].SOPInstanceUID) for f in series.frames]


def assert_dcmqi_matches(
    seg_path: Path, out: Path, series: DicomSeries, masks: list[np.ndarray], fractional=False
):
    """dcmqi's reconstruction of every segment lies on the source grid (same spacing and direction, origin
    at a voxel of it) and holds exactly the mask there, with nothing outside its slab."""
    segments = dcmqi_read(seg_path, out)
    assert len(segments) == len(masks)
    g = series.geometry
    for seg, mask in zip(segments, masks):
        # DICOM stores positions and spacings as decimal strings: equal to that precision.
        np.testing.assert_allclose(seg.spacing, g.spacing, rtol=1e-6)
        np.testing.assert_allclose(seg.direction, g.direction, atol=1e-6)
        offset = g.lps_to_ijk([seg.origin])[0]
        np.testing.assert_allclose(offset, np.round(offset), atol=1e-4)
        i0, j0, k0 = (int(v) for v in np.round(offset))
        assert (i0, j0) == (0, 0) and seg.array.shape[1:] == mask.shape[1:]
        # dcmqi writes a binary segment with its label ID as voxel value, a fractional one as stored (0..255).
        label_id = int(seg.attributes["labelID"])
        expected = (
            np.round(mask * 255).astype(np.int64) if fractional else (mask != 0).astype(np.int64) * label_id
        )
        slab = slice(k0, k0 + seg.array.shape[0])
        np.testing.assert_array_equal(seg.array.astype(np.int64), expected[slab])
        outside = np.ones(mask.shape[0], dtype=bool)
        outside[slab] = False
        assert not expected[outside].any()
    return segments


def frames_by_pydicom(seg_path: Path, series: DicomSeries) -> dict[tuple[int, int], np.ndarray]:
    """(segment number, k) -> frame, rebuilt with pydicom alone from per-frame positions and references."""
    ds = pydicom.dcmread(seg_path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    uids = source_uid_by_k(series)
    frames = {}
    shared = ds.SharedFunctionalGroupsSequence[0]
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        # A macro sits in the frame's item, or in the shared item when equal for all frames.
        identification = (
            item if "SegmentIdentificationSequence" in item else shared
        ).SegmentIdentificationSequence
        segment = int(identification[0].ReferencedSegmentNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        ijk = series.geometry.lps_to_ijk([position])[0]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-4)
        k = int(round(ijk[2]))
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == uids[k]  # per-frame reference to the right slice
        if series.is_multiframe:
            assert int(source.ReferencedFrameNumber) == series.frames[k].frame_number
        frames[(segment, k)] = pixels[n]
    return frames


def test_binary_multi_segment_with_overlap(tmp_path, ct_series):
    shape = ct_series.array.shape
    liver = box(shape, (5, 20), (30, 60), (20, 50))
    tumor = box(shape, (10, 15), (40, 50), (30, 40))  # inside the liver: overlap must survive
    kidney = box(shape, (18, 30), (60, 80), (55, 75))
    segments = [
        Segment(liver, "Liver"),
        Segment(np.zeros(shape, np.uint8), "nothing here"),
        Segment(tumor, "liver tumour"),
        Segment(kidney, "Kidney_Right"),
    ]
    result = write_dicom_seg(
        tmp_path / "seg.dcm", ct_series, segments, model_name=MODEL, checkpoint=CHECKPOINT
    )
    assert result.path == tmp_path / "seg.dcm"
    assert result.skipped_empty == ["nothing here"]
    assert result.segment_numbers == {"Liver": 1, "liver tumour": 2, "Kidney_Right": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]  # no temporary files left

    assert dciodvfy_errors(result.path) == []
    masks = [liver, tumor, kidney]
    dcmqi = assert_dcmqi_matches(result.path, tmp_path / "dcmqi", ct_series, masks)
    assert [s.attributes["SegmentLabel"] for s in dcmqi] == ["Liver", "liver tumour", "Kidney_Right"]
    assert dcmqi[2].attributes["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == RIGHT.value
    assert dcmqi[1].attributes["AnatomicRegionSequence"]["CodeValue"] == "10200004"

    # pydicom only: references, omitted empty frames, pixel content per (segment, slice).
    ds = pydicom.dcmread(result.path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == ct_series.study_instance_uid
    assert ds.FrameOfReferenceUID == ct_series.frame_of_reference_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series.series_instance_uid
    referenced = {
        r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= set(source_uid_by_k(ct_series))
    non_empty = {(n + 1, k) for n, m in enumerate(masks) for k in range(shape[0]) if m[k].any()}
    frames = frames_by_pydicom(result.path, ct_series)
    assert set(frames) == non_empty and int(ds.NumberOfFrames) == len(non_empty)
    for (segment, k), frame in frames.items():
        np.testing.assert_array_equal(frame, masks[segment - 1][k])
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == MODEL and algorithm.AlgorithmVersion == "sam2.1_hiera_tiny.pt"
    assert "/models" not in str(ds)  # the checkpoint's folder stays private

    # highdicom: labels, codes, and masks looked up by source instance.
    seg = hd.seg.segread(result.path)
    liver_desc, tumor_desc, kidney_desc = (seg.get_segment_description(n) for n in (1, 2, 3))
    assert liver_desc.segment_label == "Liver"
    assert liver_desc.segmented_property_type == codes.SCT.Liver
    assert liver_desc.segmented_property_category == codes.SCT.AnatomicalStructure
    assert tumor_desc.segmented_property_type == codes.SCT.Neoplasm
    assert tumor_desc.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert tumor_desc.anatomic_regions[0] == codes.SCT.Liver
    assert kidney_desc.segmented_property_type == codes.SCT.Kidney
    modifier = kidney_desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == (RIGHT.value, "SCT")
    assert liver_desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
    by_source = seg.get_pixels_by_source_instance(
        source_uid_by_k(ct_series), assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(by_source, np.stack(masks, axis=-1))


def test_fractional_on_oblique_mr(tmp_path, oblique_mr):
    shape = oblique_mr.array.shape
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blob = np.clip(1.0 - np.sqrt((k - 10) ** 2 + ((j - 60) / 3) ** 2 + ((i - 50) / 3) ** 2) / 8, 0, 1)
    edge = np.zeros(shape, np.float32)
    edge[3:6, 10:20, 10:20] = 0.25
    result = write_dicom_seg(
        tmp_path / "frac.dcm",
        oblique_mr,
        [Segment(blob.astype(np.float32), "brain"), Segment(edge, "left lung")],
        model_name=MODEL,
        checkpoint=CHECKPOINT,
        segmentation_type="fractional",
    )
    assert dciodvfy_errors(result.path) == []
    assert_dcmqi_matches(result.path, tmp_path / "dcmqi", oblique_mr, [blob, edge], fractional=True)
    seg = hd.seg.segread(result.path)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    assert seg.get_segment_description(2).segmented_property_type == codes.SCT.Lung
    left = seg.get_segment_description(2).SegmentedPropertyTypeCodeSequence[0]
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == LEFT.value
    values = seg.get_pixels_by_source_instance(
        source_uid_by_k(oblique_mr), assert_missing_frames_are_empty=True
    )
    np.testing.assert_allclose(values, np.stack([blob, edge], axis=-1), atol=0.5 / 255 + 1e-6)


def test_enhanced_multiframe_source(tmp_path):
    values, geometry = mni_volume((25, 45))
    write_enhanced(tmp_path / "src" / "mr.dcm", mr_values(values), geometry, descending=True)
    series = read_dicom_series(tmp_path / "src")
    mask = box(series.array.shape, (3, 12), (20, 70), (20, 60))
    result = write_dicom_seg(
        tmp_path / "seg.dcm",
        series,
        [Segment(mask, "brain")],
        model_name=MODEL,
        checkpoint=CHECKPOINT,
        algorithm_type="automatic",
    )
    assert dciodvfy_errors(result.path) == []
    assert_dcmqi_matches(result.path, tmp_path / "dcmqi", series, [mask])
    frames = frames_by_pydicom(result.path, series)  # checks ReferencedFrameNumber per frame
    assert {k for _, k in frames} == set(range(3, 12))
    seg = hd.seg.segread(result.path)
    assert seg.get_segment_description(1).algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC


# Real headers carry odd patient names; highdicom warns about them, which is not under test here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["eCT_Supplemental.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_seg_on_real_headers(tmp_path, name):
    path = pydicom_data_file(name)
    if path is None:
        pytest.skip(f"{name} not available (PyPI package pydicom-data)")
    series = read_dicom_series(path)
    shape = series.array.shape
    mask = box(shape, (0, shape[0]), (shape[1] // 4, shape[1] // 2), (shape[2] // 4, shape[2] // 2))
    result = write_dicom_seg(
        tmp_path / "seg.dcm", series, [Segment(mask, "Läsion ü")], model_name=MODEL, checkpoint=CHECKPOINT
    )
    assert dciodvfy_errors(result.path) == []
    seg = hd.seg.segread(result.path)
    assert seg.get_segment_description(1).segment_label == "Läsion ü"
    ds = pydicom.dcmread(result.path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
    assert_dcmqi_matches(result.path, tmp_path / "dcmqi", series, [mask])


# --- refusals: a clear one-line error and nothing on disk -------------------------------------------


@pytest.mark.parametrize(
    ("segments", "options", "match"),
    [
        (lambda s: [Segment(np.ones((2, 2, 2), np.uint8), "Liver")], {}, "has shape"),
        (lambda s: [Segment(np.ones(s, np.uint8), "x" * 65)], {}, "longer than 64"),
        (lambda s: [Segment(np.full(s, 0.3, np.float32), "Liver")], {}, "other than 0 and 1"),
        (
            lambda s: [Segment(np.full(s, 1.5, np.float32), "Liver")],
            {"segmentation_type": "fractional"},
            "within \\[0, 1\\]",
        ),
        (lambda s: [Segment(np.zeros(s, np.uint8), "Liver")], {}, "every segment is empty"),
        (lambda s: [Segment(np.ones(s, np.uint8), "Liver")], {"segmentation_type": "labelmap"}, "binary"),
        (lambda s: [Segment(np.ones(s, np.uint8), "")], {}, "empty label"),
        (lambda s: [Segment(np.ones(s, np.uint8), "Liver")], {"checkpoint": " "}, "checkpoint is empty"),
        (lambda s: [], {}, "no segments"),
    ],
)
def test_bad_export_requests(tmp_path, ct_series, segments, options, match):
    kwargs = {"model_name": MODEL, "checkpoint": CHECKPOINT, **options}
    with pytest.raises(SegExportError, match=match) as info:
        write_dicom_seg(tmp_path / "seg.dcm", ct_series, segments(ct_series.array.shape), **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_source_without_frame_of_reference(tmp_path):
    path = pydicom_data_file("693_UNCR.dcm")
    if path is None:
        pytest.skip("693_UNCR.dcm not available (PyPI package pydicom-data)")
    series = read_dicom_series(path)
    with pytest.raises(SegExportError, match="no FrameOfReferenceUID"):
        write_dicom_seg(
            tmp_path / "seg.dcm",
            series,
            [Segment(np.ones(series.array.shape, np.uint8), "Liver")],
            model_name=MODEL,
            checkpoint=CHECKPOINT,
        )
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, ct_series, monkeypatch):
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"previous export")
    mask = box(ct_series.array.shape, (1, 3), (1, 3), (1, 3))

    def failing_save(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a SEG")
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_seg(target, ct_series, [Segment(mask, "Liver")], model_name=MODEL, checkpoint=CHECKPOINT)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]


def test_build_without_writing_and_folder_target(tmp_path, ct_series):
    mask = box(ct_series.array.shape, (1, 3), (1, 3), (1, 3))
    seg, info = build_dicom_seg(ct_series, [Segment(mask, "Spleen")], model_name=MODEL, checkpoint=CHECKPOINT)
    assert info.path is None and str(seg.SOPInstanceUID) == info.sop_instance_uid
    written = write_dicom_seg(
        tmp_path, ct_series, [Segment(mask, "Spleen")], model_name=MODEL, checkpoint=CHECKPOINT
    )
    assert written.path == tmp_path / f"{written.sop_instance_uid}.dcm" and written.path.is_file()
    assert dciodvfy_errors(written.path) == []


# --- terminology -------------------------------------------------------------------------------------


def test_builtin_codes_match_dicom_part16():
    """Every code in the table is the SNOMED CT concept pydicom's copy of DICOM PS3.16 gives that meaning."""
    by_value = {}
    for scheme_codes in (codes.SCT,):
        for name in dir(scheme_codes):
            try:
                code = getattr(scheme_codes, name)
            except AttributeError:
                continue
            if not isinstance(code, Code):
                continue
            by_value.setdefault(code.value, set()).add(code.meaning.lower())
    table = [code for _, code, _, _, _ in _ORGANS] + [code for _, code, _ in _FINDINGS]
    table += [TISSUE, ABNORMAL_STRUCTURE, LEFT, RIGHT, terminology_for("liver").category]
    for code in table:
        assert code.scheme == "SCT"
        assert code.meaning.lower() in by_value.get(code.value, set()), code


@pytest.mark.parametrize("label", ["left kidney", "Kidney_Left", "kidney-l", "L Kidney"])
def test_laterality_spellings(label):
    term = terminology_for(label)
    assert term.type.value == "64033007" and term.type_modifier == LEFT and term.label == label


def test_unknown_label_keeps_text_with_generic_codes():
    term = terminology_for("Region of interest 7", segment_index=3)
    assert (term.label, term.category, term.type, term.known) == (
        "Region of interest 7",
        TISSUE,
        TISSUE,
        False,
    )
    assert terminology_for("something", 0).color != terminology_for("something", 1).color
