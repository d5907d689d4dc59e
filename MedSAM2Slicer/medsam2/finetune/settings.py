"""What a fine-tuning run does (its settings, checked before anything is read or written) and what it
returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from medsam2.errors import MedSAM2Error
from medsam2.finetune.sampler import MODES, PROMPT_KINDS_2D, PROMPT_KINDS_3D
from medsam2.intensity import parse_intensity

DEFAULT_SRPP_WEIGHT = 0.01
DEFAULT_BD_WEIGHT = 0.1
# The SRPP/BD heads start from random weights next to a (usually pretrained) model: at the model's
# learning rate they barely move in a short run (issue 17). They get their own rate, gradient clipping
# and warm-up-and-decay schedule (the same factor as the model's).
DEFAULT_HEAD_LR = 1e-3
# Settings that may differ when a run is resumed: they change how, not what, is trained.
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "feature_cache_gb", "case_cache_gb", "quiet", "out"})


@dataclass(frozen=True)
class FinetuneSettings:
    dataset: str
    out: str
    model: Optional[str] = None  # registry name
    checkpoint: Optional[str] = None  # or a checkpoint file
    config: Optional[str] = None
    image_size: Optional[int] = None
    layout: str = "auto"
    labels: Optional[tuple[str, ...]] = None
    channel: Optional[str] = None
    axis: str = "axial"
    intensity: Optional[str] = None  # None: the model's recipe for the dataset's modality, else min-max
    mode: str = "3d"
    clip_length: int = 8
    prompt_slices: int = 1
    prompts: Optional[tuple[str, ...]] = None  # None: box, points and mask (3D) / box and points (2D)
    epochs: int = 10
    steps: int = 100  # optimizer steps per epoch
    lr: float = 1e-4
    head_lr: Optional[float] = None  # None: DEFAULT_HEAD_LR for the new SRPP/BD heads
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None  # None: 5 % of all steps, at most 200
    grad_clip: float = 1.0
    batch: int = 1
    accumulate: int = 1
    srpp_weight: Optional[float] = None  # None: 0.01 in 3D mode, off in 2D mode
    bd_weight: float = DEFAULT_BD_WEIGHT
    unfreeze_encoder: bool = False
    val_fraction: float = 0.2
    val_prompt: str = "box"
    val_max_slices: int = 5  # 2D mode: slices scored per structure
    seed: int = 0
    device: str = "auto"
    feature_cache_gb: Optional[float] = None  # None: 4 GiB when training on the CPU, else off
    case_cache_gb: float = 8.0  # host memory for decoded training cases
    quiet: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be 3d or 2d, got {self.mode!r}")
        for name in ("epochs", "steps", "batch", "accumulate", "val_max_slices"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            problems.append(f"learning rate must be positive, got {self.lr}")
        if self.head_lr is not None and (not self.head_lr > 0 or not math.isfinite(self.head_lr)):
            problems.append(f"head learning rate must be positive, got {self.head_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("weight decay and gradient clipping cannot be negative")
        if self.srpp_weight is not None and self.srpp_weight < 0 or self.bd_weight < 0:
            problems.append("SRPP and BD weights cannot be negative")
        if self.mode == "2d" and self.srpp_weight:
            problems.append("SRPP compares slices of a clip and has no pairs in 2D mode; pass --srpp-weight 0")
        if self.mode == "3d" and self.clip_length < 2:
            problems.append(f"clip length must be at least 2 slices, got {self.clip_length}")
        if self.mode == "3d" and not 1 <= self.prompt_slices < self.clip_length:
            problems.append(
                f"prompted slices per clip must be 1 to {self.clip_length - 1} (at least one slice is tracked), "
                f"got {self.prompt_slices}"
            )
        if self.val_prompt not in ("box", "points", "mask") or (self.mode == "2d" and self.val_prompt == "mask"):
            problems.append(f"validation prompt {self.val_prompt!r} is not one of box, points (or mask in 3D)")
        allowed = PROMPT_KINDS_3D if self.mode == "3d" else PROMPT_KINDS_2D
        if self.prompts is not None and (not self.prompts or any(k not in allowed for k in self.prompts)):
            problems.append(f"prompts for {self.mode} training must be among {', '.join(allowed)}")
        if self.intensity is not None:
            try:
                parse_intensity(self.intensity)
            except MedSAM2Error as exc:
                problems.append(str(exc))
        if (self.feature_cache_gb is not None and self.feature_cache_gb < 0) or self.case_cache_gb < 0:
            problems.append("cache sizes cannot be negative")
        if problems:
            raise MedSAM2Error(problems[0])

    @property
    def effective_srpp_weight(self) -> float:
        if self.srpp_weight is not None:
            return float(self.srpp_weight)
        return DEFAULT_SRPP_WEIGHT if self.mode == "3d" else 0.0

    @property
    def prompt_kinds(self) -> tuple[str, ...]:
        if self.prompts:
            return tuple(self.prompts)
        return PROMPT_KINDS_3D if self.mode == "3d" else PROMPT_KINDS_2D

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("labels", "prompts"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


@dataclass
class FinetuneResult:
    out: Path
    model_path: Path
    best_path: Optional[Path]
    step: int
    epoch: int
    baseline_dice: Optional[float]
    best_dice: Optional[float]
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
