"""Engine vs Meta's reference SAM2VideoPredictor on the same volume, weights and clicks, as a
radiologist's session goes. Each side runs in its own process (its peak memory is its own), after a
warm-up. Times are seconds from the click to the mask; ratios are reference/engine.

  first             a cold session: click on the middle slice, propagate both ways (the engine
                    encodes inside the propagation; the reference's init_state is included)
  first_preencoded  the same click once the engine's background encoding has finished (the
                    reference: click and propagation after its init_state)
  preview           one click on an encoded slice to its 2D mask (the reference: the first click
                    on a video it has just initialised)
  correction_full   a negative click on another slice, everything re-run (the reference's only way)
  correction_local  the same correction in the engine's default local mode
  corrections_3     three more corrections on different slices
  second_object     a second segment in the same session
  local_vs_full_dice  Dice between local and full corrections with the behaving test model
                    (benchmarks/behaving_model.py; --behaving), null without it

The reference is driven the documented way: slices windowed to 8 bits and written as JPEG into a
folder, init_state, add_new_points_or_box, propagate_in_video forward then reverse=True. Weights are
random (none can be downloaded on CI machines; weights do not change the cost). On CUDA both sides
run under bf16 autocast with TF32, and the reference runs a second time compiled (vos_optimized).

    python benchmarks/bench_propagation.py --json out.json              # tiny at 512, 512x512x100, CPU
    python benchmarks/bench_propagation.py --slices 200 --device cuda --image-size 1024

Ratios come from one run on one machine; absolute times mean something only on the machine that
produced them.
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
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report
    # its parent's peak (the parent that built the weights) when its own is lower.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_engine(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> dict[str, Any]:
    """The radiologist's session, timed step by step (seconds, each from the click to the mask)."""
    from medsam2 import SegmentationSession
    from medsam2.devices import resolve_device
    from medsam2.models.build import build_predictor

    device = resolve_device(args.device)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    predictor = build_predictor(CONFIGS[args.model], image_size=args.image_size, state_dict=state, device=device)
    if args.compile:
        predictor.enable_compiled()
    clicks = click_plan(volume.shape)
    timer = StageTimer(device)
    out: dict[str, Any] = {}
    warm_up_engine(predictor, volume, device)

    # first: a cold session, click, propagate (the encoder runs inside the propagation)
    with timer.stage("first"):
        cold = SegmentationSession(predictor, volume, intensity="soft_tissue")
        cold.add_points(1, [clicks["positive"]], [1])
        cold.propagate()
    # correction_local on the cold session (the default after a first run)
    recomputed = []
    with timer.stage("correction_local"):
        cold.add_points(1, [clicks["negative"]], [0])
        result = cold.propagate()
        local = result.masks[1].copy()
    recomputed.append(len(result.recomputed[1]))
    with timer.stage("corrections_3"):
        for point in clicks["more_negatives"]:
            cold.add_points(1, [point], [0])
            recomputed.append(len(cold.propagate().recomputed[1]))
    with timer.stage("second_object"):
        cold.add_points(2, [clicks["second_object"]], [1])
        cold.propagate()

    # first_preencoded and preview: the background encoding has finished before the click. The
    # cold session ends first: a radiologist has one session per volume, and the reference one state.
    out["encoded_slices"] = cold.cache_stats.encoded
    cold.close()
    del cold
    warm = SegmentationSession(predictor, volume, intensity="soft_tissue")
    with timer.stage("background_encoding"):
        warm.start_background_encoding(from_slice=int(clicks["positive"][2])).wait()
    with timer.stage("first_preencoded"):
        with timer.stage("preview"):
            warm.add_points(1, [clicks["positive"]], [1])
        warm.propagate()
    with timer.stage("correction_full"):
        warm.add_points(1, [clicks["negative"]], [0])
        full = warm.propagate(mode="full").masks[1]
    out["times"] = timer.totals
    out["recomputed_slices"] = recomputed  # per local correction (the first, then the three)
    out["local_vs_full_dice_this_model"] = dice(local, full)
    out["peak_memory_mb"] = peak_memory_mb(device)
    out["encoded_slices"] += warm.cache_stats.encoded
    if args.behaving:
        out["local_vs_full_dice"] = behaving_dice(args, device)
    return out


def warm_up_engine(predictor: Any, volume: np.ndarray, device: torch.device) -> None:
    """One short session first (allocator, kernels, thread pools), as the reference gets."""
    from medsam2 import SegmentationSession

    few = volume[volume.shape[0] // 2 - 1 : volume.shape[0] // 2 + 2]
    s = SegmentationSession(predictor, few, intensity="soft_tissue")
    s.add_points(1, [[few.shape[2] / 2, few.shape[1] / 2, 1]], [1])
    s.propagate()
    s.close()


def behaving_dice(args: argparse.Namespace, device: torch.device) -> float:
    """Mean Dice between local and full corrections with the fine-tuned (behaving) 128 px model on
    the MNI152 template, over a few corrections on different slices."""
    from medsam2 import SegmentationSession
    from medsam2.models.build import build_predictor

    state = torch.load(args.behaving, map_location="cpu", weights_only=True)["model"]
    predictor = build_predictor(CONFIGS["sam2.1-tiny"], image_size=128, state_dict=state, device=device)
    volume, wm = behaving_volume()
    mid = volume.shape[0] // 2
    scores = []
    for offset in (-12, -6, 6, 12):
        sessions = []
        for _mode in ("local", "full"):
            s = SegmentationSession(predictor, volume, intensity="minmax")
            s.add_mask(1, mid, wm[mid])
            s.propagate()
            k = mid + offset
            jj, ii = np.nonzero(wm[k])
            if len(jj) == 0:
                break
            n = len(jj) // 2
            s.add_points(1, [[float(ii[n]), float(jj[n]), k]], [1])
            sessions.append(s)
        if len(sessions) == 2:
            local = sessions[0].propagate(mode="local").masks[1]
            full = sessions[1].propagate(mode="full").masks[1]
            scores.append(dice(local, full))
    return float(np.mean(scores))


def behaving_volume() -> tuple[np.ndarray, np.ndarray]:
    """MNI152 T1 template at 2 mm ([k, j, i]) and its white-matter mask: what the behaving model
    was fine-tuned on (benchmarks/behaving_model.py)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2).get_fdata().astype(np.float32).transpose(2, 1, 0)
    wm = datasets.load_mni152_wm_mask(resolution=2).get_fdata().astype(np.uint8).transpose(2, 1, 0)
    return t1, wm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def click_plan(shape: tuple[int, int, int]) -> dict[str, Any]:
    k, j, i = shape
    mid = k // 2
    step = max(1, k // 10)
    return {
        "positive": [i * 0.5, j * 0.45, mid],
        "negative": [i * 0.3, j * 0.6, mid + step],
        "more_negatives": [
            [i * 0.35, j * 0.55, mid - step],
            [i * 0.6, j * 0.6, mid + 2 * step],
            [i * 0.4, j * 0.4, mid - 2 * step],
        ],
        "second_object": [i * 0.3, j * 0.3, mid],
    }


def run_reference(args: argparse.Namespace, volume: np.ndarray, ckpt: str) -> dict[str, Any]:
    """Meta's SAM2VideoPredictor driven the documented way, through the same clicks."""
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2.devices import resolve_device
    from medsam2.models.build import ENGINE_OVERRIDES, image_size_overrides

    device = resolve_device(args.device)
    overrides = image_size_overrides(args.image_size) + list(ENGINE_OVERRIDES)
    predictor = build_sam2_video_predictor(
        CONFIGS[args.model],
        ckpt,
        device=str(device),
        hydra_overrides_extra=overrides,
        vos_optimized=bool(args.compile),
    )
    clicks = click_plan(volume.shape)
    timer = StageTimer(device)
    masks = np.zeros(volume.shape, np.uint8)

    def propagate_both(state: dict[str, Any], start: Any = None) -> None:
        for reverse in (False, True):
            for frame, _ids, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                masks[frame] = (logits[0, 0] > 0).cpu().numpy()

    def click(state: dict[str, Any], obj: int, point: list[float], label: int) -> None:
        predictor.add_new_points_or_box(state, int(point[2]), obj, points=[point[:2]], labels=[label])

    with tempfile.TemporaryDirectory() as folder:
        # the documented path: slices to 8-bit JPEG (same soft-tissue window), then init_state
        lo, hi = 50.0 - 200.0, 50.0 + 200.0
        u8 = ((np.clip(volume.astype(np.float32), lo, hi) - lo) / (hi - lo) * 255).round().astype(np.uint8)
        for n, frame in enumerate(u8):
            Image.fromarray(frame).save(os.path.join(folder, f"{n:05d}.jpg"), quality=95)
        warm = predictor.init_state(folder)  # warm-up: one click and its preview
        click(warm, 1, clicks["positive"], 1)
        predictor.reset_state(warm)
        with timer.stage("first"):
            with timer.stage("init_state"):
                state = predictor.init_state(folder)
            with timer.stage("first_preencoded"):
                with timer.stage("preview"):
                    click(state, 1, clicks["positive"], 1)
                propagate_both(state)
    with timer.stage("correction"):
        click(state, 1, clicks["negative"], 0)
        propagate_both(state)
    with timer.stage("corrections_3"):
        for point in clicks["more_negatives"]:
            click(state, 1, point, 0)
            propagate_both(state)
    with timer.stage("second_object"):
        click(state, 2, clicks["second_object"], 1)
        # From the new object's slice: started from the earliest prompted slice of any object,
        # sam2 tracks the new object on slices before its own prompt with no memory but that
        # prompt's bf16 features, which fails on a CPU without autocast (dtype mismatch).
        propagate_both(state, start=int(clicks["second_object"][2]))
    times = dict(timer.totals)
    # the reference has one kind of correction: it re-runs everything
    times["correction_full"] = times["correction_local"] = times.pop("correction")
    return {"times": times, "peak_memory_mb": peak_memory_mb(device)}


def child(args: argparse.Namespace) -> None:
    volume = np.load(args.volume)
    torch.manual_seed(0)
    if torch.device(args.device).type == "cuda":
        # the same numerics on both sides: TF32 on, and bf16 autocast around the reference too
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.inference_mode():
        if args.side == "engine":
            result = run_engine(args, volume, args.checkpoint)
        elif torch.device(args.device).type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = run_reference(args, volume, args.checkpoint)
        else:
            result = run_reference(args, volume, args.checkpoint)
    print(json.dumps(result))


KEYS = ("first", "first_preencoded", "preview", "correction_full", "correction_local", "corrections_3", "second_object")


def run_side(side: str, args: argparse.Namespace, volume_path: str, ckpt: str, compile_: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", side, "--volume", volume_path, "--checkpoint", ckpt]
    cmd += ["--image-size", str(args.image_size), "--model", args.model, "--device", args.device]
    if compile_:
        cmd.append("--compile")
    if args.behaving and side == "engine":
        cmd += ["--behaving", str(args.behaving)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volume (pixels)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=512, help="model input size (MedSAM2: 512, SAM2: 1024)")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sam2.1-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--behaving", type=Path, help="behaving test model (benchmarks/behaving_model.py) for local_vs_full_dice"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--side", choices=["engine", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    from medsam2.models.build import build_predictor, save_checkpoint

    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        volume_path, ckpt = os.path.join(tmp, "volume.npy"), os.path.join(tmp, "weights.pt")
        np.save(volume_path, make_volume(args.size, args.slices))
        save_checkpoint(ckpt, build_predictor(CONFIGS[args.model], image_size=args.image_size, seed=0))
        ref = run_side("reference", args, volume_path, ckpt, False)
        eng = run_side("engine", args, volume_path, ckpt, False)
        # On a GPU Meta's own benchmark uses its compiled vos_optimized predictor: both are printed.
        ref_compiled = run_side("reference", args, volume_path, ckpt, True) if cuda else None

    result: dict[str, Any] = {}
    for key in KEYS:
        r, e = ref["times"][key], eng["times"][key]
        result[key] = {"reference_s": round(r, 3), "engine_s": round(e, 3), "ratio": round(r / e, 2) if e else None}
        if ref_compiled is not None:
            rc = ref_compiled["times"][key]
            result[key]["reference_compiled_s"] = round(rc, 3)
            result[key]["ratio_compiled"] = round(rc / e, 2) if e else None
    result["local_vs_full_dice"] = eng.get("local_vs_full_dice")
    result["local_vs_full_dice_random_weights"] = round(eng["local_vs_full_dice_this_model"], 4)
    result["peak_memory_mb"] = {"reference": round(ref["peak_memory_mb"]), "engine": round(eng["peak_memory_mb"])}
    result["background_encoding_s"] = round(eng["times"]["background_encoding"], 3)
    result["local_recomputed_slices"] = eng["recomputed_slices"]
    result["device"] = args.device if not cuda else f"{args.device} ({torch.cuda.get_device_name(0)})"
    result["model"] = args.model
    result["image_size"] = args.image_size
    result["volume"] = [args.size, args.size, args.slices]
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()

    print(f"{args.model} at {args.image_size} px, volume {args.size}x{args.size}x{args.slices}, {result['device']}")
    print(f"{'':<18}{'reference s':>12}{'engine s':>10}{'ratio':>8}")
    for key in KEYS:
        row = result[key]
        print(f"{key:<18}{row['reference_s']:>12.2f}{row['engine_s']:>10.2f}{row['ratio']:>7.2f}x")
    print(f"local_vs_full_dice (behaving model): {result['local_vs_full_dice']}")
    print(f"peak memory MB: {result['peak_memory_mb']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
