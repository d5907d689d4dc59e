"""``medsam2 finetune DATASET --model NAME --out DIR``: adapt a model to your own annotated volumes.

One GPU, the CPU, or several GPUs with no change to the command:
``torchrun --nproc_per_node 4 -m medsam2.cli.finetune DATASET --model medsam2-latest --out DIR``.
Run the same command with ``--resume`` to continue an interrupted run (or with more ``--epochs``).
The result, ``DIR/best.pt``, loads anywhere the engine takes a checkpoint: ``--checkpoint DIR/best.pt``
on the command line, or as a local model in the Slicer panel.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from medsam2.cli.common import Handler, add_command, add_dataset_options, add_model_options, emit
from medsam2.distributed import rank_info
from medsam2.finetune.sampler import MODES, PROMPT_KINDS_3D
from medsam2.finetune.settings import DEFAULT_BD_WEIGHT, FinetuneSettings
from medsam2.finetune.trainer import finetune

DESCRIPTION = (
    "Fine-tune a SAM 2 model on labelled volumes (Decathlon, BraTS, image/label folders, Slicer .seg.nrrd): "
    "3D clips of slices as videos (or 2D slices), image encoder frozen, optional SRPP and boundary heads "
    "(SAM2-3dMed). Checkpoints every epoch (--resume), validation Dice, best model kept."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    data = add_dataset_options(
        p,
        label_help="structure to train: a name, a value, NAME=V1,V2, or a .seg.nrrd segment name "
        "(repeatable; default all)",
        intensity_help="window preset, WIDTH,LEVEL, mri or minmax (default: the model's recipe)",
    )
    p.add_argument("--out", required=True, help="output folder: checkpoints, curves, best.pt (re-use it with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_model_options(p, memory_budget=False, title="starting model")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (default 0.2)")
    data.add_argument("--seed", type=int, default=0, help="seed of the split, sampling and heads (default 0)")
    train = p.add_argument_group("training")
    train.add_argument("--mode", choices=MODES, default="3d", help="3d: clips of slices as videos; 2d: single slices")
    train.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps per epoch (default 100)")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    train.add_argument("--head-lr", type=float, help="peak learning rate of the new SRPP/BD heads (default 1e-3)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of all, at most 200)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm limit (0: none)")
    train.add_argument("--batch", type=int, default=1, help="clips (or slices in 2D) per micro-batch")
    train.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--clip-length", type=int, default=8, help="slices per clip in 3D mode (default 8)")
    train.add_argument("--prompt-slices", type=int, default=1, help="prompted slices per clip (default 1)")
    train.add_argument(
        "--prompts", help=f"prompt kinds to draw from, comma-separated among {','.join(PROMPT_KINDS_3D)} "
        "(default: all three in 3D, box and points in 2D)",
    )  # fmt: skip
    train.add_argument("--srpp-weight", type=float, help="SRPP loss weight (default 0.01 in 3D; 0 turns it off)")
    train.add_argument(
        "--bd-weight", type=float, default=DEFAULT_BD_WEIGHT, help="boundary loss weight (default 0.1; 0: off)"
    )
    train.add_argument("--unfreeze-encoder", action="store_true", help="train the image encoder too")
    train.add_argument(
        "--feature-cache-gb", type=float, help="frozen-encoder feature cache in RAM (default 4 on CPU, 0 on GPU)"
    )
    train.add_argument("--case-cache-gb", type=float, default=8.0, help="RAM for decoded training volumes (default 8)")
    train.add_argument("--val-prompt", choices=("box", "points", "mask"), default="box", help="validation prompt")


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    help_text = "fine-tune a model on your labelled volumes"
    _add_arguments(add_command(subparsers, common, "finetune", help_text, description=DESCRIPTION))
    return run_finetune


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    prompts = tuple(k.strip() for k in args.prompts.split(",") if k.strip()) if args.prompts else None
    return FinetuneSettings(
        dataset=args.dataset,
        out=args.out,
        model=args.model,
        checkpoint=str(args.checkpoint) if args.checkpoint is not None else None,
        config=args.config,
        image_size=args.image_size,
        layout=args.layout,
        labels=tuple(args.labels) if args.labels else None,
        channel=args.channel,
        axis=args.axis,
        intensity=args.intensity,
        mode=args.mode,
        clip_length=args.clip_length,
        prompt_slices=args.prompt_slices,
        prompts=prompts,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        head_lr=args.head_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        batch=args.batch,
        accumulate=args.accumulate,
        srpp_weight=args.srpp_weight,
        bd_weight=args.bd_weight,
        unfreeze_encoder=args.unfreeze_encoder,
        val_fraction=args.val_fraction,
        val_prompt=args.val_prompt,
        seed=args.seed,
        device=args.device,
        feature_cache_gb=args.feature_cache_gb,
        case_cache_gb=args.case_cache_gb,
        quiet=bool(getattr(args, "quiet", False) or getattr(args, "json", False)),
    )


def run_finetune(args: argparse.Namespace) -> int:
    """Train from parsed arguments; errors are raised (``medsam2`` prints them as one line)."""
    try:
        result = finetune(settings_from_args(args), resume=args.resume)
    except KeyboardInterrupt:
        print("medsam2 finetune: run the same command with --resume to continue", file=sys.stderr)
        raise
    final = result.best_path or result.model_path
    payload = {
        "model": final,
        "latest": result.model_path,
        "out": result.out,
        "step": result.step,
        "epoch": result.epoch,
        "validation_dice": result.best_dice,
        "starting_dice": result.baseline_dice,
    }
    scores = ""
    if result.best_dice is not None:
        scores = f" (validation Dice {result.best_dice:.3f}"
        scores += f", starting model {result.baseline_dice:.3f})" if result.baseline_dice is not None else ")"
    if rank_info().rank == 0:  # under torchrun, one answer for the whole job
        emit(args, payload, f"fine-tuned model: {final}{scores}; use it with --checkpoint {final}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``medsam2 finetune ARGV...`` (``torchrun -m medsam2.cli.finetune``); errors are one line."""
    from medsam2.cli.main import run_command

    return run_command("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
