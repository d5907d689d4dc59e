"""Which Slicer the panel runs on: 5.10 or later.

5.10 is the first release whose bundled Python (3.12) can install ``sam2`` (it needs 3.10 or newer;
5.6 and 5.8 bundle 3.9), whose ``vtkSegment`` has ``SetTerminology`` and whose Segmentations logic
has ``vtkSlicerSegmentEditorLogic``, the Segment Editor's own editing logic every write goes through.
"""

from __future__ import annotations

import re
from typing import Any, Optional

MINIMUM_SLICER = (5, 10)
MINIMUM_SLICER_TEXT = f"{MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]}"


def parseVersion(text: str) -> Optional[tuple[int, int]]:
    """(major, minor) from a Slicer version string such as "5.10.0" or "5.11.0-2025-06-01"."""
    match = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def versionProblem(versionText: str) -> Optional[str]:
    """One line for the panel when this Slicer is too old (None when it is supported)."""
    version = parseVersion(versionText)
    if version is None:
        return f"MedSAM2 needs Slicer {MINIMUM_SLICER_TEXT} or later; cannot read this Slicer's version {versionText!r}"
    if version < MINIMUM_SLICER:
        return (
            f"MedSAM2 needs Slicer {MINIMUM_SLICER_TEXT} or later (this is Slicer {version[0]}.{version[1]}); "
            "install a current Slicer from download.slicer.org"
        )
    return None


def apiProblem(slicerModule: Any) -> Optional[str]:
    """The same check by feature, for builds whose version string says little (developer builds)."""
    missing = [name for name in ("vtkSlicerSegmentEditorLogic", "vtkSegment") if not hasattr(slicerModule, name)]
    if not missing and not hasattr(slicerModule.vtkSegment, "SetTerminology"):
        missing.append("vtkSegment.SetTerminology")
    if missing:
        return f"MedSAM2 needs Slicer {MINIMUM_SLICER_TEXT} or later; this Slicer lacks {', '.join(missing)}"
    return None
