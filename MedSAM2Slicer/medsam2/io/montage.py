"""A PNG montage of slices with the mask overlaid: the quickest way for a person to judge a result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from medsam2.geometry import SliceLayout, VolumeGeometry

# Slicer's first default segment colours, so the montage matches what the panel shows.
SEGMENT_COLOURS = [(241, 214, 145), (128, 174, 128), (216, 101, 79), (111, 184, 210), (221, 130, 101)]


def overlay_montage(
    volume: np.ndarray,
    masks: Sequence[np.ndarray],
    path: Union[str, os.PathLike],
    *,
    geometry: Optional[VolumeGeometry] = None,
    voxel_axis: int = 2,
    window: Optional[tuple[float, float]] = None,
    num_slices: int = 12,
    columns: int = 4,
    tile: int = 256,
    marks: Sequence[tuple[int, float, float]] = (),
) -> list[int]:
    """Write ``num_slices`` evenly spaced slices (through the masks' extent when there is one) with each
    mask blended in its colour and outlined. ``window`` is (lower, upper) for display; ``marks`` are
    prompt points as (slice, column, row) in frame pixels. Returns the slice indices shown."""
    layout = SliceLayout.for_axis(voxel_axis, geometry or VolumeGeometry())
    n = layout.num_slices(volume.shape)
    union = np.zeros(volume.shape, bool)
    for m in masks:
        union |= m > 0
    occupied = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != layout.array_axis)))
    lo, hi = (int(occupied[0]), int(occupied[-1])) if len(occupied) else (0, n - 1)
    shown = sorted({int(round(v)) for v in np.linspace(lo, hi, min(num_slices, hi - lo + 1))})
    if window is None:
        window = (float(np.percentile(volume, 0.5)), float(np.percentile(volume, 99.5)))
    lower, upper = window
    rows = (len(shown) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    for n_tile, index in enumerate(shown):
        grey = np.clip((layout.frame(volume, index).astype(np.float32) - lower) / max(upper - lower, 1e-6), 0, 1)
        rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
        for colour_index, m in enumerate(masks):
            frame_mask = layout.frame(m, index) > 0
            colour = np.array(SEGMENT_COLOURS[colour_index % len(SEGMENT_COLOURS)], np.float32)
            rgb[frame_mask] = 0.55 * rgb[frame_mask] + 0.45 * colour
            edge = frame_mask & ~_erode(frame_mask)
            rgb[edge] = colour
        image = Image.fromarray(rgb.astype(np.uint8))
        scale = tile / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.NEAREST
        )
        draw = ImageDraw.Draw(image)
        for mark_slice, col, row in marks:
            if mark_slice == index:
                x, y = (col + 0.5) * scale, (row + 0.5) * scale
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(0, 255, 0), width=2)
        draw.text((4, 4), f"slice {index}", fill=(255, 255, 0))
        sheet.paste(image, ((n_tile % columns) * tile, (n_tile // columns) * tile))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return shown


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out
