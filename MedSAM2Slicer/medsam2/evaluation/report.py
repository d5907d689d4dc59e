"""Merged tables, the Markdown summary in the layout of the papers' tables, and plots.

Written by the merging process (rank 0) from the per-case files alone, so a report can be rebuilt at
any time from a results folder (``write_report``). Files:

``metrics.csv``         every case's rows (all labels, all interaction rounds)
``per_slice.csv``       every case's per-slice rows
``summary.md``          per-label mean ± std of Dice, IoU, NSD, HD95 (final round), the papers' layout
                        (one row per method, one column per structure, and their mean), and Dice per
                        interaction round
``plots/box_<metric>.png``   a box per label (final round, one point per case)
``plots/slice_dice.png``     Dice per slice against the distance to the prompted slice (round 0):
                             where the propagation drifts
``plots/rounds_dice.png``    Dice against interaction round (when there are rounds)

Summary statistics use the final round of each (case, label) scored "ok"; labels absent from a case's
ground truth are not scored (no prompt can be simulated) and are counted separately. The standard
deviation is the population one (numpy's default), over cases.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from medsam2.datasets.layouts import CaseRecord, EvaluationDataset
from medsam2.evaluation.columns import COLUMN_TITLES, METRIC_COLUMNS, is_distance
from medsam2.evaluation.outputs import (
    SLICE_FIELDS,
    case_csv,
    case_fields,
    case_finished,
    error_file,
    slices_csv,
)
from medsam2.evaluation.plots import new_figure, save_figure
from medsam2.io.atomic import write_text_atomic
from medsam2.io.tables import read_csv, write_csv_atomic

if TYPE_CHECKING:
    from medsam2.evaluation.settings import EvaluationSettings

METRIC_NAMES = METRIC_COLUMNS
TITLES = COLUMN_TITLES
RANDOM_WEIGHTS_LINE = (
    "**Random weights: these numbers mean nothing about any model; they only show that the pipeline runs.**"
)


@dataclass
class ReportPaths:
    metrics_csv: Path
    slices_csv: Path
    summary_md: Path
    plots: list[Path] = field(default_factory=list)


@dataclass
class Results:
    rows: list[dict[str, str]]
    slice_rows: list[dict[str, str]]
    finished: list[str]
    missing: list[str]
    failed: dict[str, str]


@dataclass
class LabelSummary:
    label: str
    values: dict[str, list[float]]  # metric -> one value per scored case (final round)
    per_slice_dice: list[float]
    absent: int = 0
    failed: int = 0

    @property
    def cases(self) -> int:
        return len(self.values["dice"])

    def mean(self, metric: str) -> float:
        v = self.values[metric] if metric in self.values else self.per_slice_dice
        return float(np.mean(v)) if v else float("nan")

    def std(self, metric: str) -> float:
        v = self.values[metric] if metric in self.values else self.per_slice_dice
        return float(np.std(v)) if v else float("nan")


def read_results(out_dir: Path, cases: Sequence[CaseRecord]) -> Results:

    results = Results([], [], [], [], {})
    for record in cases:
        if case_finished(out_dir, record.case_id):
            results.rows += read_csv(case_csv(out_dir, record.case_id))
            path = slices_csv(out_dir, record.case_id)
            if path.is_file():
                results.slice_rows += read_csv(path)
            results.finished.append(record.case_id)
        elif error_file(out_dir, record.case_id).is_file():
            results.failed[record.case_id] = error_file(out_dir, record.case_id).read_text().strip()
        else:
            results.missing.append(record.case_id)
    return results


def final_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The last interaction round of each (case, label)."""
    last: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        key = (row["case"], row["label"])
        if key not in last or int(row["round"]) >= int(last[key]["round"]):
            last[key] = row
    return list(last.values())


def summarise(rows: list[dict[str, str]]) -> list[LabelSummary]:
    summaries: dict[str, LabelSummary] = {}
    for row in final_rows(rows):
        s = summaries.setdefault(row["label"], LabelSummary(row["label"], {m: [] for m in METRIC_NAMES}, []))
        if row["status"] == "ok":
            for m in METRIC_NAMES:
                s.values[m].append(float(row[m]))
            if row.get("per_slice_dice"):
                s.per_slice_dice.append(float(row["per_slice_dice"]))
        elif row["status"] == "absent":
            s.absent += 1
        else:
            s.failed += 1
    return list(summaries.values())


def _fmt(mean: float, std: Optional[float], metric: str) -> str:
    if np.isnan(mean):
        return "-"
    digits = 2 if is_distance(metric) else 3
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def round_table(rows: list[dict[str, str]]) -> dict[str, dict[int, list[float]]]:
    """label -> round -> Dice of every case scored in that round."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["status"] == "ok":
            table[row["label"]][int(row["round"])].append(float(row["dice"]))
    return table


def markdown_summary(
    results: Results,
    dataset: EvaluationDataset,
    settings: EvaluationSettings,
    model: str,
    plots: Sequence[Path] = (),
    out_dir: Optional[Path] = None,
    weights_random: bool = False,
) -> str:
    summaries = summarise(results.rows)
    tol = settings.tolerance_mm
    per_slice = settings.protocol.per_slice
    total = len(results.finished) + len(results.missing) + len(results.failed)
    lines = [RANDOM_WEIGHTS_LINE, ""] if weights_random else []
    lines += [f"# Evaluation: {dataset.name or dataset.root.name}", ""]
    lines.append(f"- Model weights: {model or 'not named'}")
    protocol_text = settings.cvpr25.describe() if settings.cvpr25 is not None else settings.protocol.describe()
    lines.append(f"- Prompt: {protocol_text}")
    prop = f"{'forward' if per_slice else settings.direction}"
    if settings.stop_when_absent:
        prop += f", stopping after {settings.stop_when_absent} slices without the object"
    intensity = settings.intensity or "min-max"
    lines.append(f"- Propagation: {prop}; slices along the {settings.axis} axis; intensity {intensity}")
    lines.append(f"- Cases: {len(results.finished)} of {total} evaluated ({dataset.layout} layout)")
    if results.missing:
        lines.append(f"- Not evaluated yet: {', '.join(results.missing)}")
    for case, why in results.failed.items():
        lines.append(f"- Failed: {case}: {why}")
    lines.append(
        f"- Mean ± standard deviation over cases (final round). NSD at {tol:g} mm, HD95 in mm; _monai: "
        "boundary voxels, distances between voxel centres (MONAI); _surface: surfels on the voxel-corner "
        "grid, area-weighted (DeepMind surface-distance, as the CVPR 2025 challenge and FLARE). A missed "
        "object scores Dice, IoU and NSD 0 and HD95 the image diagonal; a label absent from a case's "
        "ground truth is not scored."
    )
    lines.append("")
    header = ["Label", "Cases", "Dice", "IoU", f"nsd_monai ({tol:g} mm)", f"nsd_surface ({tol:g} mm)"]
    header += ["hd95_monai (mm)", "hd95_surface (mm)"]
    if per_slice:
        header += ["Per-slice Dice", "Per-slice − volumetric"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    metrics = list(METRIC_NAMES) + (["per_slice_dice"] if per_slice else [])
    for s in summaries:
        cells = [s.label, str(s.cases)] + [_fmt(s.mean(m), s.std(m), m) for m in metrics]
        if per_slice:
            cells.append(_fmt(s.mean("per_slice_dice") - s.mean("dice"), None, "dice"))
        lines.append("| " + " | ".join(cells) + " |")
    scored = [s for s in summaries if s.cases]
    if len(scored) > 1:
        cells = ["**Mean over labels**", ""] + [
            _fmt(float(np.mean([s.mean(m) for s in scored])), None, m) for m in metrics
        ]
        if per_slice:
            gap = float(np.mean([s.mean("per_slice_dice") - s.mean("dice") for s in scored]))
            cells.append(_fmt(gap, None, "dice"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{s.label}: absent from {s.absent} case(s)" for s in summaries if s.absent]
    notes += [f"{s.label}: failed in {s.failed} case(s) (see metrics.csv)" for s in summaries if s.failed]
    if notes:
        lines += ["", "Not scored: " + "; ".join(notes) + "."]

    if scored:
        key = "per_slice_dice" if per_slice else "dice"
        lines += ["", "## Dice per structure (layout of the papers' tables)", ""]
        names = [s.label for s in scored]
        lines.append("| Method | " + " | ".join(names) + " | Mean |")
        lines.append("|---|" + "---:|" * (len(names) + 1))
        means = [s.mean(key) for s in scored]
        lines.append(
            f"| {model or 'this run'} | "
            + " | ".join(f"{v:.3f}" for v in means)
            + f" | {float(np.mean(means)):.3f} |"
        )
        from medsam2.evaluation.references import published_means

        for source, mean in published_means(settings):
            blanks = "- | " * len(names)
            lines.append(f"| {source} (published; same protocol, not the same data) | {blanks}{mean:.3f} |")

    rounds = round_table(results.rows)
    max_round = max((max(r) for r in rounds.values() if r), default=0)
    if max_round > 0:
        lines += ["", "## Dice after each interaction round (mean ± std over cases)", ""]
        lines.append("| Label | " + " | ".join(f"Round {r}" for r in range(max_round + 1)) + " |")
        lines.append("|---|" + "---:|" * (max_round + 1))
        for label, by_round in rounds.items():
            cells = [
                _fmt(float(np.mean(by_round[r])), float(np.std(by_round[r])), "dice")
                if by_round.get(r)
                else "-"
                for r in range(max_round + 1)
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if settings.cvpr25 is not None:
        from medsam2.evaluation.cvpr25_report import cvpr25_section

        lines.append(cvpr25_section(results.rows, settings.cvpr25.clicks, tol))
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = p.relative_to(out_dir) if out_dir is not None else p
            lines.append(f"![{p.stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plots
def plot_boxes(summaries: list[LabelSummary], plot_dir: Path, tolerance_mm: float) -> list[Path]:
    scored = [s for s in summaries if s.cases]
    if not scored:
        return []
    paths = []
    for metric in METRIC_NAMES:
        fig = new_figure(max(4.0, 1.2 * len(scored) + 2), 4.0)
        ax = fig.add_subplot()
        data = [s.values[metric] for s in scored]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(scored) + 1), [s.label for s in scored], rotation=30, ha="right")
        for n, values in enumerate(data, 1):  # the cases themselves: few cases make a box misleading
            ax.plot(np.full(len(values), n), values, "o", color="black", alpha=0.4, markersize=3)
        title = TITLES[metric] + (f" at {tolerance_mm:g} mm" if metric.startswith("nsd") else "")
        ax.set_title(f"{title} per label")
        ax.set_ylabel(TITLES[metric])
        if not is_distance(metric):
            ax.set_ylim(-0.02, 1.02)
        paths.append(save_figure(fig, plot_dir / f"box_{metric}.png"))
    return paths


def plot_slice_dice(slice_rows: list[dict[str, str]], plot_dir: Path) -> Optional[Path]:
    by_label: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in slice_rows:
        if int(row["round"]) == 0 and row["dice"] not in ("", "nan"):
            by_label[row["label"]][row["case"]].append((int(row["offset"]), float(row["dice"])))
    if not by_label:
        return None
    fig = new_figure(5.0 * len(by_label), 4.0)
    axes = fig.subplots(1, len(by_label), squeeze=False)[0]
    for ax, (label, cases) in zip(axes, by_label.items()):
        pooled: dict[int, list[float]] = defaultdict(list)
        for points in cases.values():
            points.sort()
            x, y = zip(*points)
            ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=1)
            for o, d in points:
                pooled[o].append(d)
        offsets = sorted(pooled)
        ax.plot(offsets, [np.mean(pooled[o]) for o in offsets], color="tab:red", linewidth=2, label="mean")
        ax.axvline(0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{label}: Dice along the propagation")
        ax.set_xlabel("slices from the prompted slice")
        ax.set_ylabel("Dice on the slice")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower left")
    return save_figure(fig, plot_dir / "slice_dice.png")


def plot_rounds(rows: list[dict[str, str]], plot_dir: Path) -> Optional[Path]:
    table = round_table(rows)
    if not any(len(by_round) > 1 for by_round in table.values()):
        return None
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    for label, by_round in table.items():
        rounds = sorted(by_round)
        mean = np.array([np.mean(by_round[r]) for r in rounds])
        std = np.array([np.std(by_round[r]) for r in rounds])
        ax.plot(rounds, mean, marker="o", label=label)
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("interaction round (corrective clicks)")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(sorted({r for by_round in table.values() for r in by_round}))
    ax.set_title("Dice against interaction round")
    ax.legend()
    return save_figure(fig, plot_dir / "rounds_dice.png")


def write_report(
    out_dir: Path,
    dataset: EvaluationDataset,
    cases: Sequence[CaseRecord],
    settings: EvaluationSettings,
    model: str = "",
    weights_random: bool = False,
) -> ReportPaths:

    out_dir = Path(out_dir)
    results = read_results(out_dir, cases)
    metrics_csv = write_csv_atomic(out_dir / "metrics.csv", results.rows, case_fields(settings))
    slices = write_csv_atomic(out_dir / "per_slice.csv", results.slice_rows, SLICE_FIELDS)
    plot_dir = out_dir / "plots"
    plots = plot_boxes(summarise(results.rows), plot_dir, settings.tolerance_mm)
    extras = [plot_slice_dice(results.slice_rows, plot_dir), plot_rounds(results.rows, plot_dir)]
    if settings.cvpr25 is not None:
        from medsam2.evaluation.cvpr25_report import plot_clicks

        extras.append(plot_clicks(results.rows, plot_dir, settings.cvpr25.clicks))
    for extra in extras:
        if extra is not None:
            plots.append(extra)
    text = markdown_summary(results, dataset, settings, model, plots, out_dir, weights_random)
    summary = write_text_atomic(out_dir / "summary.md", text)
    return ReportPaths(metrics_csv, slices, summary, plots)
