"""A small SAM 2.1 tiny model (128 px) that behaves like a trained one, for the benchmark's quality
figures: fine-tuned with ``medsam2 finetune`` from random weights on nilearn's MNI152 template with its
white-matter map as the label, until its validation Dice is at least 0.8.

Why: random weights give masks that cover most of the volume and never end, so they cannot show what
a local correction (or stop_when_absent) costs in quality. This model's masks follow an anatomical
structure and end where it ends.

    python benchmarks/behaving_model.py                # prints the checkpoint path (cached)
    python benchmarks/bench_propagation.py --behaving "$(python benchmarks/behaving_model.py)"

The model is cached outside the repository (``$MEDSAM2_BENCH_CACHE``, default
``~/.cache/medsam2-bench``); a cached model is reused only if its recorded validation Dice is >= 0.8.
On a 2-core CPU the fine-tuning takes a few minutes (60 steps, encoder frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MIN_DICE = 0.8
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def cache_dir() -> Path:
    return Path(os.environ.get("MEDSAM2_BENCH_CACHE", Path.home() / ".cache" / "medsam2-bench")) / "behaving"


def write_dataset(root: Path, copies: int = 4, seed: int = 0) -> None:
    """``copies`` flipped and intensity-jittered copies of the MNI152 T1 template (2 mm) with its
    white-matter mask, as images/ + labels/ NIfTI pairs (the ``pairs`` layout)."""
    import nibabel as nib
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    wm = datasets.load_mni152_wm_mask(resolution=2)
    image = np.asarray(t1.get_fdata(), dtype=np.float32)
    label = (np.asarray(wm.get_fdata()) > 0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for n in range(copies):
        img, lab = image, label
        if n % 2:  # left-right flip
            img, lab = img[::-1], lab[::-1]
        if n >= 2:  # anterior-posterior flip
            img, lab = img[:, ::-1], lab[:, ::-1]
        gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.05, 0.05) * float(img.max())
        img = img * gain + offset + rng.normal(0, 0.01 * float(img.max()), img.shape)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(img, np.float32), t1.affine), root / "images" / f"mni{n}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(lab), t1.affine), root / "labels" / f"mni{n}.nii.gz")


def build(steps: int, force: bool) -> Path:
    out = cache_dir()
    record = out / "behaving.json"
    if record.is_file() and not force:
        info = json.loads(record.read_text())
        if info.get("validation_dice", 0) >= MIN_DICE and Path(info["model"]).is_file():
            return Path(info["model"])
    import torch  # noqa: F401  (fail early, before writing data, if the environment lacks it)

    from medsam2.models.build import build_predictor, save_checkpoint

    data, run = out / "data", out / "run"
    write_dataset(data)
    start = out / "random_128.pt"
    save_checkpoint(start, build_predictor(CONFIG, image_size=128, seed=0))
    cmd = [sys.executable, "-m", "medsam2.cli", "finetune", str(data), "--out", str(run), "--checkpoint", str(start)]
    cmd += ["--config", CONFIG, "--image-size", "128", "--device", "cpu", "--intensity", "minmax"]
    cmd += ["--epochs", "1", "--steps", str(steps), "--val-fraction", "0.25", "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"medsam2 finetune failed:\n{done.stderr[-3000:]}")
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    dice = payload.get("validation_dice")
    record.write_text(json.dumps({"model": payload["model"], "validation_dice": dice, "steps": steps}, indent=2))
    if dice is None or dice < MIN_DICE:
        sys.exit(f"behaving model reached validation Dice {dice}, below {MIN_DICE}; run again with more --steps")
    return Path(payload["model"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--force", action="store_true", help="fine-tune again even if a cached model exists")
    args = parser.parse_args()
    print(build(args.steps, args.force))


if __name__ == "__main__":
    main()
