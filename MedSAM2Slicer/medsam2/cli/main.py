"""``medsam2``: the engine on the command line. One module per command in this package, each with
``register(subparsers, common) -> handler``; this module builds the parser and runs the handler,
turning errors into one line and an exit code (see :mod:`medsam2.cli.common`)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Optional, Sequence, Union

from medsam2 import __version__
from medsam2.cli.common import (
    EXIT_BUG,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    Handler,
    Parser,
    exit_code_for,
    shared_options,
)
from medsam2.errors import MedSAM2Error, one_line

COMMANDS = ("segment", "batch", "demo", "models", "evaluate", "finetune", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="medsam2",
        description="SAM2 propagation through CT/MRI volumes.",
        parents=[shared_options(for_command=False)],
    )
    parser.add_argument("--version", action="version", version=f"medsam2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    common = shared_options(for_command=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"medsam2.cli.{name}")
        except ImportError as exc:  # e.g. torch or the server's extra missing: the command says so when used
            _register_unavailable(sub, common, name, str(exc))
            continue
        handler: Handler = module.register(sub, common)
        sub.choices[name].set_defaults(handler=handler)
    return parser


def _register_unavailable(sub: Any, common: argparse.ArgumentParser, name: str, why: str) -> None:
    def unavailable(args: argparse.Namespace) -> int:
        raise MedSAM2Error(f"'medsam2 {name}' is unavailable here: {why}; reinstall medsam2slicer")

    sub.add_parser(name, parents=[common], help=f"(unavailable: {why})").set_defaults(handler=unavailable)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parsed = parse(argv)
    return parsed if isinstance(parsed, int) else dispatch(parsed)


def parse(argv: Optional[Sequence[str]] = None) -> Union[argparse.Namespace, int]:
    """The parsed arguments, or the exit code of --help, --version or a usage error (already printed
    in one line)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_INPUT


def dispatch(args: argparse.Namespace) -> int:
    """Run the command's handler: errors become one line (unless --debug) and an exit code that tells
    scripts what kind of problem it was."""
    if args.debug:  # the engine's notes (e.g. which optional sam2 parts are missing) on stderr
        logging.basicConfig(level=logging.DEBUG, format="medsam2: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("medsam2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        code = exit_code_for(error)
        text = one_line(error, 300)
        if code == EXIT_BUG:
            text = f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"
        if args.json:
            print(json.dumps({"ok": False, "error": text, "exit_code": code}))
        print(f"medsam2: error: {text}", file=sys.stderr)
        return code


def run_command(command: str, argv: Optional[Sequence[str]] = None) -> int:
    """``medsam2 COMMAND ARGV...`` (what the command modules' own ``main`` run under ``python -m``)."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
