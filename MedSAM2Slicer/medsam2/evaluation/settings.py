"""What an evaluation run does: the prompt protocol, propagation and metric settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from medsam2.api import DIRECTIONS
from medsam2.errors import InvalidPromptError
from medsam2.evaluation.cvpr25_protocol import Cvpr25Protocol
from medsam2.evaluation.protocols import PromptProtocol


@dataclass(frozen=True)
class EvaluationSettings:
    protocol: PromptProtocol = field(default_factory=PromptProtocol)
    direction: str = "both"
    stop_when_absent: Optional[int] = None
    axis: str = "axial"
    intensity: Optional[str] = None  # parse_intensity text ("abdomen", "400,40", "mri"); None: min-max
    tolerance_mm: float = 1.0
    memory_budget_bytes: Optional[int] = None
    save_predictions: bool = False
    cvpr25: Optional[Cvpr25Protocol] = None  # the CVPR 2025 interactive protocol instead of ``protocol``

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise InvalidPromptError(
                f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
            )
        if self.stop_when_absent is not None and self.stop_when_absent < 1:
            raise InvalidPromptError(
                f"stop-when-absent must be at least 1 slice, got {self.stop_when_absent}"
            )
        if not self.tolerance_mm >= 0:
            raise InvalidPromptError(
                f"NSD tolerance must be a non-negative number of mm, got {self.tolerance_mm}"
            )
        if self.protocol.per_slice and self.protocol.rounds:
            raise InvalidPromptError(
                "the Medical-SAM2 per-slice protocol has no interaction rounds; use --rounds 0"
            )
        if self.cvpr25 is not None and (self.protocol.per_slice or self.protocol.rounds):
            raise InvalidPromptError("the CVPR 2025 protocol sets its own prompts; drop the other protocol options")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("memory_budget_bytes")  # changes nothing in the results; free to differ on resume
        out.pop("save_predictions")
        if out["cvpr25"] is None:
            out.pop("cvpr25")  # results folders written before the protocol existed stay resumable
        return out
