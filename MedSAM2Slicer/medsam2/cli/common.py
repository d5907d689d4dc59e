"""What every ``medsam2`` command shares: exit codes, the argument parser, the options every command
takes, output (one line or one JSON object), progress bars, and the model options and loading.

Exit codes (also in README):
  0  success
  1  unexpected internal error (a bug: run again with --debug and report the traceback)
  2  bad input: arguments, volume, prompts, files (one line says which)
  3  model unavailable: unknown name, not cached and no network, corrupt or mismatched checkpoint
  4  compute device unavailable or out of memory
  5  batch finished with failed cases (the summary lists them)
  130 interrupted (Ctrl+C); nothing half-written is left behind
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from medsam2.errors import DeviceUnavailableError, MedSAM2Error, MemoryBudgetError, ModelError

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_DEVICE, EXIT_BATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

# Parsed arguments -> exit code. Each command module's ``register(subparsers, common)`` adds its parser
# (with ``parents=[common]``) and returns its handler; medsam2.cli.main dispatches to it.
Handler = Callable[[argparse.Namespace], int]


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, ModelError):
        return EXIT_MODEL
    if isinstance(error, (DeviceUnavailableError, MemoryBudgetError)):
        return EXIT_DEVICE
    if isinstance(error, MedSAM2Error):
        return EXIT_INPUT
    return EXIT_BUG


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus a pointer to --help (exit 2), not a usage dump, and
    coordinates such as ``--point -60.5,20,110`` are values, not options (RAS x is negative on the
    patient's right, so half of all clicks start with a minus sign)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_INPUT, f"medsam2: error: {message} (see {self.prog} --help)\n")


def shared_options(*, for_command: bool) -> argparse.ArgumentParser:
    """--debug, --quiet, --json: accepted before the command (``medsam2 --json segment ...``) and after
    it (``medsam2 segment --json ...``). A command's copy has no defaults (SUPPRESS), so it never
    overwrites a value given before the command with False."""
    default: Any = argparse.SUPPRESS if for_command else False
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    options.add_argument("--quiet", action="store_true", default=default, help="no progress bars or messages")
    options.add_argument(
        "--json", action="store_true", default=default, help="print one JSON object with the result on stdout"
    )
    return options


def add_command(
    subparsers: Any, common: argparse.ArgumentParser, name: str, help_text: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A command's parser, with the shared options (``kwargs`` go to argparse: description, ...)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[common], help=help_text, **kwargs)
    return parser


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """Print the result: JSON for scripts, a short line for people (nothing with --quiet)."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, **payload}, default=_jsonable))
    elif not getattr(args, "quiet", False):
        print(human)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(type(value).__name__)


class Progress:
    """A tqdm bar on stderr for anything longer than a second; silent with --quiet or --json."""

    def __init__(self, args: argparse.Namespace, description: str) -> None:
        self.enabled = not (getattr(args, "quiet", False) or getattr(args, "json", False))
        self.description = description
        self.bar: Any = None
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, unit="slice", file=sys.stderr, delay=1.0)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- models
def add_model_options(p: argparse.ArgumentParser, *, memory_budget: bool = True, title: str = "model") -> None:
    """The options that choose a model, declared once for every command that loads one."""
    g = p.add_argument_group(title)
    g.add_argument("--model", help="model name from `medsam2 models list` (default: the registry's default)")
    g.add_argument("--checkpoint", type=Path, help="a local checkpoint instead of a registry model")
    g.add_argument("--config", help="sam2 config for --checkpoint (packaged name or YAML path)")
    g.add_argument("--image-size", type=int, help="model input size for --checkpoint (e.g. 512 for MedSAM2)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default auto)")
    if memory_budget:
        g.add_argument("--memory-budget", type=float, metavar="GIB", help="memory for volume + cached features")


def load_model_for(args: argparse.Namespace, random_weights: bool = False, device: Any = None) -> tuple[Any, Any]:
    """(predictor, catalogue entry or None) for the model options; ``random_weights`` builds SAM 2.1
    tiny untrained (plumbing checks only)."""
    from medsam2.devices import resolve_device

    device = resolve_device(device or args.device)
    if random_weights:
        from medsam2.models.build import build_predictor

        size = args.image_size or 512
        return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=size, device=device, seed=0), None
    from medsam2.models.registry import load_model

    return load_model(
        name=args.model,
        checkpoint=args.checkpoint,
        config=args.config,
        image_size=args.image_size,
        device=device,
    )


class ModelCache:
    """Cases of one run share one loaded model per (model, checkpoint, config, size, device)."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def get(self, args: argparse.Namespace, random_weights: bool = False) -> tuple[Any, Any]:
        key = (args.model, args.checkpoint, args.config, args.image_size, args.device, random_weights)
        if key not in self._loaded:
            self._loaded[key] = load_model_for(args, random_weights)
        return self._loaded[key]


# ----------------------------------------------------------------------------- labelled datasets
def add_dataset_options(p: argparse.ArgumentParser, *, label_help: str, intensity_help: str) -> argparse._ArgumentGroup:
    """The dataset folder and how to read it, for the commands that take labelled datasets
    (evaluate, finetune); returns the "data" group for the command's own additions."""
    from medsam2.datasets.layouts import LAYOUTS

    p.add_argument(
        "dataset", help="dataset folder (dataset.json + imagesTr/labelsTr, BraTS case folders, or images/ + labels/)"
    )
    data = p.add_argument_group("data")
    data.add_argument("--layout", choices=LAYOUTS, default="auto", help="dataset layout (default: detected)")
    data.add_argument("--label", action="append", dest="labels", metavar="LABEL", help=label_help)
    data.add_argument("--channel", help="image channel: index or modality name (e.g. flair for BraTS)")
    data.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slice direction")
    data.add_argument("--intensity", help=intensity_help)
    return data
