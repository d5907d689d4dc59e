"""Per-session cache of image-encoder features, one entry per slice, within a memory budget.

Why: the image encoder is most of SAM2's cost per slice, and Meta's ``SAM2VideoPredictor`` keeps
only the latest frame's features, so every propagation (and every correction after it) re-encodes
every slice. A radiologist refining a segment propagates the same volume many times; holding the
features makes the second and later propagations cost only memory attention and mask decoding.

Memory: for SAM 2.1 tiny at 512 px one slice's features are ~1.05 M values (32x128x128 + 64x64x64
+ 256x32x32), 4.2 MB in float32 and half that in bf16; at 1024 px four times more. A 200-slice CT
at 512 px is ~0.85 GB in float32. The positional encodings are identical for every slice and are
stored once.

Policy when the budget is full: new slices are *not* admitted (the oldest entries stay). Propagation
visits slices in the same order every time, and LRU on such a scan evicts each entry just before it
is needed again (a zero hit rate); keeping the first N slices gives a hit rate of N / total.
The last slice encoded is always held outside the budget so interaction on one slice (clicks,
previews) never re-encodes, as in SAM2's own predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # only for annotations: CacheStats is also used by the torch-free remote client
    import torch

FrameFeatures = list["torch.Tensor"]  # backbone FPN levels for one slice, each (1, C, H, W)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encoded: int = 0
    not_admitted: int = 0


@dataclass
class SliceFeatureCache:
    budget_bytes: int
    _entries: dict[int, FrameFeatures] = field(default_factory=dict)
    _last: Optional[tuple[int, FrameFeatures]] = None
    pos_enc: Optional[list[torch.Tensor]] = None
    bytes_used: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __contains__(self, index: int) -> bool:
        return index in self._entries or (self._last is not None and self._last[0] == index)

    def get(self, index: int) -> Optional[FrameFeatures]:
        found = self._entries.get(index)
        if found is None and self._last is not None and self._last[0] == index:
            found = self._last[1]
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, index: int, features: FrameFeatures) -> bool:
        """Store one slice's features; returns False when the budget is full (held as 'last' only)."""
        self.stats.encoded += 1
        self._last = (index, features)
        if index in self._entries:
            return True
        size = _nbytes(features)
        if self.bytes_used + size > self.budget_bytes:
            self.stats.not_admitted += 1
            return False
        self._entries[index] = features
        self.bytes_used += size
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._last = None
        self.bytes_used = 0
