"""PACS round trips against a real Orthanc (Debian packages orthanc + orthanc-dicomweb) started on loopback
ports with its own storage: SEG pushed over STOW-RS and C-STORE, a series pulled over QIDO-RS/WADO-RS, and
what Orthanc stored checked through its own REST API. Refusing and unreachable servers give one-line
errors and leave nothing stored."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_values, mni_volume, write_series
from dicom_tools import dciodvfy_errors, free_port, start_orthanc

from medsam2.dicom.pacs import PacsError, c_store, find_series, pull_series, read_series_from_dicomweb, stow_rs
from medsam2.dicom.seg_export import build_dicom_seg, write_dicom_seg
from medsam2.dicom.series import read_dicom_series
from medsam2.io.segments import Segment


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), aet="MEDSAM2TEST")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-strict"), aet="STRICT", refuse_unknown=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    values, geometry = mni_volume((30, 46))
    folder = tmp_path_factory.mktemp("ct")
    written = write_series(folder, ct_values(values), geometry, descending=True)
    return folder, written, read_dicom_series(folder)


def make_seg(tmp_path, series, label="Liver"):
    mask = np.zeros(series.array.shape, np.uint8)
    mask[3:9, 30:70, 20:60] = 1
    result = write_dicom_seg(
        tmp_path / f"{label}.dcm",
        series,
        [Segment(mask, label)],
        model_name="SAM2.1 tiny",
        checkpoint="sam2.1_hiera_tiny.pt",
    )
    assert dciodvfy_errors(result.path) == []  # every SEG the tests write is a valid SEG
    return result


def stored(server, sop_uid):
    """Orthanc's record of an instance, looked up by SOP Instance UID through its REST API (or None)."""
    hits = [
        h
        for h in server.rest("/tools/lookup", data=sop_uid.encode(), method="POST")
        if h["Type"] == "Instance"
    ]
    return hits[0]["ID"] if hits else None


def assert_stored_equal(server, result):
    orthanc_id = stored(server, result.sop_instance_uid)
    assert orthanc_id is not None
    copy = pydicom.dcmread(__import__("io").BytesIO(server.rest(f"/instances/{orthanc_id}/file")))
    original = pydicom.dcmread(result.path)
    assert copy.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert copy.SeriesInstanceUID == original.SeriesInstanceUID
    assert copy.SegmentSequence[0].SegmentLabel == original.SegmentSequence[0].SegmentLabel
    np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)


def test_stow_rs_push(tmp_path, orthanc, ct):
    _, _, series = ct
    result = make_seg(tmp_path, series, "Liver")
    assert stow_rs(orthanc.dicomweb, [result.path]) == [result.sop_instance_uid]
    assert_stored_equal(orthanc, result)


def test_c_store_push(tmp_path, orthanc, ct):
    _, _, series = ct
    result = make_seg(tmp_path, series, "Spleen")
    sent = c_store("127.0.0.1", orthanc.dicom_port, [result.path], called_aet=orthanc.aet)
    assert sent == [result.sop_instance_uid]
    assert_stored_equal(orthanc, result)
    # An in-memory SEG (never written to disk) goes the same way.
    mask = np.zeros(series.array.shape, np.uint8)
    mask[2:4, 10:20, 10:20] = 1
    seg, info = build_dicom_seg(series, [Segment(mask, "Aorta")], model_name="m", checkpoint="c.pt")
    seg.save_as(tmp_path / "aorta.dcm")
    assert dciodvfy_errors(tmp_path / "aorta.dcm") == []
    assert c_store("127.0.0.1", orthanc.dicom_port, [seg], called_aet=orthanc.aet) == [info.sop_instance_uid]
    assert stored(orthanc, info.sop_instance_uid) is not None


def test_pull_series_over_qido_wado(tmp_path, orthanc, ct):
    folder, written, local = ct
    for path in written.files:
        orthanc.upload(path)  # Orthanc's REST API, not our code, puts the series there
    found = [
        s for s in find_series(orthanc.dicomweb, modality="CT") if s.series_instance_uid == written.series_uid
    ]
    assert len(found) == 1 and found[0].study_instance_uid == written.study_uid
    assert found[0].instances == len(written.files)

    series = read_series_from_dicomweb(orthanc.dicomweb, written.series_uid)
    np.testing.assert_array_equal(series.array, local.array)
    assert series.geometry == local.geometry
    assert series.series_instance_uid == written.series_uid

    files = pull_series(
        orthanc.dicomweb, written.series_uid, tmp_path / "pulled", study_uid=written.study_uid
    )
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(p.name for p in files)
    assert len(files) == len(written.files)
    assert [p.name for p in tmp_path.iterdir()] == ["pulled"]  # no staging folder left


# --- refusals ----------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_stow_refused_stores_nothing(tmp_path, strict_orthanc, ct):
    result = make_seg(tmp_path, ct[2], "Kidney")
    with pytest.raises(PacsError, match="HTTP 401") as info:
        stow_rs(strict_orthanc.dicomweb, [result.path])
    assert strict_orthanc.dicomweb in one_line(info)
    assert stored(strict_orthanc, result.sop_instance_uid) is None


def test_c_store_refused_stores_nothing(tmp_path, strict_orthanc, orthanc, ct):
    result = make_seg(tmp_path, ct[2], "Pancreas")
    with pytest.raises(PacsError, match="rejected|refused") as info:
        c_store("127.0.0.1", strict_orthanc.dicom_port, [result.path], called_aet=strict_orthanc.aet)
    one_line(info)
    assert stored(strict_orthanc, result.sop_instance_uid) is None
    with pytest.raises(PacsError, match="rejected the association") as info:
        c_store("127.0.0.1", orthanc.dicom_port, [result.path], called_aet="WRONG-AET")
    assert "WRONG-AET" in one_line(info)
    assert stored(orthanc, result.sop_instance_uid) is None


def test_unreachable_servers(tmp_path, ct):
    result = make_seg(tmp_path, ct[2], "Brain")
    port = free_port()  # nothing listens there
    with pytest.raises(PacsError, match="cannot reach DICOMweb server") as info:
        stow_rs(f"http://127.0.0.1:{port}/dicom-web", [result.path], timeout=5)
    one_line(info)
    with pytest.raises(PacsError, match="connection refused") as info:
        c_store("127.0.0.1", port, [result.path], timeout=5)
    one_line(info)
    with pytest.raises(PacsError, match="cannot reach DICOMweb server"):
        read_series_from_dicomweb(f"http://127.0.0.1:{port}/dicom-web", "1.2.3.4", timeout=5)


def test_pull_unknown_series_and_bad_root(tmp_path, orthanc):
    with pytest.raises(PacsError, match="was not found") as info:
        pull_series(orthanc.dicomweb, "1.2.3.4.5.6", tmp_path / "out")
    one_line(info)
    with pytest.raises(PacsError, match="HTTP 404"):
        find_series(orthanc.url + "/not-dicom-web", series_uid="1.2.3")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(PacsError, match="not an empty folder"):
        pull_series(orthanc.dicomweb, "1.2.3.4.5.6", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
