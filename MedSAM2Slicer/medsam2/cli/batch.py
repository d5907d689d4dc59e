"""``medsam2 batch MANIFEST``: many volumes and their prompts, one row per case; resumable (a case whose
output exists is skipped) and one failing case never stops the others (exit 5 names them)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, NoReturn, Optional

from medsam2.cli.batch_workers import CaseOpener, device_for_rank, gather_results
from medsam2.cli.common import (
    EXIT_BATCH,
    EXIT_INPUT,
    Handler,
    ModelCache,
    Parser,
    add_model_options,
    emit,
    exit_code_for,
)
from medsam2.cli.segment import SegmentJob, add_segment_options, segment_one
from medsam2.distributed import RankInfo, rank_info
from medsam2.errors import InvalidPromptError

MANIFEST_HELP = """\
A manifest lists one case per row: a CSV file with a header line, or a JSON list of objects (or
{"cases": [...]}). Every row needs 'input' (a volume file, DICOM folder or DICOMweb URL) and 'output'
(.seg.nrrd, .nii.gz, .nrrd or .dcm). Relative input, mask and prompts paths are read from the
manifest's folder; relative outputs are placed in --output-dir (default: the manifest's folder).
Every other column is a 'medsam2 segment' option without its leading dashes ('point',
'negative_point', 'box', 'prompts', 'mask', 'label', 'preset', 'window', 'axis', 'slices',
'direction', 'stop_when_absent', 'largest_component', 'model', 'checkpoint', ...); in a CSV, several
values of a repeatable option are separated by ';' and a flag is 'true'. Empty cells are ignored.
Options a row does not give (model, checkpoint, config, image size, device, memory budget) come from
the command line.

Example (cases.csv; a point is R,A,S in millimetres, so it is quoted):
  input,output,point,preset,label
  ct/case1.nii.gz,case1.seg.nrrd,"-60,20,110",abdomen,liver
  ct/case2.nii.gz,case2.seg.nrrd,"-58,18,96;-50,25,101",abdomen,liver
  dicom/case3/,case3.dcm,"12.5,-30,40",,lesion
The same as JSON: [{"input": "ct/case1.nii.gz", "output": "case1.seg.nrrd", "point": ["-60,20,110"],
"preset": "abdomen", "label": "liver"}, ...]
"""


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    p = subparsers.add_parser(
        "batch",
        parents=[common],
        help="many volumes and their prompts from a CSV or JSON manifest",
        description=MANIFEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, help="the .csv or .json manifest (see above)")
    p.add_argument("--output-dir", type=Path, help="relative outputs are placed here (default: next to the manifest)")
    add_model_options(p)
    return run_batch


def read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InvalidPromptError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidPromptError(f"manifest {path} is not valid JSON ({exc})") from None
        if isinstance(rows, dict):
            rows = rows.get("cases", [])
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(fh)]
    else:
        raise InvalidPromptError(f"manifest {path} must be .csv or .json")
    if not isinstance(rows, list) or not rows:
        raise InvalidPromptError(f"manifest {path} lists no cases")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "input" not in row or "output" not in row:
            raise InvalidPromptError(f"manifest {path} case {n} needs 'input' and 'output'")
    return rows


def _row_argv(row: dict[str, Any]) -> list[str]:
    """A manifest row as `segment` options: keys are option names; lists (JSON) or ';'-separated
    values (CSV) repeat an option; true/false toggles a flag."""
    argv: list[str] = []
    for key, value in row.items():
        if key in ("input", "output"):
            continue
        option = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else str(value).split(";") if isinstance(value, str) else [value]
        for v in values:
            if isinstance(v, bool) or str(v).lower() in ("true", "false"):
                if v is True or str(v).lower() == "true":
                    argv.append(option)
            else:
                argv += [option, str(v)]
    return argv


class _RowParser(Parser):
    """A bad row is that row's failure, with argparse's reason (not an exit and a line on stderr)."""

    def error(self, message: str) -> NoReturn:
        raise InvalidPromptError(message)


def run_batch(args: argparse.Namespace) -> int:
    rows = read_manifest(args.manifest)
    base = args.output_dir or args.manifest.parent
    info = rank_info()
    case_parser = _RowParser(prog="manifest row", add_help=False)
    add_segment_options(case_parser)
    models = ModelCache()
    results: list[dict[str, Any]] = []
    show = not (args.quiet or args.json)
    # Under torchrun each process takes every world_size-th case (as `evaluate` does).
    mine = [(n, row) for n, row in enumerate(rows, 1) if (n - 1) % info.world_size == info.rank]
    plans = [_plan_case(n, row, base, case_parser, args, info) for n, row in mine]
    ahead = CaseOpener(models)
    for index, (record, job) in enumerate(plans):
        n = record["case"]
        if job is not None:
            # A case that cannot be opened (None) is opened again by segment_one, which reports why.
            opened = ahead.take(job) or ahead.open_now(job)
            # Open the next case (read, prepare, and encode where the device has room) while this
            # one propagates.
            nxt = next((j for _, j in plans[index + 1 :] if j is not None), None)
            if nxt is not None:
                ahead.start(nxt)
            try:
                job.output.parent.mkdir(parents=True, exist_ok=True)
                record.update(status="done", **segment_one(job, models, opened=opened))
            except KeyboardInterrupt:
                ahead.cancel()
                raise
            except Exception as exc:  # one case's failure never stops the others
                if args.debug:
                    ahead.cancel()
                    raise
                record.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                record["exit_code"] = exit_code_for(exc)
            finally:
                if opened is not None:
                    opened[2].close()
        results.append(record)
        if show:
            print(
                f"[{n}/{len(rows)}] {record['status']}: {record['input']}"
                + (f" - {record['error']}" if record.get("error") else "")
            )
    ahead.cancel()
    if info.world_size > 1:
        results = gather_results(results, base, info)
        if info.rank != 0:
            failed_here = any(r["status"] == "failed" for r in results if r["case"] in {n for n, _ in mine})
            return EXIT_BATCH if failed_here else 0
    failed = [r for r in results if r["status"] == "failed"]
    summary = {
        "cases": len(results),
        "done": sum(r["status"] == "done" for r in results),
        "skipped": sum(r["status"].startswith("skipped") for r in results),
        "failed": len(failed),
        "results": results,
    }
    if info.world_size > 1:
        summary["processes"] = info.world_size
    emit(args, summary, f"batch: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed")
    return EXIT_BATCH if failed else 0


def _plan_case(
    n: int, row: dict[str, Any], base: Path, case_parser: Parser, args: argparse.Namespace, info: RankInfo
) -> tuple[dict[str, Any], Optional[SegmentJob]]:
    """The case's record so far and its job (None when it is skipped or its row is bad)."""
    output = Path(str(row["output"]))
    output = output if output.is_absolute() else base / output
    record: dict[str, Any] = {"case": n, "input": str(row["input"]), "output": str(output)}
    if info.world_size > 1:
        record["rank"] = info.rank
    try:
        case = case_parser.parse_args(_row_argv(row))
    except InvalidPromptError as exc:
        record.update(status="failed", error=f"bad manifest row: {exc}", exit_code=EXIT_INPUT)
        return record, None
    source = str(row["input"])
    if "://" not in source and not Path(source).is_absolute():
        source = str(args.manifest.parent / source)  # where the manifest says, wherever it is run from
    for key in ("mask", "prompts"):
        given = getattr(case, key, None)
        if given is not None and not given.is_absolute():
            setattr(case, key, args.manifest.parent / given)
    for key in ("model", "checkpoint", "config", "image_size", "device", "memory_budget"):
        if getattr(case, key, None) is None:
            setattr(case, key, getattr(args, key))
    case.device = device_for_rank(case.device, info)
    case.quiet, case.json = True, True
    if output.exists():
        record["status"] = "skipped (output exists)"
        return record, None
    return record, SegmentJob(source, output, case)
