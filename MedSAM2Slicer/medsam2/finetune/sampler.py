"""Training batches: clips (3D mode) or single slices (2D mode) drawn from the training cases, with
prompts simulated from their masks.

Batches are built exactly as inference sees the data (see :mod:`medsam2.finetune.data`); prompts are
scaled from slice pixels to the model's square input as ``SAM2VideoPredictor`` scales them. 3D mode:
clips of consecutive slices (a video), prompts on one or more slices of each clip, the same clip
positions across the batch so the clips run as one batch. 2D mode: single slices with a box or clicks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from medsam2.datasets.prompts import box_prompt, click_prompt
from medsam2.datasets.training import CaseIndex, Log
from medsam2.errors import InvalidVolumeError
from medsam2.finetune.data import CaseStore, TrainBatch, resize_masks

MODES = ("3d", "2d")
PROMPT_KINDS_3D = ("box", "points", "mask")
PROMPT_KINDS_2D = ("box", "points")
# Box sides move by up to this share of the box's larger side (SAM's box noise is ~10 % of the side).
BOX_JITTER_FRACTION = 0.1


class ClipSampler:
    """Random prompted clips (3D) or slices (2D) from the training cases; all randomness from ``rng``."""

    def __init__(
        self,
        store: CaseStore,
        index: dict[str, CaseIndex],
        case_ids: Sequence[str],
        *,
        mode: str,
        clip_length: int,
        prompt_slices: int,
        prompt_kinds: Sequence[str],
        batch_size: int,
        rng: np.random.Generator,
        log: Optional[Log] = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidVolumeError(f"mode must be 3d or 2d, got {mode!r}")
        allowed = PROMPT_KINDS_3D if mode == "3d" else PROMPT_KINDS_2D
        bad = [k for k in prompt_kinds if k not in allowed]
        if bad or not prompt_kinds:
            raise InvalidVolumeError(
                f"prompts for {mode} training must be among {', '.join(allowed)}, "
                f"got {', '.join(prompt_kinds) or 'none'}"
            )
        if batch_size < 1:
            raise InvalidVolumeError(f"batch size must be at least 1, got {batch_size}")
        self.store = store
        self.mode = mode
        self.prompt_kinds = tuple(prompt_kinds)
        self.batch_size = batch_size
        self.rng = rng
        self.image_size = store.image_size
        if mode == "3d":
            if clip_length < 2:
                raise InvalidVolumeError(f"clip length must be at least 2 slices in 3D mode, got {clip_length}")
            if not 1 <= prompt_slices < clip_length:
                raise InvalidVolumeError(f"prompted slices per clip must be 1..{clip_length - 1}, got {prompt_slices}")
        self.clip_length = clip_length if mode == "3d" else 1
        self.prompt_slices = prompt_slices if mode == "3d" else 1
        pairs = []
        short = []
        for case_id in case_ids:
            entry = index[case_id]
            if entry.num_slices < self.clip_length:
                short.append(case_id)
                continue
            for name, slices in entry.present.items():
                if slices:
                    present = np.zeros(entry.num_slices, dtype=bool)
                    present[list(slices)] = True
                    pairs.append((case_id, name, present))
        if short and log:
            log(
                f"{len(short)} case(s) have fewer than {self.clip_length} slices and are not used for clips: "
                + ", ".join(short[:5])
            )
        if not pairs:
            longest = max((index[c].num_slices for c in case_ids), default=0)
            if short:
                raise InvalidVolumeError(
                    f"clip length {self.clip_length} exceeds the slices of every training case (at most {longest}); "
                    "lower --clip-length"
                )
            raise InvalidVolumeError("no training case holds a labelled structure")
        self.pairs = pairs

    def next_batch(self) -> TrainBatch:
        kind = str(self.rng.choice(self.prompt_kinds))
        positions, samples = self._draw()
        length = self.clip_length
        images, targets, keys, frame_masks = [], [], [], []
        for case_id, name, start in samples:
            prepared = self.store.get(case_id)
            slices = list(range(start, start + length))
            images.append(self.store.images(prepared, slices))  # (T, 3, S, S)
            masks = self.store.masks(prepared, name, slices)
            frame_masks.append(masks)
            targets.append(resize_masks(masks, self.image_size))  # (T, 1, S, S)
            keys.append([(case_id, s) for s in slices])
        image_t = torch.stack(images, dim=1)  # (T, B, 3, S, S)
        target_t = torch.stack(targets, dim=1)  # (T, B, 1, S, S)
        batch = TrainBatch(
            images=image_t.reshape(-1, *image_t.shape[2:]),
            targets=target_t,
            prompt_frames=tuple(int(p) for p in positions),
            prompt_kind=kind,
            keys=[keys[b][t] for t in range(length) for b in range(len(samples))],
        )
        for p in batch.prompt_frames:
            if kind == "mask":
                batch.mask_inputs[p] = target_t[p]
            else:
                batch.point_inputs[p] = self._points(kind, [m[p] for m in frame_masks])
        return batch

    def _draw(self) -> tuple[np.ndarray, list[tuple[str, str, int]]]:
        """Prompt positions shared by the batch and (case, structure, first slice) per clip such that the
        structure is on every prompted slice."""
        length = self.clip_length
        for _ in range(100):
            positions = np.sort(self.rng.choice(length, size=self.prompt_slices, replace=False))
            samples: list[tuple[str, str, int]] = []
            for _b in range(self.batch_size):
                for _try in range(50):
                    case_id, name, present = self.pairs[int(self.rng.integers(len(self.pairs)))]
                    starts = np.arange(len(present) - length + 1)
                    ok = present[starts[:, None] + positions[None, :]].all(axis=1)
                    valid = starts[ok]
                    if len(valid):
                        samples.append((case_id, name, int(self.rng.choice(valid))))
                        break
                else:
                    break
            if len(samples) == self.batch_size:
                return positions, samples
        raise InvalidVolumeError(
            f"cannot cut clips of {length} slices with {self.prompt_slices} prompted slice(s) on the structure; "
            "lower --prompt-slices or --clip-length"
        )

    def _points(self, kind: str, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Box or clicks per clip on one slice, in model input pixels (x, y), padded with label -1."""
        coords: list[list[tuple[float, float]]] = []
        labels: list[list[int]] = []
        positives = int(self.rng.integers(1, 4))
        negatives = int(self.rng.integers(0, 2))
        for mask in masks:
            m = mask.cpu().numpy() != 0
            rows, cols = m.shape
            sx, sy = self.image_size / cols, self.image_size / rows
            if kind == "box":
                r0, c0, r1, c1 = _box_extent(m)
                jitter = int(round(BOX_JITTER_FRACTION * max(r1 - r0 + 1, c1 - c0 + 1)))
                r0, c0, r1, c1 = box_prompt(m, jitter, self.rng)
                coords.append([(c0 * sx, r0 * sy), (c1 * sx, r1 * sy)])
                labels.append([2, 3])
            else:
                points, point_labels = click_prompt(m, positives, negatives, self.rng)
                coords.append([(c * sx, r * sy) for r, c in points])
                labels.append(list(point_labels))
        width = max(len(c) for c in coords)
        device = self.store.device
        coord_t = torch.zeros(len(coords), width, 2, dtype=torch.float32)
        label_t = -torch.ones(len(coords), width, dtype=torch.int32)
        for b, (c, lab) in enumerate(zip(coords, labels)):
            coord_t[b, : len(c)] = torch.tensor(c, dtype=torch.float32)
            label_t[b, : len(lab)] = torch.tensor(lab, dtype=torch.int32)
        return {"point_coords": coord_t.to(device), "point_labels": label_t.to(device)}


def _box_extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])
