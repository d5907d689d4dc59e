"""SAM2-3dMed's ablation on packaged data: segmentation only, + SRPP, + BD, + both (issue 17).

    python benchmarks/ablation_heads.py                 # 3D, 8-slice clips, 60 steps per variant
    python benchmarks/ablation_heads.py --mode 2d       # single slices: SRPP has no pairs, so seg and + BD

Data: nilearn's MNI152 template with its grey- and white-matter maps (> 0.5) as two structures. The
package ships one subject, so the cases are copies of it (shifted slabs, in-plane shifts, every other
one mirrored left-right, each with its own intensity scale, gamma and noise; see mni_tissue.py): the
scores say how well each variant learns this anatomy, not how it generalises to other subjects.

Every variant starts from the same random-weight SAM 2.1 tiny at 128 px (frozen encoder, the default),
with the same seed, split, steps and learning rates, through the finetune API (the code behind
``medsam2 finetune``). After training: validation Dice, HD95 and NSD (tolerance one voxel, 4 mm) of the
model as exported, with the evaluation harness's box protocol; the heads' own scores on held-out clips
(boundary F1 against the ground-truth band, SRPP offset error); the loss curves. Written to
``--results`` as ablation_heads_<mode>.md / .json / .png, with the command line that made them.
"""

from __future__ import annotations

import argparse
import json
import os

try:
    import fcntl
except ImportError:  # Windows: runs are not merged under a lock there
    fcntl = None  # type: ignore[assignment]
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

if __name__ == "__main__":  # before torch starts its thread pool: the engine keeps an explicit count
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
    if _threads is None and "--threads" in sys.argv[:-1]:
        _threads = sys.argv[sys.argv.index("--threads") + 1]
    os.environ["OMP_NUM_THREADS"] = _threads or "1"

import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*cannot import name '_C' from 'sam2'.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mni_tissue import SPACING_MM, build_mni_tissue  # noqa: E402

TINY_21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
STRUCTURES = ("grey matter", "white matter")
VARIANTS_3D = (("seg only", 0.0, 0.0), ("+ SRPP", 0.01, 0.0), ("+ BD", 0.0, 0.1), ("+ SRPP + BD", 0.01, 0.1))
VARIANTS_2D = (("seg only", 0.0, 0.0), ("+ BD", 0.0, 0.1))
HEAD_CLIPS = 12  # held-out clips the heads are scored on


def _mean(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_variant(
    args: argparse.Namespace, dataset: Path, start: Path, work: Path, name: str, srpp: float, bd: float
) -> dict[str, Any]:
    from medsam2.datasets.training import open_training_dataset
    from medsam2.evaluation.protocols import PromptProtocol
    from medsam2.evaluation.settings import EvaluationSettings
    from medsam2.finetune import FinetuneSettings, finetune
    from medsam2.finetune.data import CaseStore
    from medsam2.finetune.forward import FinetuneModel
    from medsam2.finetune.heads import boundary_head_for, srpp_head_for
    from medsam2.finetune.losses import LossWeights
    from medsam2.finetune.sampler import ClipSampler
    from medsam2.finetune.trainer import _layout_for
    from medsam2.finetune.validation import head_scores, validate
    from medsam2.intensity import parse_intensity
    from medsam2.models.registry import load_model

    out = work / name.replace(" ", "").replace("+", "_")
    settings = FinetuneSettings(
        dataset=str(dataset),
        out=str(out),
        checkpoint=str(start),
        labels=STRUCTURES,
        mode=args.mode,
        clip_length=args.clip_length,
        epochs=1,
        steps=args.steps,
        lr=args.lr,
        head_lr=args.head_lr,
        srpp_weight=srpp if args.mode == "3d" else 0.0,
        bd_weight=bd,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device="cpu",
        quiet=not args.verbose,
    )
    started = time.perf_counter()
    result = finetune(settings)
    seconds = time.perf_counter() - started
    history = result.history["train"]

    # The model as exported, scored on the validation cases with HD95 and NSD as well as Dice.
    predictor, _ = load_model(checkpoint=result.model_path, device="cpu", progress=False)
    split = json.loads((out / "split.json").read_text())
    data = open_training_dataset(str(dataset), labels=STRUCTURES)
    intensity = str(torch.load(result.model_path, weights_only=True)["intensity"])  # what training used
    evaluation = EvaluationSettings(
        protocol=PromptProtocol(prompt="box", slice_choice="middle", seed=args.seed),
        intensity=intensity,
        tolerance_mm=SPACING_MM,
    )
    scored = validate(predictor, data, split["validation"], evaluation, args.mode)

    # The heads themselves, on held-out clips (they are not part of the exported model).
    state = torch.load(out / "train_state.pt", weights_only=True)
    heads: dict[str, Any] = {}
    if "srpp" in state["heads"]:
        heads["srpp"] = srpp_head_for(predictor)
        heads["srpp"].load_state_dict(state["heads"]["srpp"])
    if "bd" in state["heads"]:
        heads["boundary"] = boundary_head_for(predictor)
        heads["boundary"].load_state_dict(state["heads"]["bd"])
    scores: dict[str, Any] = {}
    if heads:
        layout_for = _layout_for("axial")
        index = data.check(layout_for, parse_intensity(intensity))
        store = CaseStore(data, layout_for, parse_intensity(intensity), int(predictor.image_size), torch.device("cpu"))
        sampler = ClipSampler(
            store, index, split["validation"], mode=args.mode, clip_length=args.clip_length, prompt_slices=1,
            prompt_kinds=("box",), batch_size=1, rng=np.random.default_rng(1000 + args.seed),
        )  # fmt: skip
        model = FinetuneModel(predictor, LossWeights(srpp=srpp, bd=bd), **heads)
        scores = head_scores(model, sampler, HEAD_CLIPS).__dict__

    def curve(key: str) -> list[float]:
        return [float(r[key]) for r in history if key in r]

    record: dict[str, Any] = {
        "variant": name,
        "srpp_weight": settings.effective_srpp_weight,
        "bd_weight": bd,
        "seconds": round(seconds, 1),
        "validation": {
            "dice": scored.mean_of("dice"),
            "hd95_mm": scored.mean_of("hd95"),
            "nsd": scored.mean_of("nsd"),
            "scored": scored.count,
            "per_structure": [{"case": c, "structure": s, **m} for (c, s, _), m in zip(scored.scores, scored.metrics)],
        },
        "starting_dice": result.baseline_dice,
        "heads": scores,
        "curves": {k: curve(k) for k in ("total", "seg", "srpp", "bd", "lr")},
    }
    for key in ("seg", "srpp", "bd"):
        values = record["curves"][key]
        if values:  # a single step is noisy (one clip): first 5 and last 10 steps are averaged too
            record[f"{key}_loss"] = {
                "first": values[0],
                "last": values[-1],
                "first5_mean": _mean(values[:5]),
                "last10_mean": _mean(values[-10:]),
            }
    return record


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in ("seg", "srpp", "bd") if any(r["curves"][k] for r in records)]
    figure = Figure(figsize=(4.2 * len(keys), 3.4))
    FigureCanvasAgg(figure)
    window = 5
    for n, key in enumerate(keys, 1):
        axes = figure.add_subplot(1, len(keys), n)
        for r in records:
            values = np.asarray(r["curves"][key], dtype=float)
            if len(values) == 0:
                continue
            smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
            axes.plot(np.arange(len(smooth)) + (len(values) - len(smooth)) + 1, smooth, label=r["variant"])
        if key == "srpp" and records:
            t = int(records[0]["clip_length"])  # the zero-offset loss: mean (j - i)^2 over ordered pairs
            axes.axhline(t * (t + 1) / 6, color="grey", ls="--", lw=0.8, label=f"zero offset ({t} slices)")
        axes.set_title({"seg": "segmentation loss", "srpp": "SRPP loss", "bd": "boundary loss"}[key])
        axes.set_xlabel(f"step (mean of {window})")
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(records: list[dict[str, Any]], args: argparse.Namespace, command: str, machine: str) -> str:
    lines = [
        f"# SAM2-3dMed head ablation, {args.mode.upper()} mode, MNI152 tissue copies",
        "",
        f"Command(s): `{command}`",
        "",
        f"Machine: {machine}. Random-weight SAM 2.1 tiny at 128 px, frozen encoder, {args.steps} steps of one "
        f"{'clip of ' + str(args.clip_length) + ' slices' if args.mode == '3d' else 'slice'}, lr {args.lr:g} "
        f"(heads: the default head lr), seed {args.seed}. Data: {args.cases} copies of nilearn's one MNI152 "
        "subject (shifted, mirrored, intensity-jittered), grey and white matter (> 0.5) as two structures; "
        "validation on the held-out copies: box prompt on the middle slice, propagated both ways "
        "(3D) or each scored slice prompted on its own (2D); NSD at 4 mm (one voxel).",
        "",
        "| variant | Dice | HD95 (mm) | NSD | boundary F1 (all-edge) | SRPP val MSE (zero-offset) "
        "| seg loss first5 -> last10 | SRPP loss first5 -> last10 | BD loss first5 -> last10 | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        v, h = r["validation"], r["heads"]

        def loss(key: str, r: dict[str, Any] = r) -> str:
            if f"{key}_loss" not in r:
                return "-"
            x = r[f"{key}_loss"]
            return f"{x['first5_mean']:.3f} -> {x['last10_mean']:.3f}"

        bd_val = (
            f"{h['boundary_f1']:.3f} ({h['boundary_f1_all_edge']:.3f})" if h.get("boundary_f1") is not None else "-"
        )
        srpp_val = f"{h['srpp_mse']:.2f} ({h['srpp_zero_mse']:.2f})" if h.get("srpp_mse") is not None else "-"
        lines.append(
            f"| {r['variant']} | {_fmt(v['dice'])} | {_fmt(v['hd95_mm'], 1)} | {_fmt(v['nsd'])} | "
            f"{bd_val} | {srpp_val} | {loss('seg')} | {loss('srpp')} | {loss('bd')} | "
            f"{r['seconds']:.0f} |"
        )
    start = records[0].get("starting_dice") if records else None
    lines += [
        "",
        f"Starting model's validation Dice (the random weights): {_fmt(start)}. One seed, two held-out copies of "
        "one subject: differences of a few hundredths between variants are within what another seed changes.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("3d", "2d"), default="3d")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant (default 60)")
    parser.add_argument("--lr", type=float, default=1e-4, help="model learning rate (default 1e-4, the CLI's)")
    parser.add_argument("--head-lr", type=float, help="heads' learning rate (default: the CLI's)")
    parser.add_argument("--clip-length", type=int, default=8)
    parser.add_argument("--cases", type=int, default=6, help="copies of the template (default 6)")
    parser.add_argument("--slices", type=int, default=20, help="axial slices per copy (default 20)")
    parser.add_argument("--val-fraction", type=float, default=0.34)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: on a shared 2-core machine, 2 ran 10x slower)"
    )
    parser.add_argument("--variants", help="comma-separated subset of the variants (default all)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--verbose", action="store_true", help="show the training progress")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/ablation_heads.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"

    from medsam2.models.build import build_predictor

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dataset = build_mni_tissue(work / "Task00_MNI152_tissue", count=args.cases, slices=args.slices, seed=args.seed)
        start = work / "start.pt"
        model = build_predictor(TINY_21, image_size=128, seed=args.seed)
        torch.save({"model": model.state_dict(), "config": TINY_21, "image_size": 128}, start)
        records = []
        variants = VARIANTS_3D if args.mode == "3d" else VARIANTS_2D
        if args.variants:
            wanted = {v.strip() for v in args.variants.split(",")}
            variants = tuple(v for v in variants if v[0] in wanted)
        for name, srpp, bd in variants:
            record = run_variant(args, dataset, start, work, name, srpp, bd)
            record["clip_length"] = args.clip_length
            records.append(record)
            v = record["validation"]
            line = f"{name:12s} Dice {_fmt(v['dice'])} HD95 {_fmt(v['hd95_mm'], 1)} NSD {_fmt(v['nsd'])}"
            for key in ("srpp", "bd"):
                if f"{key}_loss" in record:
                    x = record[f"{key}_loss"]
                    line += (
                        f" | {key.upper()} loss first {x['first']:.3f} last {x['last']:.3f}"
                        f" (first 5 {x['first5_mean']:.3f}, last 10 {x['last10_mean']:.3f})"
                    )
            if record["heads"].get("boundary_f1") is not None:
                h = record["heads"]
                line += f" | boundary F1 {h['boundary_f1']:.3f} (all-edge {h['boundary_f1_all_edge']:.3f})"
            if record["heads"].get("srpp_mse") is not None:
                h = record["heads"]
                line += f" | SRPP held-out MSE {h['srpp_mse']:.2f} (zero offset {h['srpp_zero_mse']:.2f})"
            print(f"{line} ({record['seconds']:.0f} s)", flush=True)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"ablation_heads_{args.mode}"
    commands = [command]
    with open(Path(tempfile.gettempdir()) / f"medsam2_ablation_heads_{args.mode}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # runs of some --variants each may finish together
        if args.variants and stem.with_suffix(".json").is_file():
            # a run of some variants replaces those in the table, keeping the others (same settings only)
            earlier = json.loads(stem.with_suffix(".json").read_text())
            same = {k: v for k, v in earlier["settings"].items() if k not in ("variants", "work", "results")}
            if same == {k: v for k, v in vars(args).items() if k not in ("variants", "work", "results")}:
                names = {r["variant"] for r in records}
                kept = [r for r in earlier["variants"] if r["variant"] not in names]
                order = [v[0] for v in (VARIANTS_3D if args.mode == "3d" else VARIANTS_2D)]
                records = sorted(kept + records, key=lambda r: order.index(r["variant"]))
                commands = [c for c in earlier.get("commands", [earlier.get("command")]) if c] + commands
        payload = {"commands": commands, "machine": machine, "settings": vars(args), "variants": records}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(records, args, " ; ".join(commands), machine))
        plot(records, stem.with_suffix(".png"), f"MNI152 tissue copies, {args.mode.upper()}, {args.steps} steps")
    print(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
