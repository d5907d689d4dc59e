"""Training losses: SAM 2's mask losses plus the SAM2-3dMed auxiliary losses (SRPP and BD).

Mask losses (per tracked frame, as SAM 2's training recipe defines them):
- focal loss (alpha 0.25, gamma 2) and Dice loss on the full-resolution mask logits;
- where the decoder proposes several masks (multimask output: one click, or tracking), only the mask
  with the lowest focal + Dice loss is supervised, so the decoder may keep the other proposals for
  other interpretations of an ambiguous prompt;
- the IoU head regresses the real IoU of every proposal (L1);
- the object-score head is trained with binary cross-entropy on "is the object on this slice".
Mask, Dice and IoU terms count only where the object is present: on a slice without it, the target is
the object score alone (SAM 2 replaces the mask of an absent object by a constant, so its pixels carry
no gradient anyway).

Default weights 20 : 1 : 1 : 1 (focal : Dice : IoU : object score) are SAM 2's. The auxiliary weights
0.01 (SRPP) and 0.1 (BD) are the values SAM2-3dMed's appendix is quoted with (see the research notes;
marked uncertain there), so they are options, not constants.

Every term is a mean over frames and batch, so the scale does not grow with the clip length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class LossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    object_score: float = 1.0
    srpp: float = 0.01
    bd: float = 0.1


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Focal loss per mask: ``logits`` and ``targets`` (B, M, H, W) -> (B, M), mean over pixels."""
    logits, targets = logits.float(), targets.float()
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per mask (B, M, H, W) -> (B, M); the +1 keeps an empty target finite."""
    prob = torch.sigmoid(logits.float()).flatten(2)
    t = targets.float().flatten(2)
    numerator = 2 * (prob * t).sum(-1)
    denominator = prob.sum(-1) + t.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised logits with the targets per mask (B, M); 1 when both are empty."""
    pred = (logits > 0).flatten(2)
    t = (targets > 0.5).flatten(2)
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_losses(
    multimask_logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    object_score_logits: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """SAM 2's losses for one frame of a batch.

    ``multimask_logits`` (B, M, H, W) at the target's resolution, ``iou_predictions`` (B, M),
    ``object_score_logits`` (B, 1), ``target`` (B, 1, H, W) in {0, 1}. Returns scalar means over B.
    """
    target = target.float()
    targets = target.expand_as(multimask_logits)
    present = target.flatten(1).amax(-1)  # (B,): 1 where the object is on this slice
    focal = sigmoid_focal_loss(multimask_logits, targets)
    dice = dice_loss(multimask_logits, targets)
    if multimask_logits.size(1) > 1:
        # Supervise only the best proposal (lowest combined loss), as SAM 2 does.
        combined = weights.focal * focal + weights.dice * dice
        best = combined.argmin(dim=1, keepdim=True)
        focal_b, dice_b = focal.gather(1, best)[:, 0], dice.gather(1, best)[:, 0]
    else:
        focal_b, dice_b = focal[:, 0], dice[:, 0]
    actual_iou = mask_iou(multimask_logits.detach(), targets)
    iou = (iou_predictions.float() - actual_iou).abs().mean(-1)  # every proposal's IoU, L1
    object_score = F.binary_cross_entropy_with_logits(
        object_score_logits.float().reshape(-1), present, reduction="none"
    )
    return {
        "focal": (focal_b * present).mean(),
        "dice": (dice_b * present).mean(),
        "iou": (iou * present).mean(),
        "object_score": object_score.mean(),
    }


def segmentation_total(parts: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return (
        weights.focal * parts["focal"]
        + weights.dice * parts["dice"]
        + weights.iou * parts["iou"]
        + weights.object_score * parts["object_score"]
    )


def srpp_loss(predicted_offsets: torch.Tensor, true_offsets: torch.Tensor) -> torch.Tensor:
    """Slice Relative Position Prediction: mean squared error of the predicted signed offsets j - i."""
    return F.mse_loss(predicted_offsets.float(), true_offsets.float())


def boundary_targets(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Boundary band of binary masks (B, 1, H, W): pixels within ``width`` of the object's edge,
    inside or outside (dilation minus erosion), so both sides of the edge are supervised."""
    m = (mask > 0.5).float()
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated - eroded).clamp(0, 1)


def boundary_loss(logits: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy (HED's weighting): boundary pixels are rare, so each class is
    weighted by the other's share of the image. Images without a boundary do not count."""
    b = boundary.float().flatten(1)
    x = logits.float().flatten(1)
    positives = b.sum(-1, keepdim=True)
    total = float(b.size(1))
    beta = 1.0 - positives / total  # share of non-boundary pixels
    weight = beta * b + (1.0 - beta) * (1.0 - b)
    per_pixel = F.binary_cross_entropy_with_logits(x, b, weight=weight, reduction="none")
    has_edge = (positives[:, 0] > 0).float()
    per_image = per_pixel.sum(-1) / positives[:, 0].clamp(min=1)
    if has_edge.sum() == 0:
        return x.sum() * 0.0  # keeps the graph (and DDP's bookkeeping) connected
    return (per_image * has_edge).sum() / has_edge.sum()
