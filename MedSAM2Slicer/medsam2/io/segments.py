"""A segmented object as it leaves the engine: a mask on the volume grid, its label and its terminology.

Shared by every exporter (DICOM-SEG, .seg.nrrd, NIfTI label maps) so a label resolves to the same codes
and colour in all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from medsam2.dicom.terminology import Terminology, terminology_for


@dataclass
class Segment:
    """``mask`` is ``[k, j, i]`` on the volume grid: 0/1 (or boolean) for binary outputs, probabilities in
    [0, 1] for fractional DICOM-SEG. ``terminology`` defaults to ``terminology_for(label)``."""

    mask: np.ndarray
    label: str
    terminology: Optional[Terminology] = None


def resolved_terminologies(segments: Sequence[Segment]) -> list[Terminology]:
    """Each segment's terminology; unknown labels get palette colours by position, so they differ."""
    return [s.terminology or terminology_for(s.label, n) for n, s in enumerate(segments)]
