"""PACS exchange: push objects over DICOMweb STOW-RS (dicomweb-client) or DIMSE C-STORE (pynetdicom),
find series with QIDO-RS and pull them with WADO-RS.

Every failure (unreachable host, refused association, HTTP error, a rejected instance) is a one-line
:class:`PacsError` naming the server and the cause. A pulled series is staged in a temporary folder and
only moved into place once every instance has arrived, so an interrupted pull leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medsam2.dicom.series import DicomSeries, read_dicom_series
from medsam2.errors import MedSAM2Error, one_line
from medsam2.io.atomic import atomic_output

Instance = Union[Dataset, str, "os.PathLike[str]"]


class PacsError(MedSAM2Error, ConnectionError):
    """A PACS or DICOMweb server cannot be reached, refused a request, or rejected an object."""


@dataclass(frozen=True)
class RemoteSeries:
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: str
    description: str
    instances: Optional[int]


# --- DICOMweb ----------------------------------------------------------------------------------------


def _client(url: str, timeout: float, username: Optional[str], password: Optional[str]) -> Any:
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if username is not None:
        session.auth = (username, password or "")
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout)
    # dicomweb-client retries "busy" answers (429/503/504) and connection errors; one retry after ~1 s
    # rides out a restart without making an unreachable server take long to report.
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=500)
    return client


def _web_error(exc: Exception, url: str, action: str, timeout: float) -> PacsError:
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code, reason = exc.response.status_code, exc.response.reason or ""
        hint = {
            401: "check the user name and password",
            403: "the account may not do this",
            404: "check the DICOMweb root URL (e.g. http://host:8042/dicom-web) and the UIDs",
            409: "the server rejected the object (conflict or invalid for it)",
        }.get(code, "see the server log")
        return PacsError(f"DICOMweb server {url} refused to {action} (HTTP {code} {reason}); {hint}")
    if isinstance(exc, requests.exceptions.Timeout):
        return PacsError(
            f"DICOMweb server {url} did not answer within {timeout:g} s while trying to {action}"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return PacsError(
            f"cannot reach DICOMweb server {url} to {action} (connection failed); check the address and that "
            "the server is running"
        )
    return PacsError(f"DICOMweb server {url}: could not {action}: {one_line(exc)}")


def _as_dataset(instance: Instance) -> Dataset:
    if isinstance(instance, Dataset):
        return instance
    try:
        return pydicom.dcmread(instance)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise PacsError(f"cannot read {instance} to send it: {one_line(exc)}") from exc


def stow_rs(
    url: str,
    instances: Sequence[Instance],
    *,
    timeout: float = 30.0,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> list[str]:
    """Store ``instances`` (datasets or file paths) over STOW-RS at DICOMweb root ``url``.

    Returns the SOP Instance UIDs the server confirmed; raises :class:`PacsError` if any was not stored.
    """
    datasets = [_as_dataset(i) for i in instances]
    if not datasets:
        raise PacsError("nothing to send")
    client = _client(url, timeout, username, password)
    try:
        response = client.store_instances(datasets)
    except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client raise several types
        raise _web_error(exc, url, "store the objects", timeout) from exc
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item for item in response.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])
    }
    for uid in sent:
        if uid in failed or uid not in stored:
            reason = failed[uid].get("FailureReason", "") if uid in failed else "not confirmed"
            raise PacsError(f"DICOMweb server {url} did not store instance {uid} (failure reason {reason})")
    return sent


def find_series(
    url: str,
    *,
    study_uid: Optional[str] = None,
    series_uid: Optional[str] = None,
    patient_id: Optional[str] = None,
    modality: Optional[str] = None,
    timeout: float = 30.0,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> list[RemoteSeries]:
    """QIDO-RS series search; every argument given narrows it."""
    filters: dict[str, Any] = {}
    if series_uid:
        filters["SeriesInstanceUID"] = series_uid
    if patient_id:
        filters["PatientID"] = patient_id
    if modality:
        filters["Modality"] = modality
    client = _client(url, timeout, username, password)
    try:
        found = client.search_for_series(
            study_instance_uid=study_uid,
            search_filters=filters or None,
            fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"],
            get_remaining=True,
        )
    except Exception as exc:  # noqa: BLE001
        raise _web_error(exc, url, "search for series", timeout) from exc
    out = []
    for item in found:
        ds = Dataset.from_json(item)
        count = ds.get("NumberOfSeriesRelatedInstances", None)
        out.append(
            RemoteSeries(
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                modality=str(ds.get("Modality", "") or ""),
                series_number=str(ds.get("SeriesNumber", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                instances=int(count) if count not in (None, "") else None,
            )
        )
    return out


def pull_series(
    url: str,
    series_uid: str,
    destination: Union[str, os.PathLike[str]],
    *,
    study_uid: Optional[str] = None,
    timeout: float = 60.0,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> list[Path]:
    """Download every instance of a series over WADO-RS into folder ``destination`` (created; must not
    exist or be empty). Files appear only when all have arrived."""
    target = Path(destination)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PacsError(f"destination {target} already exists and is not an empty folder")
    if study_uid is None:
        matches = find_series(
            url, series_uid=series_uid, timeout=timeout, username=username, password=password
        )
        matches = [m for m in matches if m.series_instance_uid == series_uid]
        if not matches:
            raise PacsError(f"series {series_uid} was not found on DICOMweb server {url}")
        study_uid = matches[0].study_instance_uid
    client = _client(url, timeout, username, password)
    if target.exists():
        target.rmdir()  # empty: replaced atomically by the staged folder below
    names: list[str] = []
    with atomic_output(target) as staging:
        staging.mkdir()
        try:
            for n, ds in enumerate(client.iter_series(study_uid, series_uid), start=1):
                name = f"{n:05d}.dcm"
                _save(ds, staging / name)
                names.append(name)
        except PacsError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _web_error(exc, url, f"retrieve series {series_uid}", timeout) from exc
        if not names:
            raise PacsError(f"DICOMweb server {url} returned no instances for series {series_uid}")
    return [target / name for name in names]


def read_series_from_dicomweb(
    url: str,
    series_uid: str,
    *,
    study_uid: Optional[str] = None,
    timeout: float = 60.0,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> DicomSeries:
    """Pull a series into a temporary folder, read it as :func:`read_dicom_series` does, delete the folder."""
    with tempfile.TemporaryDirectory(prefix="medsam2-pull-") as tmp:
        folder = Path(tmp) / "series"
        pull_series(
            url,
            series_uid,
            folder,
            study_uid=study_uid,
            timeout=timeout,
            username=username,
            password=password,
        )
        return read_dicom_series(folder, series_uid=series_uid)


def _save(ds: Dataset, path: Path) -> None:
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


# --- DIMSE -------------------------------------------------------------------------------------------


def c_store(
    host: str,
    port: int,
    instances: Sequence[Instance],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "MEDSAM2",
    timeout: float = 30.0,
) -> list[str]:
    """Send ``instances`` with C-STORE to the DICOM node ``called_aet`` at ``host:port``.

    Returns the SOP Instance UIDs stored; raises :class:`PacsError` on an unreachable node, a rejected
    association or presentation context, or a failure status.
    """
    from pynetdicom import AE

    datasets = [_as_dataset(i) for i in instances]
    if not datasets:
        raise PacsError("nothing to send")
    node = f"DICOM node {called_aet}@{host}:{port}"
    _check_reachable(host, port, timeout, node)

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PacsError(
                f"{node} rejected the association; check that it knows AE title {calling_aet} "
                f"and is called {called_aet}"
            )
        raise PacsError(f"{node} did not accept an association (aborted or timed out after {timeout:g} s)")
    stored: list[str] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                raise PacsError(f"{node} does not accept {pydicom.uid.UID(str(ds.SOPClassUID)).name} objects")
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.get("Status", -1)) if status else -1
            if code == -1:
                raise PacsError(
                    f"{node} aborted the association instead of storing {ds.SOPInstanceUID}: it refused the "
                    f"object or does not accept AE title {calling_aet} (check its list of known modalities)"
                )
            # 0x0000 success; 0xB000/0xB006/0xB007 are warnings for objects that were stored.
            if code != 0 and (code >> 12) != 0xB:
                raise PacsError(f"{node} refused to store {ds.SOPInstanceUID} (status 0x{code:04X})")
            stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def _check_reachable(host: str, port: int, timeout: float, node: str) -> None:
    # pynetdicom reports an unreachable host only as "association failed"; a plain connect says why.
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise PacsError(f"cannot resolve host of {node} ({one_line(exc)})") from exc
    except ConnectionRefusedError as exc:
        raise PacsError(
            f"cannot reach {node}: connection refused; check the address and that it is running"
        ) from exc
    except OSError as exc:
        raise PacsError(f"cannot reach {node}: {one_line(exc)}") from exc
