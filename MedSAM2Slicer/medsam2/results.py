"""What the engine returns: slice previews and propagation results (plain numpy; no torch import, so
the remote client can return the same types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class SlicePreview:
    """The model's mask on the prompted slice right after a prompt (before propagation)."""

    object_id: int
    slice_index: int
    mask: np.ndarray  # uint8, the 2D slice as cut from the [k, j, i] array (not display-flipped)


@dataclass
class PropagationResult:
    masks: dict[int, np.ndarray]  # uint8 [k, j, i] per object, the whole volume
    probabilities: Optional[dict[int, np.ndarray]]  # float32 [k, j, i] per object when asked for
    propagated: dict[int, tuple[int, int]]  # first and last slice each object's run covered
    object_scores: dict[int, np.ndarray]  # SAM2 object-score logit per slice (NaN where not visited)
    stopped_early: dict[int, list[str]] = field(default_factory=dict)  # directions ended by absence
