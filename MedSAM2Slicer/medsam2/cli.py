"""``medsam2``: the engine on the command line.

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
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import DeviceUnavailableError, MedSAM2Error, MemoryBudgetError, ModelError

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_DEVICE, EXIT_BATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, ModelError):
        return EXIT_MODEL
    if isinstance(error, (DeviceUnavailableError, MemoryBudgetError)):
        return EXIT_DEVICE
    if isinstance(error, MedSAM2Error):
        return EXIT_INPUT
    return EXIT_BUG


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus a pointer to --help (exit 2), not a usage dump, and
    coordinates such as ``--point -60.5,20,110`` are values, not options (RAS x is negative on the
    patient's right, so half of all clicks start with a minus sign)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_INPUT, f"medsam2: error: {message} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    common.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="medsam2", description="SAM2 propagation through CT/MRI volumes.", parents=[common])
    parser.add_argument("--version", action="version", version=f"medsam2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    from .cli_segment import add_batch_parser, add_demo_parser, add_segment_parser

    add_segment_parser(sub, common)
    add_batch_parser(sub, common)
    add_demo_parser(sub, common)
    for module, function in (
        ("medsam2.cli_models", "add_models_parser"),
        ("medsam2.evaluation.cli_evaluate", "add_evaluate_parser"),
        ("medsam2.server.serve", "add_serve_parser"),
        ("medsam2.finetune.cli_finetune", "add_finetune_parser"),
    ):
        _optional_parser(sub, common, module, function)
    return parser


def _optional_parser(sub: Any, common: argparse.ArgumentParser, module: str, function: str) -> None:
    import importlib

    try:
        add = getattr(importlib.import_module(module), function)
    except ImportError as exc:
        # e.g. the server's extra (fastapi) is not installed: the command says so when used
        name = function.removeprefix("add_").removesuffix("_parser")
        missing = str(exc)
        p = sub.add_parser(name, parents=[common], help=f"(unavailable: {missing})")
        p.set_defaults(handler=lambda args: _unavailable(name, missing))
        return
    try:
        add(sub, parents=[common])
    except TypeError:  # a command module that does not take shared options
        add(sub)


def _unavailable(name: str, why: str) -> int:
    raise MedSAM2Error(f"'medsam2 {name}' is unavailable here: {why}; install medsam2slicer[server]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed in one line
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_INPUT
    handler: Callable[[argparse.Namespace], Any] = getattr(args, "handler", None) or args.func
    try:
        code = handler(args)
        return int(code or 0)
    except KeyboardInterrupt:
        print("medsam2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line unless --debug; the exit code tells scripts what kind
        if getattr(args, "debug", False):
            raise
        code = exit_code_for(error)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if code == EXIT_BUG:
            text = f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": text, "exit_code": code}))
        print(f"medsam2: error: {text}", file=sys.stderr)
        return code


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


if __name__ == "__main__":
    sys.exit(main())
