"""Stretching slices to the model's square input the way the published pipelines do.

Meta's frame loader (``sam2.utils.misc.load_video_frames``) and MedSAM2's inference scripts both turn
each slice into an 8-bit RGB ``PIL.Image`` and call ``Image.resize((S, S))``, whose default filter is
bicubic (Keys' cubic with a = -0.5, widened when shrinking so that it also low-passes). torch's
``bicubic`` with ``antialias=True`` uses that same filter; what is left to copy is PIL's order of work
on 8-bit images: one horizontal pass, rounded and clipped to 0..255, then one vertical pass, rounded
and clipped again. Done that way, the result equals PIL's but for one grey level in ~1e-5 of the
pixels (float and PIL's fixed point rounding a tie differently; Testing/Python/test_resampling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pass(img: torch.Tensor, size: tuple[int, int], quantize: bool) -> torch.Tensor:
    out = F.interpolate(img, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 255.0)
    # PIL rounds half up after each pass of an 8-bit image.
    return torch.floor(out + 0.5) if quantize else out


def resize_grey_levels(img: torch.Tensor, size: int, *, quantize: bool = True) -> torch.Tensor:
    """``(B, 1, H, W)`` grey levels in [0, 255] -> ``(B, 1, size, size)``, as PIL resizes 8-bit frames.

    ``quantize=False`` keeps the intermediate and final values unrounded (a float image).
    """
    height, width = img.shape[-2:]
    if width != size:  # PIL skips a pass whose size does not change
        img = _pass(img, (height, size), quantize)
    if height != size:
        img = _pass(img, (size, size), quantize)
    return img
