"""The image encoder alone, per slice: Meta's SAM2VideoPredictor (its own feature path on frames it
loaded from JPEG), the engine on the caller's thread (precompute_features) and the engine's
background thread (start_background_encoding). Same volume, weights and model size; one process,
after a warm-up. Ratios are reference/engine.

    python benchmarks/bench_encoding.py                     # tiny at 512, 512x512x16, CPU
    python benchmarks/bench_encoding.py --slices 32 --json out.json

Why: a cold first propagation is encoder-bound on a CPU, so this separates the encoder's cost from
what the engine saves by caching features and re-running less.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_propagation import CONFIGS, make_volume, warm_up_engine

warnings.filterwarnings("ignore", message=".*cannot import name '_C' from 'sam2'.*")


def reference_seconds_per_slice(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> float:
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2.models.build import ENGINE_OVERRIDES, image_size_overrides

    predictor = build_sam2_video_predictor(
        CONFIGS[args.model], ckpt, device=args.device,
        hydra_overrides_extra=image_size_overrides(args.image_size) + list(ENGINE_OVERRIDES),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        lo, hi = 50.0 - 200.0, 50.0 + 200.0  # the soft-tissue window the engine side uses
        u8 = ((np.clip(volume.astype(np.float32), lo, hi) - lo) / (hi - lo) * 255).round().astype(np.uint8)
        for n, frame in enumerate(u8):
            Image.fromarray(frame).save(os.path.join(folder, f"{n:05d}.jpg"), quality=95)
        state = predictor.init_state(folder)
    predictor._get_image_feature(state, 0, 1)  # warm-up
    start = time.perf_counter()
    for n in range(len(volume)):
        state["cached_features"] = {}  # sam2 keeps the latest frame only: force the encoder
        predictor._get_image_feature(state, n, 1)
    return (time.perf_counter() - start) / len(volume)


def engine_seconds_per_slice(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> dict[str, float]:
    from medsam2 import SegmentationSession
    from medsam2.models.build import build_predictor

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    predictor = build_predictor(CONFIGS[args.model], image_size=args.image_size, state_dict=state, device=args.device)
    warm_up_engine(predictor, volume, torch.device(args.device))
    out = {}
    for where in ("caller_thread", "background_thread"):
        session = SegmentationSession(predictor, volume, intensity="soft_tissue")
        start = time.perf_counter()
        if where == "caller_thread":
            session.precompute_features()
        else:
            job = session.start_background_encoding(from_slice=len(volume) // 2)
            job.wait()
            if job.error is not None:
                raise job.error
        out[where] = (time.perf_counter() - start) / len(volume)
        session.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volume (pixels)")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sam2.1-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()

    from medsam2.models.build import build_predictor, save_checkpoint

    volume = make_volume(args.size, args.slices)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ckpt = os.path.join(tmp, "weights.pt")
        save_checkpoint(ckpt, build_predictor(CONFIGS[args.model], image_size=args.image_size, seed=0))
        reference = reference_seconds_per_slice(args, volume, ckpt)
        engine = engine_seconds_per_slice(args, volume, ckpt)
    result = {
        "reference_s_per_slice": round(reference, 4),
        "engine_caller_thread_s_per_slice": round(engine["caller_thread"], 4),
        "engine_background_thread_s_per_slice": round(engine["background_thread"], 4),
        "ratio_caller_thread": round(reference / engine["caller_thread"], 2),
        "ratio_background_thread": round(reference / engine["background_thread"], 2),
        "device": args.device, "model": args.model, "image_size": args.image_size,
        "volume": [args.size, args.size, args.slices], "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
