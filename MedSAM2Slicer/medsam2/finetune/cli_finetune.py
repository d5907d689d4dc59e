"""``medsam2 finetune DATASET --model NAME --out DIR``: adapt a model to your own annotated volumes.

One GPU, the CPU, or several GPUs with no change to the command:
``torchrun --nproc_per_node 4 -m medsam2.finetune.cli_finetune DATASET --model medsam2-latest --out DIR``.
Run the same command with ``--resume`` to continue an interrupted run (or with more ``--epochs``).
The result, ``DIR/best.pt``, loads anywhere the engine takes a checkpoint: ``--checkpoint DIR/best.pt``
on the command line, or as a local model in the Slicer panel.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from ..errors import MedSAM2Error
from .data import MODES, PROMPT_KINDS_3D
from .trainer import DEFAULT_BD_WEIGHT, FinetuneSettings, finetune

DESCRIPTION = (
    "Fine-tune a SAM 2 model on labelled volumes (Decathlon, BraTS, image/label folders, Slicer .seg.nrrd): "
    "3D clips of slices as videos (or 2D slices), image encoder frozen, optional SRPP and boundary heads "
    "(SAM2-3dMed). Checkpoints every epoch (--resume), validation Dice, best model kept."
)


def _add_arguments(p: argparse.ArgumentParser, inherited: set[str]) -> None:
    p.add_argument(
        "dataset", help="dataset folder (dataset.json + imagesTr/labelsTr, BraTS folders, images/ + labels/)"
    )
    p.add_argument("--out", required=True, help="output folder: checkpoints, curves, best.pt (re-use it with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    model = p.add_argument_group("starting model")
    model.add_argument("--model", help="registered model name (see `medsam2 models list`)")
    model.add_argument("--checkpoint", help="a checkpoint file to start from instead")
    model.add_argument("--config", help="sam2 config name or YAML path for --checkpoint")
    model.add_argument("--image-size", type=int, help="model input size (default: the model's own)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    data = p.add_argument_group("data")
    data.add_argument("--layout", choices=("auto", "msd", "brats", "pairs"), default="auto")
    data.add_argument(
        "--label", action="append", dest="labels", metavar="LABEL",
        help="structure to train: a name, a value, NAME=V1,V2, or a .seg.nrrd segment name (repeatable; default all)",
    )  # fmt: skip
    data.add_argument("--channel", help="image channel: index or modality name (e.g. flair for BraTS)")
    data.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slice direction")
    data.add_argument("--intensity", help="window preset, WIDTH,LEVEL, mri or minmax (default: the model's recipe)")
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
    if "--quiet" not in inherited:
        p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    if "--json" not in inherited:
        p.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")


def add_finetune_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register ``finetune`` on a ``parser.add_subparsers()`` object; ``args.handler(args)`` runs it."""
    parser = subparsers.add_parser(
        "finetune", parents=list(parents), help="fine-tune a model on your labelled volumes", description=DESCRIPTION
    )
    inherited = {option for p in parents for option in p._option_string_actions}
    _add_arguments(parser, inherited)
    parser.set_defaults(handler=run_finetune)
    return parser


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    prompts = tuple(k.strip() for k in args.prompts.split(",") if k.strip()) if args.prompts else None
    return FinetuneSettings(
        dataset=args.dataset,
        out=args.out,
        model=args.model,
        checkpoint=args.checkpoint,
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
    from ..cli import emit
    from ..evaluation.runner import rank_info

    result = finetune(settings_from_args(args), resume=args.resume)
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
    """``medsam2 finetune`` without the word ``finetune`` (tests, torchrun -m); errors are one line."""
    from ..cli import EXIT_INTERRUPTED, exit_code_for

    parser = argparse.ArgumentParser(prog="medsam2 finetune", description=DESCRIPTION)
    _add_arguments(parser, set())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    try:
        return run_finetune(args)
    except KeyboardInterrupt:
        print("medsam2: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MedSAM2Error as error:
        if args.debug:
            raise
        print(f"medsam2: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return exit_code_for(error)


if __name__ == "__main__":
    sys.exit(main())
