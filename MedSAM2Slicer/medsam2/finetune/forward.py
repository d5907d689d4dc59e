"""The training forward pass: SAM 2's own tracking step run with gradients over a prompted clip.

For each clip the prompted slices are processed first (as SAM 2's initial conditioning frames: no
memory), then the clip is tracked forward from the first prompted slice to the end and backward from
it to the start, exactly the order ``SegmentationSession.propagate("both")`` uses at inference, with
the same memory bank (``output_dict``) and SAM 2's ``_track_step`` / ``_encode_memory_in_output``.
Gradients flow through the memories into earlier slices, as in SAM 2's video training.

The image encoder runs without gradients when frozen (the default, as SAM2-3dMed trains). Its output
for a slice then never changes, so it is cached (on the CPU, within a byte budget) and a slice seen
in an earlier step is not encoded again. The decoder's projections of the high-resolution features
(``conv_s0``/``conv_s1``, part of the mask decoder) are applied after the cache, with gradients.

Wrapped in ``DistributedDataParallel`` under torchrun: everything the loss depends on happens in
``forward``, so gradient synchronisation works without special cases.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from medsam2.finetune.data import TrainBatch
from medsam2.finetune.heads import BoundaryHead, SRPPHead
from medsam2.finetune.losses import (
    LossWeights,
    boundary_loss,
    boundary_targets,
    mask_losses,
    segmentation_total,
    srpp_loss,
)
from medsam2.predictor import EngineVideoPredictor

FrameFeatures = tuple[list[torch.Tensor], list[torch.Tensor]]  # backbone FPN levels, position encodings


def srpp_input(top_level: torch.Tensor, size: tuple[int, int], high_res: Optional[list[torch.Tensor]]) -> torch.Tensor:
    """What the SRPP head reads for one slice (see heads.py): the image features of the slice itself,
    before memory attention, as (B, C, H, W): the encoder's top level (``top_level`` (HW, B, C)) and, where
    the model has them, the decoder's trainable stride-8 projection, pooled to the same grid."""
    hw, b, c = top_level.shape
    parts = [top_level.permute(1, 2, 0).reshape(b, c, *size)]
    if high_res is not None:
        parts.append(torch.nn.functional.adaptive_avg_pool2d(high_res[1], size))
    return torch.cat(parts, dim=1)


class EncoderFeatureCache:
    """Frozen-encoder outputs per (case, slice), first come first kept within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self.used = 0
        self._items: OrderedDict[tuple[str, int], list[torch.Tensor]] = OrderedDict()
        self.pos_enc: Optional[list[torch.Tensor]] = None
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> Optional[list[torch.Tensor]]:
        return self._items.get(key)

    def put(self, key: tuple[str, int], levels: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in levels)
        if key in self._items or self.used + size > self.budget_bytes:
            return
        self._items[key] = [t.detach().to("cpu", copy=True) for t in levels]
        self.used += size


class FinetuneModel(nn.Module):
    """SAM 2 plus the optional training heads; ``forward(batch)`` returns the losses."""

    def __init__(
        self,
        sam: EngineVideoPredictor,
        weights: LossWeights,
        srpp: Optional[SRPPHead] = None,
        boundary: Optional[BoundaryHead] = None,
        freeze_encoder: bool = True,
        feature_cache_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.srpp = srpp
        self.boundary = boundary
        self.weights = weights
        self.freeze_encoder = freeze_encoder
        for p in sam.image_encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        self.cache = EncoderFeatureCache(feature_cache_bytes if freeze_encoder else 0)
        # When set, forward keeps the heads' outputs (detached) for scoring: "bd" (logits, band) per
        # frame, "srpp" (predicted, true offsets) per clip batch. Off in training.
        self.keep_head_outputs = False
        self.head_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"bd": [], "srpp": []}

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if self.freeze_encoder:
            # A frozen encoder runs as at inference (no drop-path), so cached features stay valid.
            self.sam.image_encoder.eval()
        return self

    # ----------------------------------------------------------------------------- encoding
    def _encode(self, batch: TrainBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Backbone FPN levels and position encodings for every image row of the batch."""
        encoder = self.sam.image_encoder
        images = batch.images
        if not self.freeze_encoder:
            out = encoder(images)
            return list(out["backbone_fpn"]), list(out["vision_pos_enc"])
        if self.cache.budget_bytes == 0 or not batch.keys:
            with torch.no_grad():
                out = encoder(images)
            return [x.detach() for x in out["backbone_fpn"]], list(out["vision_pos_enc"])
        rows: list[Optional[list[torch.Tensor]]] = [self.cache.get(k) for k in batch.keys]
        missing = [n for n, r in enumerate(rows) if r is None]
        self.cache.hits += len(rows) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            with torch.no_grad():
                out = encoder(images[missing])
            levels = [x.detach() for x in out["backbone_fpn"]]
            if self.cache.pos_enc is None:
                # identical for every slice: one copy, kept on the training device
                self.cache.pos_enc = [p[:1].detach().clone() for p in out["vision_pos_enc"]]
            for m, n in enumerate(missing):
                feats = [x[m : m + 1] for x in levels]
                rows[n] = feats
                self.cache.put(batch.keys[n], feats)
        assert self.cache.pos_enc is not None
        device = images.device
        fpn = [torch.cat([r[i].to(device) for r in rows if r is not None]) for i in range(len(self.cache.pos_enc))]
        pos = [p.expand(images.size(0), -1, -1, -1) for p in self.cache.pos_enc]
        return fpn, pos

    def _frame_features(self, batch: TrainBatch) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], Any]:
        sam = self.sam
        fpn, pos = self._encode(batch)
        if sam.use_high_res_features_in_sam:
            # What SAM2Base.forward_image does after the encoder, kept outside the cache (decoder weights).
            fpn[0] = sam.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = sam.sam_mask_decoder.conv_s1(fpn[1])
        _, vision_feats, vision_pos, feat_sizes = sam._prepare_backbone_features(
            {"backbone_fpn": fpn, "vision_pos_enc": pos}
        )
        b = batch.batch_size
        per_frame = [[x[:, t * b : (t + 1) * b] for x in vision_feats] for t in range(batch.num_frames)]
        per_frame_pos = [[x[:, t * b : (t + 1) * b] for x in vision_pos] for t in range(batch.num_frames)]
        return per_frame, per_frame_pos, feat_sizes

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def processing_order(num_frames: int, prompt_frames: tuple[int, ...]) -> list[tuple[int, bool]]:
        """(frame, reverse) in the order inference visits them: prompted frames, then forward from the
        first prompted frame, then backward from it."""
        first = min(prompt_frames)
        order = [(p, False) for p in sorted(prompt_frames)]
        order += [(t, False) for t in range(first + 1, num_frames) if t not in prompt_frames]
        order += [(t, True) for t in range(first - 1, -1, -1) if t not in prompt_frames]
        return order

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        sam = self.sam
        feats, pos, feat_sizes = self._frame_features(batch)
        num_frames = batch.num_frames
        output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        run_memory = num_frames > 1
        parts: dict[str, list[torch.Tensor]] = {"focal": [], "dice": [], "iou": [], "object_score": [], "bd": []}
        slice_feats: list[Optional[torch.Tensor]] = [None] * num_frames
        for t, reverse in self.processing_order(num_frames, batch.prompt_frames):
            is_cond = t in batch.prompt_frames
            point_inputs = batch.point_inputs.get(t)
            mask_inputs = batch.mask_inputs.get(t)
            current_out, sam_outputs, high_res, pix_feat = sam._track_step(
                t,
                is_cond,
                feats[t],
                pos[t],
                feat_sizes,
                point_inputs,
                mask_inputs,
                output_dict,
                num_frames,
                reverse,
                None,
            )
            _, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
            current_out["pred_masks"] = low_res_masks
            current_out["pred_masks_high_res"] = high_res_masks
            current_out["obj_ptr"] = obj_ptr
            sam._encode_memory_in_output(
                feats[t], feat_sizes, point_inputs, run_memory, high_res_masks, object_score_logits, current_out
            )
            output_dict["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = current_out
            if self.srpp is not None:
                slice_feats[t] = srpp_input(feats[t][-1], feat_sizes[-1], high_res)
            if mask_inputs is not None and sam.use_mask_input_as_output_without_sam:
                continue  # the output is the given mask itself: nothing to learn on this slice
            target = batch.targets[t]
            for name, value in mask_losses(
                high_res_multimasks, ious, object_score_logits, target, self.weights
            ).items():
                parts[name].append(value)
            if self.boundary is not None:
                logits = self.boundary(pix_feat, high_res)
                small = torch.nn.functional.interpolate(target, size=logits.shape[-2:], mode="area")
                band = boundary_targets(small)
                parts["bd"].append(boundary_loss(logits, band))
                if self.keep_head_outputs:
                    self.head_outputs["bd"].append((logits.detach(), band))

        zero = batch.targets.new_zeros(())
        seg = {k: torch.stack(v).mean() if v else zero for k, v in parts.items() if k != "bd"}
        losses: dict[str, torch.Tensor] = dict(seg)
        losses["seg"] = segmentation_total(seg, self.weights)
        total = losses["seg"]
        if self.boundary is not None:
            losses["bd"] = torch.stack(parts["bd"]).mean() if parts["bd"] else zero
            total = total + self.weights.bd * losses["bd"]
        if self.srpp is not None and num_frames > 1:
            stacked = torch.stack([p for p in slice_feats if p is not None])  # (T, B, C, H, W) in slice order
            predicted, true = self.srpp(stacked)
            if self.keep_head_outputs:
                self.head_outputs["srpp"].append((predicted.detach(), true))
            losses["srpp"] = srpp_loss(predicted, true)
            total = total + self.weights.srpp * losses["srpp"]
        losses["total"] = total
        return losses
