"""``medsam2 evaluate DATASET --model NAME --out DIR``: the seed papers' protocols on any labelled dataset.

Several GPUs: ``torchrun --nproc-per-node 4 -m medsam2 evaluate DATASET ...``: each process takes
every 4th case on its own GPU (or CPU threads), rank 0 merges; the tables are the same as one process
gives. Re-running with the same output folder resumes: finished cases are skipped. Exit codes are
every command's (2 bad input, 3 model unavailable), and 1 when some cases failed (the summary
lists them).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Optional, Sequence

from medsam2.cli.common import Handler, add_command, add_dataset_options, add_model_options, load_model_for
from medsam2.distributed import rank_info
from medsam2.errors import MedSAM2Error
from medsam2.evaluation.cvpr25_protocol import NO_BOX_PATTERN, TOLERANCE_MM, Cvpr25Protocol
from medsam2.evaluation.protocols import PROMPT_KINDS, SLICE_CHOICES, PromptProtocol
from medsam2.evaluation.runner import evaluate_dataset
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.predictor import EngineVideoPredictor

DESCRIPTION = (
    "Evaluate a model on a labelled dataset (Decathlon, BraTS or image/label folders) with prompts simulated "
    "from the ground truth; writes per-case CSVs, a Markdown summary table and plots. Resumable."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    data = add_dataset_options(
        p,
        label_help="structure to evaluate: a name, a value, or NAME=V1,V2 (repeatable; default every label)",
        intensity_help="window preset (abdomen, lung...), WIDTH,LEVEL, mri or minmax",
    )
    data.add_argument("--limit", type=int, help="evaluate only the first N cases")
    p.add_argument("--out", required=True, help="output folder (re-use it to resume)")
    add_model_options(p, memory_budget=False)
    prompt = p.add_argument_group("prompt protocol")
    prompt.add_argument(
        "--protocol",
        choices=("standard", "medical-sam2", "cvpr25"),
        default="standard",
        help="medical-sam2: Medical-SAM2's per-slice protocol (box every 2nd slice, first quarter); "
        "cvpr25: the CVPR 2025 interactive 3D challenge's box + 5 clicks (NSD at 2 mm by default)",
    )
    prompt.add_argument(
        "--no-box-label", action="append", dest="no_box_labels", metavar="LABEL",
        help=f"cvpr25: evaluate this structure without the box step (repeatable; names matching "
        f"/{NO_BOX_PATTERN}/ never get one)",
    )  # fmt: skip
    prompt.add_argument(
        "--slice-choice", choices=SLICE_CHOICES, default="middle", help="which slice gets the prompt"
    )
    prompt.add_argument(
        "--prompt", choices=PROMPT_KINDS, default="mask", help="ground-truth mask, box or clicks"
    )
    prompt.add_argument("--prompted-slices", type=int, default=1, help="number of prompted slices per object")
    prompt.add_argument("--box-jitter", type=int, default=0, help="box side jitter in pixels")
    prompt.add_argument("--positive-clicks", type=int, default=1, help="positive clicks per prompted slice")
    prompt.add_argument("--negative-clicks", type=int, default=0, help="negative clicks per prompted slice")
    prompt.add_argument(
        "--rounds", type=int, default=0, help="corrective click rounds after the first propagation"
    )
    prompt.add_argument("--seed", type=int, default=0, help="seed of the simulated prompts")
    prop = p.add_argument_group("propagation and metrics")
    prop.add_argument("--direction", choices=("both", "forward", "backward"), default="both")
    prop.add_argument(
        "--stop-when-absent", type=int, help="end a direction after K slices without the object"
    )
    prop.add_argument(
        "--tolerance-mm", type=float, help="NSD tolerance in mm (default 1; 2 with --protocol cvpr25)"
    )
    prop.add_argument(
        "--save-predictions", action="store_true", help="also write the predicted masks (.nii.gz)"
    )
    prop.add_argument("--memory-budget-gb", type=float, help="slice-feature cache budget per process")


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    help_text = "evaluate a model on a labelled dataset"
    _add_arguments(add_command(subparsers, common, "evaluate", help_text, description=DESCRIPTION))
    return run_evaluate


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    protocol = PromptProtocol(
        slice_choice=args.slice_choice,
        prompt=args.prompt,
        num_slices=args.prompted_slices,
        box_jitter=args.box_jitter,
        positive_clicks=args.positive_clicks,
        negative_clicks=args.negative_clicks,
        rounds=args.rounds,
        seed=args.seed,
        per_slice=args.protocol == "medical-sam2",
    )
    budget = args.memory_budget_gb
    if budget is not None and not budget > 0:
        raise MedSAM2Error(f"--memory-budget-gb must be positive, got {budget}")
    cvpr25 = None
    tolerance = args.tolerance_mm if args.tolerance_mm is not None else 1.0
    if args.protocol == "cvpr25":
        cvpr25 = Cvpr25Protocol(no_box_labels=tuple(args.no_box_labels or ()))
        tolerance = args.tolerance_mm if args.tolerance_mm is not None else TOLERANCE_MM
    elif args.no_box_labels:
        raise MedSAM2Error("--no-box-label belongs to --protocol cvpr25")
    if args.intensity is not None:
        from medsam2.intensity import parse_intensity

        parse_intensity(args.intensity)  # a bad window fails now, not after loading the model
    return EvaluationSettings(
        protocol=protocol,
        direction=args.direction,
        stop_when_absent=args.stop_when_absent,
        axis=args.axis,
        intensity=args.intensity,
        tolerance_mm=tolerance,
        memory_budget_bytes=int(budget * 2**30) if budget is not None else None,
        save_predictions=args.save_predictions,
        cvpr25=cvpr25,
    )


def _model_description(args: argparse.Namespace) -> str:
    given = (
        ("model", args.model),
        ("checkpoint", args.checkpoint),
        ("config", args.config),
        ("image_size", args.image_size),
    )
    return " ".join(f"{k}={v}" for k, v in given if v)


def _load_predictor(args: argparse.Namespace, local_rank: int, world_size: int) -> EngineVideoPredictor:
    if not args.model and not args.checkpoint:
        raise MedSAM2Error("no model given; pass --model NAME or --checkpoint PATH (with --config)")
    device = args.device
    if world_size > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per process
    predictor, _entry = load_model_for(args, device=device)
    return predictor


def _marked_random(args: argparse.Namespace) -> bool:
    """A checkpoint saved with ``"random_weights": True`` beside its state dict (as the tests' random
    models are) says so in the summary's first line."""
    if not args.checkpoint:
        return False
    from medsam2.models.checkpoints import torch_load_weights_only

    try:
        obj = torch_load_weights_only(args.checkpoint)
    except MedSAM2Error:
        return False  # the model loader reports the file's problem in its own words
    return isinstance(obj, dict) and obj.get("random_weights") is True


def run_evaluate(args: argparse.Namespace, predictor: Optional[EngineVideoPredictor] = None) -> int:
    """Run from parsed arguments; ``predictor`` skips model loading (tests, notebooks). Errors are
    raised (the command line prints them in one line); returns 0 done, 1 some cases failed."""
    from medsam2.datasets.layouts import open_dataset

    info = rank_info()
    settings = settings_from_args(args)
    if args.limit is not None and args.limit < 1:
        raise MedSAM2Error(f"--limit must be at least 1, got {args.limit}")
    channel: Any = int(args.channel) if args.channel is not None and args.channel.isdigit() else args.channel
    dataset = open_dataset(args.dataset, layout=args.layout, labels=args.labels, channel=channel)
    model = _model_description(args) or "random-weight test model"
    weights_random = not _model_description(args) or _marked_random(args)
    if predictor is None:
        predictor = _load_predictor(args, info.local_rank, info.world_size)

    def log(message: str) -> None:
        if not args.quiet:
            prefix = f"[rank {info.rank}] " if info.world_size > 1 else ""
            print(prefix + message, file=sys.stderr, flush=True)

    run = evaluate_dataset(
        dataset, predictor, args.out, settings, model=model, weights_random=weights_random,
        limit=args.limit, log=log,
    )  # fmt: skip
    if run.report is not None:
        print(f"summary: {run.report.summary_md}")
        if not args.quiet:
            print(run.report.summary_md.read_text(encoding="utf-8"))
    return 1 if run.failed else 0


def main(argv: Optional[Sequence[str]] = None, predictor: Optional[EngineVideoPredictor] = None) -> int:
    """``medsam2 evaluate ARGV...`` (``python -m medsam2.cli.evaluate``, torchrun); ``predictor`` skips
    model loading (tests, notebooks)."""
    from medsam2.cli.main import dispatch, parse

    parsed = parse(["evaluate", *(sys.argv[1:] if argv is None else argv)])
    if isinstance(parsed, int):
        return parsed
    if predictor is not None:
        parsed.handler = functools.partial(run_evaluate, predictor=predictor)
    return dispatch(parsed)


if __name__ == "__main__":
    sys.exit(main())
