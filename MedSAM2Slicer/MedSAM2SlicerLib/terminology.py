"""Segment terminology: Slicer's serialized entries (what the terminology selector and
vtkSegment.SetTerminology use) <-> the engine's coded Terminology (what DICOM-SEG export writes).

A serialized entry is ``context~category~type~typeModifier~regionContext~region~regionModifier``,
each code as ``scheme^value^meaning`` (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry).
"""

from __future__ import annotations

from typing import Any, Optional

import slicer

from medsam2.dicom.terminology import Code, Terminology

# "Tissue" (SNOMED CT 85756007) in Slicer's default list: what Slicer gives a new segment until the
# user picks what it is.
DEFAULT_TERMINOLOGY_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)


def _code(termType: Any) -> Optional[Code]:
    if termType is None:
        return None
    value, scheme, meaning = termType.GetCodeValue(), termType.GetCodingSchemeDesignator(), termType.GetCodeMeaning()
    if not value or not scheme:
        return None
    return Code(str(value), str(scheme), str(meaning or value))


def terminologyFromEntry(entryText: str, label: str, color: tuple[int, int, int]) -> Terminology:
    """The engine's Terminology for a segment, from its Slicer entry (Tissue when it has none)."""
    entry = slicer.vtkSlicerTerminologyEntry()
    if not entryText or not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(entryText, entry):
        slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(DEFAULT_TERMINOLOGY_ENTRY, entry)
    category, kind = _code(entry.GetCategoryObject()), _code(entry.GetTypeObject())
    if category is None or kind is None:
        slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(DEFAULT_TERMINOLOGY_ENTRY, entry)
        category, kind = _code(entry.GetCategoryObject()), _code(entry.GetTypeObject())
    assert category is not None and kind is not None
    return Terminology(
        label=label,
        category=category,
        type=kind,
        type_modifier=_code(entry.GetTypeModifierObject()),
        anatomic_region=_code(entry.GetRegionObject()),
        color=color,
        known=True,
    )


def segmentTerminology(segmentationNode: Any, segmentId: str) -> Terminology:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    rgb = tuple(int(round(255 * c)) for c in segment.GetColor())
    return terminologyFromEntry(segment.GetTerminology(), segment.GetName(), rgb)  # type: ignore[arg-type]


def entryFromNavigator(navigator: Any) -> Optional[str]:
    """The serialized entry chosen in Slicer's terminology navigator widget, or None when no type is
    chosen (qSlicerTerminologyNavigatorWidget.terminologyEntry fills a vtkSlicerTerminologyEntry)."""
    entry = slicer.vtkSlicerTerminologyEntry()
    if not navigator.terminologyEntry(entry) or entry.GetTypeObject() is None:
        return None
    if not entry.GetTypeObject().GetCodeValue():
        return None
    return str(slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry))
