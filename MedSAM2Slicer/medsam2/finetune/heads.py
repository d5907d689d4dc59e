"""SAM2-3dMed's auxiliary heads, used for training only (never exported, never needed to load a model).

SRPP (Slice Relative Position Prediction)
    For every ordered pair (i, j) of slices in a clip, predict the signed offset ``j - i`` from the two
    slices' features; trained with mean squared error over all ordered pairs. Volumes, unlike
    videos, run both ways: the head makes the features say which slice lies above the other and how far.
    Which features (issue 17): the slice's own image features before memory attention: the frozen
    encoder's top level plus the decoder's trainable stride-8 projection (``conv_s1``, pooled to the
    same grid), so SRPP's gradient reaches a part of the exported model. The first version read the
    memory-conditioned features (after memory attention). Those mix into each slice what memory
    attention took from the slices processed before it, in the order SAM 2 visits them (out from the
    prompted slice, both ways), and they change fast while memory attention trains; on 60-step MNI152
    runs the held-out offset error was 7.2 to 9.4 slices^2 with them (zero offset: 12) and 4.5 with the
    slice's own features (single runs, so indicative only).
    How: each slice is reduced to a coarse grid (1x1 projection, 4x4 average pool) rather than one mean
    over the slice, which keeps *where* the anatomy lies (what changes from one slice to the next; a
    whole-slice mean keeps little of it), then normalised. SAM2-3dMed's Transformer encoder across the
    clip's slices is optional (``context_layers``; no slice-position encoding, which would hand it the
    answer) and off by default: on fixed features of the starting model, 60 single-clip steps reached a
    held-out error of 3.7 without it and 5.2 with one layer. The pair regressor is the difference of a
    per-slice position, ``p_j - p_i``, in units of the clip length: antisymmetric by construction (the
    offset of (j, i) is minus that of (i, j)) and consistent along chains, as slice offsets are, with
    outputs on the scale of the targets from the first step (the old MLP's output had to grow to +-7).

BD (Boundary Detection)
    A branch beside the mask decoder that predicts a boundary map from the memory-conditioned features
    (what the mask decoder reads) and the decoder's high-resolution skip features (stride 4 and 8), at
    the resolution of SAM 2's low-resolution masks (a quarter of the input size); trained with class-balanced BCE on the
    ground-truth boundary band. Its gradient reaches memory attention and the decoder's skip
    projections (``conv_s0``/``conv_s1``), which is how it sharpens the exported model's edges.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SRPPHead(nn.Module):
    """Pairwise offset regressor: slice features ``(f_i, f_j) -> j - i`` (in slices), see the module notes."""

    def __init__(
        self,
        feature_dim: int = 256,
        hidden_dim: int = 128,
        grid: int = 4,
        reduced_dim: int = 32,
        context_layers: int = 0,
        context_heads: int = 4,
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(feature_dim, reduced_dim, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        flat = reduced_dim * grid * grid
        self.embed = nn.Sequential(nn.Flatten(1), nn.LayerNorm(flat), nn.Linear(flat, hidden_dim), nn.GELU())
        self.context: Optional[nn.TransformerEncoder] = None
        if context_layers > 0:
            layer = nn.TransformerEncoderLayer(hidden_dim, context_heads, 2 * hidden_dim, dropout=0.0, norm_first=True)
            # (norm_first layers: PyTorch warns that its fast path is off; it is, and need not be here)
            self.context = nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False)
        # no biases before the difference p_j - p_i: they cancel in it and would never be trained
        self.norm = nn.LayerNorm(hidden_dim, bias=False)
        self.position = nn.Linear(hidden_dim, 1, bias=False)

    def positions(self, frame_features: torch.Tensor) -> torch.Tensor:
        """(T, B, C, H, W) -> (T, B) positions in units of ``T - 1`` slices."""
        t, b = frame_features.shape[:2]
        x = self.pool(self.reduce(frame_features.float().flatten(0, 1)))
        embedded = self.embed(x).view(t, b, -1)  # (T, B, D): slices are the sequence
        if self.context is not None:
            embedded = self.context(embedded)
        return self.position(self.norm(embedded))[..., 0]

    def forward(self, frame_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frame_features`` (T, B, C, H, W) for the T slices of a clip (in slice order) -> predicted and
        true offsets for all T * (T - 1) ordered pairs of every clip in the batch, flattened."""
        t = frame_features.size(0)
        if t < 2:
            raise ValueError("SRPP needs at least two slices per clip")
        position = self.positions(frame_features) * (t - 1)  # (T, B), in slices
        i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
        keep = i != j
        i, j = i[keep].to(position.device), j[keep].to(position.device)
        predicted = position[j] - position[i]  # (P, B)
        true = (j - i).to(predicted.dtype)[:, None].expand_as(predicted)
        return predicted.reshape(-1), true.reshape(-1)


class BoundaryHead(nn.Module):
    """Boundary logits at stride 4 from stride-16 features plus optional stride-8/stride-4 skips."""

    def __init__(self, feature_dim: int = 256, skip_channels: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        s0, s1 = (tuple(skip_channels) + (0, 0))[:2] if skip_channels else (0, 0)
        mid1 = s1 or 64
        mid0 = s0 or 32
        self.reduce = nn.Conv2d(feature_dim, mid1, kernel_size=3, padding=1)
        self.skip1 = nn.Conv2d(s1, mid1, kernel_size=1) if s1 else None
        self.refine1 = nn.Conv2d(mid1, mid0, kernel_size=3, padding=1)
        self.skip0 = nn.Conv2d(s0, mid0, kernel_size=1) if s0 else None
        self.refine0 = nn.Conv2d(mid0, mid0, kernel_size=3, padding=1)
        self.out = nn.Conv2d(mid0, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, high_res: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """``features`` (B, C, H, W) -> boundary logits (B, 1, 4H, 4W); ``high_res`` is SAM 2's list
        [stride-4 (B, c0, 4H, 4W), stride-8 (B, c1, 2H, 2W)] when the model uses them."""
        x = F.gelu(self.reduce(features.float()))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if high_res is not None and self.skip1 is not None:
            x = x + self.skip1(high_res[1].float())
        x = F.gelu(self.refine1(x))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if high_res is not None and self.skip0 is not None:
            x = x + self.skip0(high_res[0].float())
        x = F.gelu(self.refine0(x))
        return self.out(x)


def boundary_head_for(model: nn.Module) -> BoundaryHead:
    """A BD head whose skip inputs match the SAM 2 model's high-resolution decoder features."""
    decoder = getattr(model, "sam_mask_decoder", None)
    dim = int(getattr(model, "hidden_dim", 256))
    if getattr(model, "use_high_res_features_in_sam", False) and decoder is not None:
        return BoundaryHead(dim, (int(decoder.conv_s0.out_channels), int(decoder.conv_s1.out_channels)))
    return BoundaryHead(dim, ())


def srpp_head_for(model: nn.Module) -> SRPPHead:
    """An SRPP head for what ``forward.srpp_input`` gives it: top-level features plus the stride-8
    projection where the model uses high-resolution features."""
    dim = int(getattr(model, "hidden_dim", 256))
    decoder = getattr(model, "sam_mask_decoder", None)
    if getattr(model, "use_high_res_features_in_sam", False) and decoder is not None:
        dim += int(decoder.conv_s1.out_channels)
    return SRPPHead(dim)
