"""DICOM-SEG from the panel, on every supported Slicer: the engine's own highdicom writer
(medsam2.dicom.seg_export, the one dciodvfy and dcmqi validate in its tests), referencing the source
series as Slicer's DICOM database holds it, inserted into that database once, and optionally sent to
a DICOMweb (STOW-RS) or DIMSE (C-STORE) server through medsam2.dicom.pacs.

Slicer's own DICOMSegmentationPlugin is in Slicer core only from 5.12 (before, it comes with the
QuantitativeReporting extension), so it is not used. The database is passed in: Slicer's
``slicer.dicomDatabase`` (``fileForInstance``) and an import function (DICOMUtils.importDicom).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from medsam2.errors import InvalidPromptError

from . import geometry, segments
from .terminology import segmentTerminology


class DicomDatabase(Protocol):
    def fileForInstance(self, sopInstanceUid: str) -> str: ...


@dataclass(frozen=True)
class SendTarget:
    """Where to send the SEG after export: DICOMweb root URL, or a DIMSE node."""

    dicomwebUrl: str = ""
    host: str = ""
    port: int = 104
    calledAet: str = "ANY-SCP"


@dataclass
class ExportResult:
    path: Path
    segments: list[str]
    skippedEmpty: list[str] = field(default_factory=list)
    sent: str = ""  # where it was sent, when it was


def sourceFiles(volumeNode: Any, database: DicomDatabase) -> list[str]:
    """The files of the series the volume was loaded from (Slicer's DICOM.instanceUIDs attribute)."""
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        raise InvalidPromptError(
            f"volume {volumeNode.GetName()!r} was not loaded from DICOM, so a DICOM-SEG cannot reference it; "
            "save the segmentation as .seg.nrrd instead"
        )
    files = []
    for uid in uids:
        path = database.fileForInstance(uid)
        if not path or not os.path.isfile(path):
            raise InvalidPromptError(
                f"instance {uid} of {volumeNode.GetName()!r} is not in the DICOM database any more"
            )
        files.append(path)
    return files


def exportDicomSeg(
    segmentationNode: Any,
    volumeNode: Any,
    database: DicomDatabase,
    importFolder: Callable[[str], Any],
    modelName: str,
    checkpoint: str,
    outputFolder: Optional[str] = None,
    send: Optional[SendTarget] = None,
) -> ExportResult:
    """Write every non-empty segment into one DICOM-SEG of the volume's series, import it into the
    database (exactly that file), then send it if asked. Blocking (reads the series from disk)."""
    from medsam2.dicom.seg_export import write_dicom_seg
    from medsam2.dicom.series import read_dicom_series
    from medsam2.io.segments import Segment

    segments.checkSegmentation(segmentationNode)
    files = sourceFiles(volumeNode, database)
    with tempfile.TemporaryDirectory(prefix="medsam2-series-") as linkFolder:
        # The database keeps files in its own tree; the reader takes one folder of one series.
        for n, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(linkFolder, f"{n:05d}.dcm"))
        series = read_dicom_series(linkFolder)
        # The series grid in world RAS: the volume's parent transform applies to it as to the volume.
        ijkToWorld = geometry.nodeToWorldMatrix(volumeNode, "volume") @ series.geometry.ijk_to_ras_matrix()
        dims = series.array.shape[::-1]
        items, names = [], []
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            reference = segments.gridImageFromMatrix(ijkToWorld, dims, segmentationNode)
            mask = segments.readSegmentOnGrid(segmentationNode, segmentId, reference)
            terminology = segmentTerminology(segmentationNode, segmentId)
            items.append(Segment(mask=mask, label=terminology.label, terminology=terminology))
            names.append(terminology.label)
        target = Path(outputFolder or tempfile.mkdtemp(prefix="medsam2-seg-"))
        target.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix="export-", dir=target))  # holds only the new file
        info = write_dicom_seg(fresh, series, items, model_name=modelName, checkpoint=checkpoint)
    assert info.path is not None
    importFolder(str(fresh))  # the folder holds this one file: it is inserted once
    result = ExportResult(
        path=info.path,
        segments=[n for n in names if n not in info.skipped_empty],
        skippedEmpty=list(info.skipped_empty),
    )
    if send is not None:
        result.sent = sendExported(send, info.path)
    return result


def sendExported(target: SendTarget, path: Path) -> str:
    """Send one exported file (blocking: a network call) and say where it went, in one line."""
    from medsam2.dicom import pacs

    if target.dicomwebUrl:
        stored = pacs.stow_rs(target.dicomwebUrl, [path])
        where = target.dicomwebUrl
    else:
        stored = pacs.c_store(target.host, int(target.port), [path], called_aet=target.calledAet)
        where = f"{target.calledAet}@{target.host}:{target.port}"
    return f"DICOM-SEG sent to {where} ({len(stored)} object stored)"


def parseSendTarget(text: str) -> Optional[SendTarget]:
    """The panel's "Send SEG to" field: a DICOMweb root ("https://host/dicom-web") or a DIMSE node
    ("AET@host:port", port 104 when left out); None when empty."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith(("http://", "https://")):
        return SendTarget(dicomwebUrl=text)
    aet, _, address = text.rpartition("@")
    host, _, port = address.partition(":")
    if not host or (port and not port.isdigit()):
        raise InvalidPromptError(f"send target must be https://HOST/dicom-web or AET@HOST:PORT, got {text!r}")
    return SendTarget(host=host, port=int(port or 104), calledAet=aet or "ANY-SCP")
