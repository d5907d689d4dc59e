"""SAM2's video predictor, fed from an in-memory volume and a persistent slice-feature cache.

The tracking itself (memory attention, mask decoding, memory encoding, the order in which frames are
consulted) is ``sam2.SAM2VideoPredictor``'s own code, unchanged; that is what makes our masks equal
the reference's (Testing/Python/test_parity.py). What differs is where frames and features come from:
- frames are prepared on the device from the volume (intensity.SlicePreparer), not loaded from JPEG;
- image features come from features.SliceFeatureCache, encoded in batches along the propagation
  order, instead of the reference's one-frame cache that re-encodes every frame every propagation.

This relies on private methods and the inference-state layout of sam2 (``_get_image_feature``,
``_run_single_frame_inference``, ``_get_orig_video_res_output``, ``_obj_id_to_idx``,
``output_dict_per_obj``); this file is their only user, pyproject pins sam2 below 2.0 and the parity
test fails loudly if their contract changes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from medsam2.features import SliceFeatureCache

# Frames to encode together with a missing one: the next ones the propagation will visit.
PrefetchPlan = Callable[[int], list[int]]


class EngineVideoPredictor(SAM2VideoPredictor):
    """``SAM2VideoPredictor`` whose inference state reads slices from memory and caches features."""

    def init_volume_state(
        self,
        prepare: Callable[[list[int]], torch.Tensor],
        num_frames: int,
        frame_height: int,
        frame_width: int,
        feature_cache: SliceFeatureCache,
        storage_device: Optional[torch.device] = None,
    ) -> dict[str, Any]:
        """The same inference-state dictionary ``init_state`` builds, without loading any frames."""
        device = self.device
        state: dict[str, Any] = {
            "images": None,  # frames are prepared on demand by `prepare`
            "num_frames": num_frames,
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": storage_device is not None and storage_device != device,
            "video_height": frame_height,
            "video_width": frame_width,
            "device": device,
            "storage_device": storage_device or device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            # engine additions
            "prepare_frames": prepare,
            "feature_cache": feature_cache,
            "prefetch_plan": None,
        }
        return state

    @torch.inference_mode()
    def encode_frames(self, state: dict[str, Any], indices: list[int]) -> None:
        """Encode slices in one batch and store their features in the session cache."""
        cache: SliceFeatureCache = state["feature_cache"]
        images = state["prepare_frames"](indices)
        backbone_out = self.forward_image(images)
        if cache.pos_enc is None:
            # Positional encodings depend only on the feature-map size: one copy per session.
            cache.pos_enc = [p[:1].clone() for p in backbone_out["vision_pos_enc"]]
        levels = backbone_out["backbone_fpn"]
        for b, index in enumerate(indices):
            # clone: a view would keep the whole batch alive even where the cache holds one slice
            feats = [lvl[b : b + 1].clone() if len(indices) > 1 else lvl for lvl in levels]
            cache.put(index, feats)

    def _get_image_feature(
        self, inference_state: dict[str, Any], frame_idx: int, batch_size: int
    ) -> tuple[Any, ...]:
        cache: SliceFeatureCache = inference_state["feature_cache"]
        feats = cache.get(frame_idx)
        if feats is None:
            plan: Optional[PrefetchPlan] = inference_state.get("prefetch_plan")
            batch = [frame_idx]
            if plan is not None:
                batch += [i for i in plan(frame_idx) if i != frame_idx and i not in cache]
            self.encode_frames(inference_state, batch)
            feats = cache.get(frame_idx)
            assert feats is not None
        assert cache.pos_enc is not None
        backbone_out = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in feats],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in cache.pos_enc],
        }
        features = self._prepare_backbone_features(backbone_out)
        # sam2's callers ignore the first element (the input image); the engine does not keep
        # prepared images around, so it is None.
        return (None,) + features

    # ------------------------------------------------------------------ tracking, for SegmentationSession
    def object_index(self, state: dict[str, Any], object_id: int) -> int:
        """sam2's index of an object (added on first use)."""
        return int(self._obj_id_to_idx(state, object_id))

    def prompted_slices(self, state: dict[str, Any], object_id: int) -> list[int]:
        """Slices holding the object's prompts (sam2's conditioning frames), in slice order."""
        idx = self.object_index(state, object_id)
        return sorted(state["output_dict_per_obj"][idx]["cond_frame_outputs"])

    def was_tracked(self, state: dict[str, Any], object_id: int, slice_index: int) -> bool:
        idx = state["obj_id_to_idx"].get(int(object_id))
        return idx is not None and slice_index in state["frames_tracked_per_obj"][idx]

    def track_slice(
        self, state: dict[str, Any], object_id: int, frame: int, reverse: bool
    ) -> tuple[torch.Tensor, float]:
        """One object on one slice, exactly as ``propagate_in_video`` does it: a prompted slice returns
        its conditioning output, any other is tracked from memory and stored for later slices.
        Returns the mask logits at the slice's size and the object-score logit."""
        idx = self.object_index(state, object_id)
        out_dict = state["output_dict_per_obj"][idx]
        if frame in out_dict["cond_frame_outputs"]:
            current: dict[str, Any] = out_dict["cond_frame_outputs"][frame]
            pred_masks = current["pred_masks"].to(state["device"], non_blocking=True)
        else:
            current, pred_masks = self._run_single_frame_inference(
                inference_state=state,
                output_dict=out_dict,
                frame_idx=frame,
                batch_size=1,
                is_init_cond_frame=False,
                point_inputs=None,
                mask_inputs=None,
                reverse=reverse,
                run_mem_encoder=True,
            )
            out_dict["non_cond_frame_outputs"][frame] = current
        state["frames_tracked_per_obj"][idx][frame] = {"reverse": reverse}
        _, video_res = self._get_orig_video_res_output(state, pred_masks)
        return video_res[0, 0], float(current["object_score_logits"].reshape(-1)[0])

    def forget_tracked_slice(self, state: dict[str, Any], object_id: int, frame: int) -> None:
        """Drop a tracked (not prompted) slice's output, so no stale memory from an earlier run is
        consulted for it."""
        idx = self.object_index(state, object_id)
        if frame not in state["output_dict_per_obj"][idx]["cond_frame_outputs"]:
            state["output_dict_per_obj"][idx]["non_cond_frame_outputs"].pop(frame, None)
            state["frames_tracked_per_obj"][idx].pop(frame, None)
