"""The CVPR 2025 interactive 3D protocol's settings and constants (the challenge's evaluation code's
values; see :mod:`medsam2.evaluation.cvpr25` for the protocol itself)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from medsam2.errors import InvalidPromptError

CLICKS = 5
TOLERANCE_MM = 2.0
NSD_DSC_THRESHOLD = 0.2  # NSD counts only where DSC > 0.2
TIME_BUDGET_S_PER_CLASS = 90.0
TIE_SEED = 42
BOX_SEED = 2025
EDT_DOWNSAMPLE_VOXELS = 60_000_000
NO_BOX_PATTERN = r"vessel|arter|vein|vascul"
OBJECT_ID = 1
EXTRA_FIELDS = ("step", "click", "nsd_challenge", "step_seconds", "dsc_auc", "nsd_auc", "within_budget")


@dataclass(frozen=True)
class Cvpr25Protocol:
    clicks: int = CLICKS
    no_box_labels: tuple[str, ...] = ()  # structures evaluated without the box step
    no_box_pattern: str = NO_BOX_PATTERN  # and those whose name matches this (case-insensitive)
    box_seed: int = BOX_SEED

    def __post_init__(self) -> None:
        if self.clicks < 2:
            raise InvalidPromptError(f"the CVPR 2025 protocol needs at least 2 clicks, got {self.clicks}")
        try:
            re.compile(self.no_box_pattern)
        except re.error as exc:
            raise InvalidPromptError(f"no-box pattern {self.no_box_pattern!r} is not a regex: {exc}") from None

    def uses_box(self, label: str) -> bool:
        if label in self.no_box_labels:
            return False
        return not (self.no_box_pattern and re.search(self.no_box_pattern, label, re.IGNORECASE))

    def describe(self) -> str:
        text = (
            f"CVPR 2025 interactive protocol: box (middle slice + slice range) then {self.clicks} clicks "
            "at the centre of the largest 3D error, re-propagating after each"
        )
        if self.no_box_labels or self.no_box_pattern:
            rule = ", ".join(self.no_box_labels + ((f"/{self.no_box_pattern}/",) if self.no_box_pattern else ()))
            text += f"; no box for {rule}"
        return text
