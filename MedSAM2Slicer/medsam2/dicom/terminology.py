"""Coded terminology for segments: SNOMED CT codes for common organs and findings, from a segment label.

DICOM-SEG requires every segment to carry a coded category and type (PS3.3 C.8.20.4, CID 7150/7151), and
PACS viewers, dcmqi and Slicer use those codes, not the free-text label, to recognise what a segment is.
Codes and meanings below are the ones DICOM PS3.16 lists (pydicom's ``codes.SCT`` carries the same
table; a test cross-checks every entry). Laterality is post-coordinated, as DICOM prefers: "left kidney"
is type Kidney with modifier Left, not a pre-coordinated "left kidney" concept. "<organ> <finding>"
labels (e.g. "liver tumor") code the finding and put the organ in the anatomic region.

A label not in the table keeps the user's text as the segment label with the generic Tissue category
and type, which is what Slicer assigns to an unnamed segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str

    def slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


TISSUE = _sct("85756007", "Tissue")
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")


@dataclass(frozen=True)
class Terminology:
    """What a segment is, in codes, plus how it is shown."""

    label: str
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    anatomic_region: Optional[Code] = None
    color: tuple[int, int, int] = (128, 174, 128)
    known: bool = False  # True when the label matched the built-in table

    def slicer_tag(self) -> str:
        """Slicer's serialized TerminologyEntry (segment tag in .seg.nrrd and Slicer scenes)."""
        modifier = self.type_modifier.slicer() if self.type_modifier else "^^"
        region = self.anatomic_region.slicer() if self.anatomic_region else "^^"
        return (
            f"Segmentation category and type - DICOM master list~{self.category.slicer()}"
            f"~{self.type.slicer()}~{modifier}~Anatomic codes - DICOM master list~{region}~^^"
        )


# (names, type code, category, paired left/right, display colour RGB)
_ANAT = ANATOMICAL_STRUCTURE
_ORGANS: list[tuple[tuple[str, ...], Code, Code, bool, tuple[int, int, int]]] = [
    (("liver",), _sct("10200004", "Liver"), _ANAT, False, (221, 130, 101)),
    (("spleen",), _sct("78961009", "Spleen"), _ANAT, False, (157, 108, 162)),
    (("kidney",), _sct("64033007", "Kidney"), _ANAT, True, (185, 102, 83)),
    (("pancreas",), _sct("15776009", "Pancreas"), _ANAT, False, (249, 180, 111)),
    (("lung",), _sct("39607008", "Lung"), _ANAT, True, (197, 165, 145)),
    (("brain",), _sct("12738006", "Brain"), _ANAT, False, (250, 250, 225)),
    (("heart",), _sct("80891009", "Heart"), _ANAT, False, (206, 110, 84)),
    (("aorta",), _sct("15825003", "Aorta"), _ANAT, False, (224, 97, 76)),
    (("bladder", "urinary bladder"), _sct("89837001", "Bladder"), _ANAT, False, (222, 154, 132)),
    (("prostate",), _sct("41216001", "Prostate"), _ANAT, False, (230, 158, 140)),
    (("stomach",), _sct("69695003", "Stomach"), _ANAT, False, (216, 132, 105)),
    (("gallbladder", "gall bladder"), _sct("28231008", "Gallbladder"), _ANAT, False, (139, 150, 98)),
    (("esophagus", "oesophagus"), _sct("32849002", "Esophagus"), _ANAT, False, (211, 171, 143)),
    (("colon",), _sct("71854001", "Colon"), _ANAT, False, (204, 168, 143)),
    (("small intestine", "small bowel"), _sct("30315005", "Small intestine"), _ANAT, False, (205, 167, 142)),
    (("duodenum",), _sct("38848004", "Duodenum"), _ANAT, False, (255, 253, 229)),
    (("adrenal gland", "adrenal"), _sct("23451007", "Adrenal gland"), _ANAT, True, (244, 214, 49)),
    (("trachea",), _sct("44567001", "Trachea"), _ANAT, False, (182, 228, 255)),
    (("spinal cord",), _sct("2748008", "Spinal cord"), _ANAT, False, (244, 214, 49)),
    (("vertebra",), _sct("51282000", "Vertebra"), _ANAT, False, (241, 214, 145)),
    (("bone",), _sct("272673000", "Bone"), _ANAT, False, (241, 214, 145)),
    (("femur",), _sct("71341001", "Femur"), _ANAT, True, (255, 238, 170)),
    (("hippocampus",), _sct("5366008", "Hippocampus"), _ANAT, True, (220, 216, 20)),
    (("cerebellum",), _sct("113305005", "Cerebellum"), _ANAT, False, (230, 148, 34)),
    (
        ("brain ventricle", "brain ventricles"),
        _sct("35764002", "Brain ventricle"),
        _ANAT,
        False,
        (88, 106, 215),
    ),
    (("thyroid", "thyroid gland"), _sct("69748006", "Thyroid"), _ANAT, False, (226, 202, 134)),
    (("rectum",), _sct("34402009", "Rectum"), _ANAT, False, (217, 186, 140)),
    (("uterus",), _sct("35039007", "Uterus"), _ANAT, False, (222, 154, 132)),
    (("inferior vena cava", "ivc"), _sct("64131007", "Inferior vena cava"), _ANAT, False, (0, 151, 206)),
    (("portal vein",), _sct("32764006", "Portal vein"), _ANAT, False, (0, 122, 171)),
    (("breast",), _sct("76752008", "Breast"), _ANAT, True, (255, 192, 203)),
    (("muscle",), _sct("71616004", "Muscle"), TISSUE, False, (192, 104, 88)),
    (("fat",), _sct("256674009", "Fat"), TISSUE, False, (230, 220, 70)),
]

_FINDINGS: list[tuple[tuple[str, ...], Code, tuple[int, int, int]]] = [
    (("tumor", "tumour", "neoplasm"), _sct("108369006", "Neoplasm"), (255, 50, 50)),
    (("lesion",), _sct("52988006", "Lesion"), (255, 128, 0)),
    (("mass",), _sct("4147007", "Mass"), (255, 90, 120)),
    (("metastasis", "metastases", "mets"), _sct("128462008", "Metastasis"), (200, 0, 90)),
    (("cyst",), _sct("367643001", "Cyst"), (120, 200, 255)),
    (("nodule",), _sct("27925004", "Nodule"), (255, 160, 60)),
    (("hemorrhage", "haemorrhage", "bleed"), _sct("50960005", "Hemorrhage"), (170, 0, 0)),
    (("edema", "oedema"), _sct("79654002", "Edema"), (140, 220, 200)),
    (("necrosis",), _sct("6574001", "Necrosis"), (90, 60, 40)),
]

_LEFT_WORDS = ("left", "l", "lt")
_RIGHT_WORDS = ("right", "r", "rt")

# Colours for segments without a table entry, cycled by segment index (distinct on grey CT/MR).
DEFAULT_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
)


def normalize(label: str) -> str:
    """'Kidney_Left' -> 'kidney left': case, underscores, dashes and spacing do not change meaning."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-./]+", " ", label.strip().lower())).strip()


def _build_index() -> dict[str, Terminology]:
    index: dict[str, Terminology] = {}
    for names, code, category, paired, color in _ORGANS:
        for name in names:
            index[name] = Terminology(code.meaning, category, code, color=color, known=True)
            if paired:
                for words, side in ((_LEFT_WORDS, LEFT), (_RIGHT_WORDS, RIGHT)):
                    term = Terminology(
                        f"{code.meaning} {side.meaning.lower()}",
                        category,
                        code,
                        side,
                        color=color,
                        known=True,
                    )
                    for word in words:
                        index[f"{word} {name}"] = term
                        index[f"{name} {word}"] = term
    for names, code, color in _FINDINGS:
        for name in names:
            index[name] = Terminology(code.meaning, ABNORMAL_STRUCTURE, code, color=color, known=True)
    return index


_INDEX = _build_index()
_ORGAN_INDEX = {name: code for names, code, _c, _p, _col in _ORGANS for name in names}
_FINDING_INDEX = {name: code for names, code, _col in _FINDINGS for name in names}


def terminology_for(label: str, segment_index: int = 0) -> Terminology:
    """Codes for ``label``; the user's own label text is always kept as the segment label."""
    key = normalize(label)
    found = _INDEX.get(key)
    if found is not None:
        return replace(found, label=label)
    words = key.split(" ")
    for split in range(1, len(words)):
        organ, finding = " ".join(words[:split]), " ".join(words[split:])
        if organ in _ORGAN_INDEX and finding in _FINDING_INDEX:
            term = _INDEX[finding]
            return replace(term, label=label, anatomic_region=_ORGAN_INDEX[organ])
    color = DEFAULT_PALETTE[segment_index % len(DEFAULT_PALETTE)]
    return Terminology(label, TISSUE, TISSUE, color=color, known=False)


def builtin_labels() -> list[str]:
    """Every label the table recognises (for help texts and completion)."""
    return sorted(_INDEX)
