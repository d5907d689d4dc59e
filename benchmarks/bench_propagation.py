"""Engine vs Meta's reference SAM2VideoPredictor on the same volume, weights and prompts.

Both runs use the same random weights of the same packaged config (no checkpoint can be downloaded on
CI machines; weights do not change the cost), the same slices and the same clicks:
  1. one positive click on the middle slice, propagated forward and backward;
  2. one refinement: a negative click on another slice, propagated both ways again.
The reference is driven the documented way: slices windowed to 8 bits and written as JPEG into a
folder, init_state, add_new_points_or_box, propagate_in_video forward then reverse=True, masks copied
into a volume. Each side runs in its own process so peak memory is its own.

    python benchmarks/bench_propagation.py                      # tiny at 512, 512x512x100, CPU
    python benchmarks/bench_propagation.py --slices 200 --device cuda --image-size 1024

Prints stage times (preparation, encoding, propagation, writing the result), peak memory, and the
reference/engine ratios. Ratios come from one run on one machine; absolute times mean something only
on the machine that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*cannot import name '_C' from 'sam2'.*")

CONFIGS = {"sam2.1-tiny": "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1-small": "configs/sam2.1/sam2.1_hiera_s.yaml"}


class StageTimer:
    """Accumulates wall time per stage; wraps model methods so encoding is timed inside propagation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, obj: Any, method: str, name: str) -> None:
        original = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)

    def split(self, outer: str, inner: list[str]) -> dict[str, float]:
        """Report the outer stage minus the inner ones it contains (e.g. propagation minus encoding)."""
        out = dict(self.totals)
        out[outer] = self.totals.get(outer, 0.0) - sum(self.totals.get(n, 0.0) for n in inner)
        return out


def make_volume(size: int, slices: int) -> np.ndarray:
    """A CT-like int16 volume from nilearn's MNI152 T1 template, resampled to size x size x slices."""
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    vol = torch.from_numpy(t1.transpose(2, 1, 0).copy())[None, None]  # [k, j, i]
    vol = torch.nn.functional.interpolate(vol, size=(slices, size, size), mode="trilinear", align_corners=False)
    hu = vol[0, 0] * 1000.0 - 100.0  # brain tissue ~ soft-tissue Hounsfield range, background ~ -100
    return hu.round().to(torch.int16).numpy()


def prompts(shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    k, j, i = shape
    return [i * 0.5, j * 0.45, k // 2], [i * 0.3, j * 0.6, k // 2 + max(1, k // 10)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_engine(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> dict[str, Any]:
    from medsam2 import SegmentationSession
    from medsam2.devices import resolve_device
    from medsam2.models.build import build_predictor

    device = resolve_device(args.device)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    predictor = build_predictor(CONFIGS[args.model], image_size=args.image_size, state_dict=state, device=device)
    positive, negative = prompts(volume.shape)
    results = {}
    timer = StageTimer(device)
    timer.wrap(predictor, "forward_image", "encoding")
    with timer.stage("total"):
        with timer.stage("preparation"):
            session = SegmentationSession(predictor, volume, intensity="soft_tissue")
        timer.wrap(session, "_write_frame", "writing")
        with timer.stage("propagation"):
            session.add_points(1, [positive], [1])
            masks = session.propagate().masks[1]
    results["first"] = timer.split("propagation", ["encoding", "writing"])
    results["first_mask_voxels"] = int(masks.sum())

    timer = StageTimer(device)
    timer.wrap(predictor, "forward_image", "encoding")
    timer.wrap(session, "_write_frame", "writing")
    with timer.stage("total"):
        with timer.stage("propagation"):
            session.add_points(1, [negative], [0])
            session.propagate()
    results["refinement"] = timer.split("propagation", ["encoding", "writing"])
    results["peak_memory_mb"] = peak_memory_mb(device)
    results["encoded_slices"] = session.cache_stats.encoded
    return results


def run_reference(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> dict[str, Any]:
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2.devices import resolve_device
    from medsam2.models.build import ENGINE_OVERRIDES, image_size_overrides

    device = resolve_device(args.device)
    overrides = image_size_overrides(args.image_size) + list(ENGINE_OVERRIDES)
    predictor = build_sam2_video_predictor(
        CONFIGS[args.model], ckpt, device=str(device), hydra_overrides_extra=overrides
    )
    positive, negative = prompts(volume.shape)
    results: dict[str, Any] = {}

    def propagate_both(state: dict[str, Any], out: np.ndarray, timer: StageTimer) -> None:
        for reverse in (False, True):
            for frame, _ids, logits in predictor.propagate_in_video(state, reverse=reverse):
                with timer.stage("writing"):
                    out[frame] = (logits[0, 0] > 0).cpu().numpy()

    timer = StageTimer(device)
    timer.wrap(predictor, "forward_image", "encoding")
    with tempfile.TemporaryDirectory() as folder, timer.stage("total"):
        with timer.stage("preparation"):
            # the documented path: slices to 8-bit JPEG (same soft-tissue window), then init_state
            lo, hi = 50.0 - 200.0, 50.0 + 200.0
            u8 = ((np.clip(volume.astype(np.float32), lo, hi) - lo) / (hi - lo) * 255).round().astype(np.uint8)
            for n, frame in enumerate(u8):
                Image.fromarray(frame).save(os.path.join(folder, f"{n:05d}.jpg"), quality=95)
            state = predictor.init_state(folder)
        masks = np.zeros(volume.shape, np.uint8)
        with timer.stage("propagation"):
            predictor.add_new_points_or_box(state, int(positive[2]), 1, points=[positive[:2]], labels=[1])
            propagate_both(state, masks, timer)
    results["first"] = timer.split("propagation", ["encoding", "writing"])
    results["first_mask_voxels"] = int(masks.sum())

    timer = StageTimer(device)
    timer.wrap(predictor, "forward_image", "encoding")
    with timer.stage("total"), timer.stage("propagation"):
        predictor.add_new_points_or_box(state, int(negative[2]), 1, points=[negative[:2]], labels=[0])
        propagate_both(state, masks, timer)
    results["refinement"] = timer.split("propagation", ["encoding", "writing"])
    results["peak_memory_mb"] = peak_memory_mb(device)
    return results


def child(args: argparse.Namespace) -> None:
    volume = np.load(args.volume)
    torch.manual_seed(0)
    fn = run_engine if args.side == "engine" else run_reference
    with torch.inference_mode():
        result = fn(args, volume, args.checkpoint)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volume (pixels)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=512, help="model input size (MedSAM2: 512, SAM2: 1024)")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sam2.1-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--side", choices=["engine", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    from medsam2.models.build import build_predictor, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        volume_path, ckpt = os.path.join(tmp, "volume.npy"), os.path.join(tmp, "weights.pt")
        np.save(volume_path, make_volume(args.size, args.slices))
        save_checkpoint(ckpt, build_predictor(CONFIGS[args.model], image_size=args.image_size, seed=0))
        measured = {}
        for side in ("reference", "engine"):
            cmd = [sys.executable, __file__, "--side", side, "--volume", volume_path, "--checkpoint", ckpt]
            cmd += ["--size", str(args.size), "--slices", str(args.slices), "--image-size", str(args.image_size)]
            cmd += ["--model", args.model, "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            measured[side] = json.loads(out.strip().splitlines()[-1])

    ref, eng = measured["reference"], measured["engine"]
    print(
        f"{args.model} at {args.image_size} px, volume {args.size}x{args.size}x{args.slices}, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    stages = ["preparation", "encoding", "propagation", "writing", "total"]
    for run in ("first", "refinement"):
        print(f"\n{run}: {'stage':<12} {'reference s':>12} {'engine s':>10}")
        for stage in stages:
            print(
                f"{'':>{len(run) + 2}}{stage:<12} {ref[run].get(stage, 0.0):>12.2f} {eng[run].get(stage, 0.0):>10.2f}"
            )
        print(f"{'':>{len(run) + 2}}ratio reference/engine (total): {ref[run]['total'] / eng[run]['total']:.2f}x")
    print(f"\npeak memory MB: reference {ref['peak_memory_mb']:.0f}, engine {eng['peak_memory_mb']:.0f}")
    print(f"slices encoded by the engine over both runs: {eng['encoded_slices']} (volume has {args.slices})")
    print(f"mask voxels after the first run: reference {ref['first_mask_voxels']}, engine {eng['first_mask_voxels']}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **measured}, indent=2))


if __name__ == "__main__":
    main()
