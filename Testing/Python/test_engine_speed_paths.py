"""The engine's speed paths give the same masks as the plain ones: background encoding, local
corrections, several objects in one batched call, previews on encoded slices, the GPU settings
(checked here for structure only: this suite runs on CPUs), and chunked host copies.

No test here is timed; costs are asserted as counts of model calls."""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch

from conftest import always_absent
from medsam2 import InvalidPromptError, SegmentationSession
from medsam2.background import outward_order
from medsam2.devices import cached_feature_dtype, enable_fast_math
from medsam2.propagation_plan import FrameSink, changed_slices, mask_iou, outward_passes


def blob_volume(shape=(12, 40, 36), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 10, size=shape)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    vol += 200 * (((k - shape[0] / 2) / 5) ** 2 + ((j - 20) / 8) ** 2 + ((i - 18) / 7) ** 2 < 1)
    return vol.astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


@contextmanager
def counting(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Forward calls of each module while the block runs (hooks removed afterwards: the predictor
    fixture is shared)."""
    counts = [0] * len(modules)
    handles = []
    for n, module in enumerate(modules):

        def hook(*_: object, n: int = n) -> None:
            counts[n] += 1

        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def recording_puts(session: SegmentationSession) -> list[int]:
    """The slices the session's feature cache receives, in order."""
    order: list[int] = []
    original = session.feature_cache.put

    def put(index: int, features: list[torch.Tensor]) -> bool:
        order.append(index)
        return original(index, features)

    session.feature_cache.put = put  # type: ignore[method-assign]
    return order


# ---------------------------------------------------------------- background encoding
def test_outward_order_covers_every_slice_nearest_first():
    assert outward_order(2, 6) == [2, 3, 1, 4, 0, 5]
    assert outward_order(0, 3) == [0, 1, 2]
    assert sorted(outward_order(7, 9)) == list(range(9))


def test_background_encoding_goes_outward_and_the_run_after_it_encodes_nothing(tiny_predictor):
    vol = blob_volume()
    plain = SegmentationSession(tiny_predictor, vol)
    plain.add_points(1, [[18, 20, 6]], [1])
    expected = plain.propagate().masks[1]

    s = SegmentationSession(tiny_predictor, vol)
    order = recording_puts(s)
    job = s.start_background_encoding(from_slice=5)
    assert job.wait(timeout=120) and job.error is None
    assert order == outward_order(5, vol.shape[0]) and job.encoded == vol.shape[0]
    s.add_points(1, [[18, 20, 6]], [1])
    assert np.array_equal(s.propagate().masks[1], expected)
    assert s.cache_stats.encoded == vol.shape[0]  # nothing encoded twice


def test_clicks_and_propagation_while_encoding_in_the_background(tiny_predictor):
    vol = blob_volume()
    plain = SegmentationSession(tiny_predictor, vol)
    expected_preview = plain.add_points(1, [[18, 20, 6]], [1]).mask
    expected = plain.propagate().masks[1]

    s = SegmentationSession(tiny_predictor, vol)
    order = recording_puts(s)
    first_batch = threading.Event()
    job = s.start_background_encoding(from_slice=0, progress=lambda done, total: first_batch.set())
    assert first_batch.wait(timeout=60)
    # Slice 6 is far from slice 0: the click encodes it itself rather than waiting for the thread.
    preview = s.add_points(1, [[18, 20, 6]], [1])
    assert np.array_equal(preview.mask, expected_preview)
    assert np.array_equal(s.propagate().masks[1], expected)
    assert job.wait(timeout=120) and job.error is None
    assert sorted(order) == list(range(vol.shape[0]))  # every slice encoded exactly once


def test_background_encoding_can_be_cancelled_and_respects_the_budget(tiny_predictor):
    vol = blob_volume()
    s = SegmentationSession(tiny_predictor, vol)
    started = threading.Event()
    jobs = []

    def cancel_after_first_batch(done: int, total: int) -> None:
        started.wait()
        jobs[0].cancel(wait=False)

    jobs.append(s.start_background_encoding(from_slice=6, progress=cancel_after_first_batch))
    started.set()
    job = jobs[0]
    assert job.wait(timeout=60) and job.error is None
    assert 1 <= job.encoded <= 2 and len(s.feature_cache) == job.encoded  # stopped after a batch or two

    probe = SegmentationSession(tiny_predictor, vol)
    probe.precompute_features()
    per_slice = probe.feature_cache.bytes_used // vol.shape[0]
    tight = SegmentationSession(tiny_predictor, vol, memory_budget_bytes=vol.size * 4 + 4 * per_slice)
    job = tight.start_background_encoding(from_slice=6)
    assert job.wait(timeout=60) and job.budget_full
    assert len(tight.feature_cache) == 4 and tight.cache_stats.encoded == 5  # one past the budget, then stop

    with pytest.raises(InvalidPromptError, match="outside the volume"):
        s.start_background_encoding(from_slice=12)


def test_precompute_features_keeps_its_progress_contract(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    calls: list[tuple[int, int]] = []
    s.precompute_features(lambda done, total: calls.append((done, total)))
    assert calls[-1] == (12, 12) and len(s.feature_cache) == 12


# ---------------------------------------------------------------- previews
def test_a_preview_on_an_encoded_slice_is_one_prompt_and_decoder_pass(tiny_predictor):
    p = tiny_predictor
    s = SegmentationSession(p, blob_volume())
    s.precompute_features()
    with counting(p.image_encoder, p.sam_prompt_encoder, p.sam_mask_decoder) as counts:
        s.add_points(1, [[18, 20, 6]], [1])
    assert counts == [0, 1, 1]
    s.propagate()
    with counting(p.image_encoder, p.sam_prompt_encoder, p.sam_mask_decoder) as counts:
        s.add_points(1, [[10, 12, 9]], [0])  # a correction on a propagated slice
    assert counts == [0, 1, 1]


# ---------------------------------------------------------------- local corrections
def test_local_plan_helpers():
    assert changed_slices({4: 1, 8: 3}, {4: 1, 8: 2, 9: 5}) == [8, 9]
    assert outward_passes([3, 7], prompted={3, 7}) == [(False, 3), (False, 7), (True, 7), (True, 3)]
    assert outward_passes([5], prompted=set()) == [(False, 5), (True, 4)]  # a cleared slice
    a = np.zeros((4, 4), np.uint8)
    assert mask_iou(a, a) == 1.0
    b = a.copy()
    b[:2] = 1
    c = b.copy()
    c[2, 0] = 1
    assert mask_iou(b, c) == pytest.approx(8 / 9)


def test_an_unchanged_correction_stops_after_three_agreeing_slices(tiny_predictor):
    # A model whose object score always says "absent" on tracked slices, so every tracked slice is
    # empty in every run and agrees with the last one (a random-weight model's masks wander).
    absent = always_absent(tiny_predictor)
    vol = blob_volume(shape=(16, 40, 36))
    painted = np.zeros((40, 36), bool)
    painted[12:28, 10:26] = True
    s = SegmentationSession(absent, vol)
    s.add_mask(1, 8, painted)
    first = s.propagate()
    assert first.recomputed[1] == list(range(16))  # the first run is full
    before = first.masks[1].copy()
    s.add_mask(1, 8, painted)  # the same mask again: every later slice agrees with the last run
    with counting(absent.sam_mask_decoder) as decoder:
        again = s.propagate()
    assert again.recomputed[1] == [5, 6, 7, 8, 9, 10, 11]
    assert decoder == [6]  # six tracked slices; the prompted one returns its own output
    assert np.array_equal(again.masks[1], before)
    assert again.propagated[1] == (0, 15)


def test_a_local_correction_stops_at_prompted_slices_and_leaves_other_objects(tiny_predictor):
    vol = blob_volume(shape=(16, 40, 36))
    s = SegmentationSession(tiny_predictor, vol)
    s.add_points(1, [[18, 20, 4]], [1])
    s.add_points(1, [[18, 20, 11]], [1])
    s.add_points(2, [[8, 8, 6]], [1])
    first = s.propagate()
    before = {o: m.copy() for o, m in first.masks.items()}
    s.add_points(1, [[12, 30, 7]], [1])
    result = s.propagate()
    changed = result.recomputed[1]
    assert 7 in changed and set(changed) <= set(range(5, 11))  # never past slices 4 and 11
    untouched = [k for k in range(16) if k not in changed]
    assert np.array_equal(result.masks[1][untouched], before[1][untouched])
    assert result.recomputed[2] == [] and np.array_equal(result.masks[2], before[2])

    # mode="full" re-runs everything, and a new object runs in full even in local mode
    assert s.propagate(mode="full").recomputed[2] == list(range(16))
    s.add_points(3, [[20, 20, 9]], [1])
    result = s.propagate()
    assert result.recomputed[3] == list(range(16)) and result.recomputed[1] == []
    with pytest.raises(InvalidPromptError, match="mode must be"):
        s.propagate(mode="quick")


def test_a_cleared_slice_is_recomputed_by_a_local_run(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    s.add_points(1, [[18, 20, 3]], [1])
    s.add_points(1, [[18, 20, 8]], [1])
    before = s.propagate().masks[1].copy()
    s.clear_slice(1, 8)
    result = s.propagate()
    assert 8 in result.recomputed[1] and min(result.recomputed[1]) >= 4
    untouched = [k for k in range(12) if k not in result.recomputed[1]]
    assert np.array_equal(result.masks[1][untouched], before[untouched])


# ---------------------------------------------------------------- several objects at once
def test_objects_batched_in_one_call_give_the_masks_of_one_at_a_time(tiny_predictor):
    vol = blob_volume()

    def run(batch: bool) -> tuple[dict[int, np.ndarray], int]:
        s = SegmentationSession(tiny_predictor, vol, batch_objects=batch)
        s.add_points(1, [[18, 20, 6]], [1])
        s.add_points(2, [[8, 10, 6]], [1])
        s.add_box(3, [2, 2, 6], [12, 14, 6])
        with counting(tiny_predictor.memory_attention) as attention:
            masks = s.propagate().masks
        return masks, attention[0]

    batched, batched_calls = run(True)
    single, single_calls = run(False)
    for o in (1, 2, 3):
        # Not bit-equal on a CPU: a batch sums in another order (as batched encoding does, see
        # DEVELOPERS.md), so a handful of borderline voxels may flip; that is why batching is the
        # default only on CUDA, where bf16 rounds differently anyway.
        differ = int(np.count_nonzero(batched[o] != single[o]))
        assert differ <= batched[o].size // 1000, f"object {o}: {differ} voxels differ when batched"
        assert iou(batched[o], single[o]) >= 0.99
    assert single_calls == 3 * 11 and batched_calls == 11  # 11 tracked slices, three objects


def test_objects_with_different_prompts_are_not_batched(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume(), batch_objects=True)
    s.add_points(1, [[18, 20, 6]], [1])
    s.add_points(2, [[8, 10, 7]], [1])
    with counting(tiny_predictor.memory_attention) as attention:
        s.propagate()
    # their prompted slices differ, so their memories never line up: one call per object and
    # tracked slice, 11 each (as one at a time)
    assert attention[0] == 2 * 11


# ---------------------------------------------------------------- GPU path, structure only
def test_gpu_settings_structure_on_cpu(tiny_predictor):
    assert cached_feature_dtype(torch.device("cuda")) == torch.bfloat16
    assert cached_feature_dtype(torch.device("cpu")) is None
    assert enable_fast_math(torch.device("cpu")) is False  # the CPU stays bit-compatible

    s = SegmentationSession(tiny_predictor, blob_volume())
    s._state["feature_dtype"] = torch.bfloat16  # what a CUDA session sets
    s.precompute_features()
    cached = s.feature_cache.get(3)
    assert cached is not None and {t.dtype for t in cached} == {torch.bfloat16}


def test_compiled_path_is_opt_in_and_has_sams_vos_structure(tiny_predictor):
    from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

    from medsam2.predictor import EngineVideoPredictor

    p = copy.deepcopy(tiny_predictor)
    assert not isinstance(p, SAM2VideoPredictorVOS)
    original = p.memory_attention.forward
    p.enable_compiled()  # compiles lazily: nothing runs here (a CPU has no use for it)
    assert isinstance(p, EngineVideoPredictor) and isinstance(p, SAM2VideoPredictorVOS)
    assert p.memory_attention.forward is not original and p.sam_mask_decoder.forward is not None
    assert type(p).encode_frames is EngineVideoPredictor.encode_frames


def test_frame_sink_copies_in_chunks():
    written: list[tuple[int, int]] = []
    scores = {1: np.full(8, np.nan, np.float32)}
    sink = FrameSink(write=lambda o, f, logits: written.append((o, f)), scores=scores, chunk=3)
    for f in range(4):
        sink.add(1, f, torch.full((2, 2), float(f)), torch.tensor(f - 1.0))
        assert len(written) == (3 if f >= 2 else 0)
    sink.flush()
    assert written == [(1, 0), (1, 1), (1, 2), (1, 3)] and scores[1][:4].tolist() == [-1, 0, 1, 2]
