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
            "feature_dtype": None,  # dtype cached features are stored in (None: as computed)
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
        dtype: Optional[torch.dtype] = state.get("feature_dtype")
        if dtype is not None:
            # Under bf16 autocast the two projected high-resolution levels come out in bf16 but the
            # neck's top-down level stays float32 (its interpolation runs in float32): one dtype
            # for every level halves that level's memory and its later reads.
            levels = [lvl.to(dtype) for lvl in levels]
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
        logits, score = self.track_slice_tensors(state, object_id, frame, reverse)
        return logits, float(score)

    def forget_tracked_slice(self, state: dict[str, Any], object_id: int, frame: int) -> None:
        """Drop a tracked (not prompted) slice's output, so no stale memory from an earlier run is
        consulted for it."""
        idx = self.object_index(state, object_id)
        if frame not in state["output_dict_per_obj"][idx]["cond_frame_outputs"]:
            state["output_dict_per_obj"][idx]["non_cond_frame_outputs"].pop(frame, None)
            state["frames_tracked_per_obj"][idx].pop(frame, None)

    # ------------------------------------------------------------------ several objects in one call
    def _memory_window(self) -> int:
        """How far (in slices) tracking one slice looks back for non-prompted memories and pointers."""
        stride = max(1, int(getattr(self, "memory_temporal_stride_for_eval", 1)))
        return max(self.num_maskmem * stride, int(getattr(self, "max_obj_ptrs_in_encoder", 16))) + 1

    def batch_key(self, state: dict[str, Any], object_id: int, frame: int) -> tuple[Any, ...]:
        """Objects with equal keys see the same memory layout on ``frame`` (the same prompted slices,
        the same tracked slices around it), so sam2 can track them as one batch: every tensor of the
        batch then goes through the same ops in the same order as it would alone."""
        out_dict = state["output_dict_per_obj"][self.object_index(state, object_id)]
        window = self._memory_window()
        near = tuple(sorted(t for t in out_dict["non_cond_frame_outputs"] if abs(t - frame) <= window))
        return tuple(sorted(out_dict["cond_frame_outputs"])), near

    def track_slices(
        self, state: dict[str, Any], object_ids: list[int], frame: int, reverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Several objects, none prompted on ``frame`` and all with the same :meth:`batch_key`,
        tracked on one slice in one batched call. Returns mask logits (N, H, W) at the slice's size
        and object-score logits (N,), both still on the device (no host synchronisation)."""
        if len(object_ids) == 1:
            logits, score = self.track_slice_tensors(state, object_ids[0], frame, reverse)
            return logits[None], score.reshape(1)
        idxs = [self.object_index(state, o) for o in object_ids]
        dicts = [state["output_dict_per_obj"][i] for i in idxs]
        window = self._memory_window()
        merged: dict[str, dict[int, dict[str, Any]]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        for key in merged:
            frames = [t for t in dicts[0][key] if key == "cond_frame_outputs" or abs(t - frame) <= window]
            for t in frames:
                outs = [d[key][t] for d in dicts]
                merged[key][t] = {
                    "maskmem_features": torch.cat([o["maskmem_features"] for o in outs]),
                    "maskmem_pos_enc": [
                        torch.cat([o["maskmem_pos_enc"][lvl] for o in outs])
                        for lvl in range(len(outs[0]["maskmem_pos_enc"]))
                    ],
                    "obj_ptr": torch.cat([o["obj_ptr"] for o in outs]),
                    "object_score_logits": torch.cat([o["object_score_logits"] for o in outs]),
                }
        current, pred_masks = self._run_single_frame_inference(
            inference_state=state,
            output_dict=merged,
            frame_idx=frame,
            batch_size=len(object_ids),
            is_init_cond_frame=False,
            point_inputs=None,
            mask_inputs=None,
            reverse=reverse,
            run_mem_encoder=True,
        )
        for b, (idx, out_dict) in enumerate(zip(idxs, dicts)):
            out_dict["non_cond_frame_outputs"][frame] = {
                "maskmem_features": current["maskmem_features"][b : b + 1],
                "maskmem_pos_enc": [p[b : b + 1] for p in current["maskmem_pos_enc"]],
                "pred_masks": current["pred_masks"][b : b + 1],
                "obj_ptr": current["obj_ptr"][b : b + 1],
                "object_score_logits": current["object_score_logits"][b : b + 1],
            }
            state["frames_tracked_per_obj"][idx][frame] = {"reverse": reverse}
        _, video_res = self._get_orig_video_res_output(state, pred_masks)
        return video_res[:, 0], current["object_score_logits"].reshape(-1)

    def track_slice_tensors(
        self, state: dict[str, Any], object_id: int, frame: int, reverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`track_slice` without the host synchronisation of reading the score."""
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
        return video_res[0, 0], current["object_score_logits"].reshape(-1)[0]

    # ------------------------------------------------------------------ opt-in compiled path
    def enable_compiled(self, mode: str = "max-autotune") -> None:
        """Compile memory attention, the memory encoder, the prompt encoder and the mask decoder with
        torch.compile, as sam2's ``vos_optimized`` predictor (SAM2VideoPredictorVOS) does, and use
        its compile-friendly head and memory code. Opt-in: the first slices are slow while kernels
        compile, and results differ from the eager path by bf16 rounding (see the README)."""
        from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

        if isinstance(self, SAM2VideoPredictorVOS):
            return
        # A class with the engine's methods first and VOS's compile-friendly overrides after them.
        self.__class__ = type("CompiledEngineVideoPredictor", (type(self), SAM2VideoPredictorVOS), {})
        for name, dynamic in (
            ("memory_encoder", False),
            ("memory_attention", True),  # the number of memories varies from slice to slice
            ("sam_prompt_encoder", False),
            ("sam_mask_decoder", False),
        ):
            module = getattr(self, name)
            module.forward = torch.compile(module.forward, mode=mode, fullgraph=True, dynamic=dynamic)
