"""SAM2-3dMed's auxiliary heads, used for training only (never exported, never needed to load a model).

SRPP (Slice Relative Position Prediction)
    For every ordered pair (i, j) of slices in a clip, predict the signed offset ``j - i`` from the two
    slices' feature vectors; trained with mean squared error over all ordered pairs. Volumes, unlike
    videos, run both ways: the head makes the features say which slice lies above the other and how far.
    Which features: the image encoder stays frozen (SAM2-3dMed), so a head reading the raw encoder
    output could only train itself and would change nothing in the exported model. It reads the
    memory-conditioned features instead (the image features after memory attention, which is trained):
    on prompted slices these are the frozen encoder features plus SAM 2's no-memory embedding, on
    tracked slices they carry what memory attention took from the neighbouring slices.

BD (Boundary Detection)
    A branch beside the mask decoder that predicts a boundary map from the same memory-conditioned
    features and the decoder's high-resolution skip features (stride 4 and 8), at the resolution of
    SAM 2's low-resolution masks (a quarter of the input size); trained with class-balanced BCE on the
    ground-truth boundary band. Its gradient reaches memory attention and the decoder's skip
    projections (``conv_s0``/``conv_s1``), which is how it sharpens the exported model's edges.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SRPPHead(nn.Module):
    """Pairwise offset regressor: ``(e_i, e_j) -> j - i`` (in slices)."""

    def __init__(self, feature_dim: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        self.project = nn.Linear(feature_dim, hidden_dim)
        # (e_i, e_j, e_j - e_i): the difference term lets the regressor be antisymmetric, as j - i is.
        self.regress = nn.Sequential(
            nn.GELU(), nn.Linear(3 * hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1)
        )

    def forward(self, frame_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frame_features`` (T, B, C, H, W) for the T slices of a clip (in slice order) -> predicted and
        true offsets for all T * (T - 1) ordered pairs of every clip in the batch, flattened."""
        t = frame_features.size(0)
        if t < 2:
            raise ValueError("SRPP needs at least two slices per clip")
        pooled = self.project(frame_features.float().mean(dim=(-2, -1)))  # (T, B, D)
        i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
        keep = i != j
        i, j = i[keep].to(pooled.device), j[keep].to(pooled.device)
        pairs = torch.cat([pooled[i], pooled[j], pooled[j] - pooled[i]], dim=-1)  # (P, B, 3D)
        predicted = self.regress(pairs)[..., 0]  # (P, B)
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
    return SRPPHead(int(getattr(model, "hidden_dim", 256)))
