"""``medsam2 models list|download|verify``: see, fetch and check the model cache.

Exit status: 0 fine, 2 bad arguments, 3 a model problem (unknown, not cached and offline, failed
verification), as for every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence, TextIO

from medsam2.cli.common import EXIT_MODEL, EXIT_OK, Handler
from medsam2.errors import ModelError
from medsam2.models import catalogue, hub, registry


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    parser = subparsers.add_parser(
        "models",
        parents=[common],
        help="list, download and verify model checkpoints",
        description="Models are downloaded once into the Hugging Face cache (HF_HUB_CACHE / HF_HOME, "
        "or --cache-dir) and used offline afterwards.",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="{list,download,verify}")
    actions.required = True

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.add_argument(
            "--cache-dir",
            help="model cache folder, in Hugging Face cache layout "
            "(default: HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)",
        )
        return sub

    action("list", "show the catalogue: name, size, cached or not, licence")
    fetch = action("download", "download models into the cache (a dropped connection is resumed)")
    fetch.add_argument("names", nargs="*", help=f"model names (default: {catalogue.DEFAULT_MODEL})")
    fetch.add_argument("--all", action="store_true", help="every model in the catalogue")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    verify = action("verify", "re-hash cached models against the hub's SHA-256 (and optionally load them)")
    verify.add_argument("names", nargs="*", help="model names (default: every cached model)")
    verify.add_argument("--load", action="store_true", help="also load the weights into the model config")
    verify.add_argument("--checkpoint", help="load-test a local checkpoint file instead")
    verify.add_argument("--config", help="config for --checkpoint (default: recognised from the weights)")
    return run_models


def run_models(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    run = {"list": run_list, "download": run_download, "verify": run_verify}[args.models_action]
    return run(args, out)


def _cache_label(args: argparse.Namespace) -> str:
    return str(args.cache_dir or hub.default_cache_dir())


def _json_out(out: TextIO, payload: dict[str, Any]) -> None:
    json.dump(payload, out, indent=2, default=str)
    out.write("\n")


def run_list(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    rows = [(entry, registry.cached_path(entry, args.cache_dir)) for entry in catalogue.list_models()]
    if getattr(args, "json", False):
        models = []
        for entry, path in rows:
            item = entry.to_dict()
            item.update(cached=path is not None, path=path, default=entry.name == catalogue.DEFAULT_MODEL)
            models.append(item)
        _json_out(out, {"ok": True, "cache": _cache_label(args), "models": models})
        return EXIT_OK
    header = ("NAME", "SIZE", "CACHED", "SAM", "PX", "LICENCE")
    table = [header] + [
        (
            entry.name + (" *" if entry.name == catalogue.DEFAULT_MODEL else ""),
            entry.display_size,
            "yes" if path else "no",
            entry.sam2_version,
            str(entry.image_size),
            entry.licence_text,
        )
        for entry, path in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] + "\n")
    out.write(f"* default model; cache: {_cache_label(args)}\n")
    return EXIT_OK


def run_download(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    if args.all:
        entries = catalogue.list_models()
    else:
        entries = [catalogue.get_model(name) for name in (args.names or [catalogue.DEFAULT_MODEL])]
    done = []
    for entry in entries:
        path = registry.resolve_checkpoint(
            entry, cache_dir=args.cache_dir, download=True, progress=not quiet, force=args.force
        )
        done.append({"name": entry.name, "path": str(path)})
        if not getattr(args, "json", False):
            out.write(f"{entry.name}: {path}\n")
    if getattr(args, "json", False):
        _json_out(out, {"ok": True, "cache": _cache_label(args), "models": done})
    return EXIT_OK


def run_verify(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    as_json = getattr(args, "json", False)
    if args.checkpoint:
        _, entry = registry.load_model(
            name=args.names[0] if args.names else None, checkpoint=args.checkpoint, config=args.config
        )
        if as_json:
            _json_out(out, {"ok": True, "checkpoint": args.checkpoint, "config": entry.config})
        else:
            out.write(f"{args.checkpoint}: loads into {entry.config} ({entry.image_size} px)\n")
        return EXIT_OK
    wanted = [catalogue.get_model(name) for name in args.names] if args.names else catalogue.list_models()
    results = []
    for entry in wanted:
        path = registry.cached_path(entry, args.cache_dir)
        if path is None:
            if args.names:  # asked for by name: not having it is a failure
                results.append(
                    {
                        "name": entry.name,
                        "ok": False,
                        "note": f"not cached (medsam2 models download {entry.name})",
                    }
                )
            continue
        check = hub.check_hash(path, entry.sha256, entry.sha256_certain)
        ok, note = check.ok, check.note
        if ok and args.load:
            try:
                registry.load_model(entry.name, cache_dir=args.cache_dir, download=False)
                note += "; loads"
            except ModelError as exc:
                ok, note = False, str(exc)
        if not ok:
            note += f"; repair with: medsam2 models download {entry.name} --force"
        results.append(
            {"name": entry.name, "ok": ok, "path": str(path), "sha256": check.actual, "note": note}
        )
    failed = [r for r in results if not r["ok"]]
    if as_json:
        _json_out(out, {"ok": not failed, "cache": _cache_label(args), "results": results})
    else:
        for r in results:
            out.write(f"{r['name']}: {'ok' if r['ok'] else 'FAILED'}, {r['note']}\n")
        if not results:
            out.write(f"no cached models in {_cache_label(args)}\n")
    return EXIT_MODEL if failed else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m medsam2.cli.models list|download|verify ...``: ``medsam2 models ...``."""
    from medsam2.cli.main import run_command

    return run_command("models", argv)


if __name__ == "__main__":
    sys.exit(main())
