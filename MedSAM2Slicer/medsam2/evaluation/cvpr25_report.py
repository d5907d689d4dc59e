"""The CVPR 2025 protocol's part of the summary: per-structure step scores, the challenge's case scores
beside the published ones, the time budget, and the plot of DSC against click number."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medsam2.evaluation.cvpr25 import case_scores
from medsam2.evaluation.cvpr25_protocol import CLICKS, NSD_DSC_THRESHOLD, TIME_BUDGET_S_PER_CLASS, TOLERANCE_MM

# Published figures under the same protocol (different images: the challenge's own evaluation set).
# Each was read in the paper named; none of them comes from our runs.
PUBLISHED = (
    (
        "nnInteractive-initialised entry (Ndir et al., arXiv 2510.03189)",
        {"dsc_auc": 2.4799, "nsd_auc": 2.5671, "dsc_final": 0.6385, "nsd_final": 0.6614},
    ),
)


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _mean(values: Sequence[float]) -> str:
    return f"{float(np.mean(values)):.3f}" if len(values) else "-"


def _per_structure(rows: Sequence[dict[str, Any]], clicks: int) -> dict[str, dict[str, list[float]]]:
    """label -> column -> one value per case (steps 0..clicks, AUCs, finals, time)."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in _ok(rows):
        t = table[str(row["label"])]
        step = int(row["round"])
        t[f"dsc_{step}"].append(float(row["dice"]))
        if step == clicks:
            t["dsc_auc"].append(float(row["dsc_auc"]))
            t["nsd_auc"].append(float(row["nsd_auc"]))
            t["nsd_challenge"].append(float(row["nsd_challenge"]))
            t["nsd_monai"].append(float(row["nsd_monai"]))
            t["seconds"].append(float(row["seconds"]))
    return table


def cvpr25_section(
    rows: Sequence[dict[str, Any]],
    clicks: int = CLICKS,
    tolerance_mm: float = TOLERANCE_MM,
) -> str:
    lines = ["", "## CVPR 2025 interactive protocol", ""]
    lines.append(
        f"Per structure: DSC after the box (step 0) and after each click; AUCs over the {clicks} click steps "
        f"(0..{clicks - 1}); final NSD is nsd_surface at {tolerance_mm:g} mm, 0 where DSC <= "
        f"{NSD_DSC_THRESHOLD:g} (the challenge's rule, here on the structure's own DSC); nsd_monai beside it. "
        "Mean over cases."
    )
    if tolerance_mm != TOLERANCE_MM:
        lines.append(f"NSD at {tolerance_mm:g} mm, not the challenge's {TOLERANCE_MM:g} mm: not comparable.")
    lines.append("")
    header = ["Label", "Cases", "DSC box"] + [f"DSC click {c}" for c in range(1, clicks + 1)]
    header += ["DSC AUC", "NSD AUC", "Final nsd_surface", "Final nsd_monai"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    structures = _per_structure(rows, clicks)
    for label, t in structures.items():
        cells = [label, str(len(t["dsc_auc"]))] + [_mean(t[f"dsc_{s}"]) for s in range(clicks + 1)]
        cells += [_mean(t["dsc_auc"]), _mean(t["nsd_auc"]), _mean(t["nsd_challenge"]), _mean(t["nsd_monai"])]
        lines.append("| " + " | ".join(cells) + " |")

    scores = case_scores(_ok(rows), clicks)
    lines += ["", "### Case scores as the challenge computes them", ""]
    lines.append(
        "A case's DSC is the mean over its structures at each step, its NSD 0 where that mean is <= "
        f"{NSD_DSC_THRESHOLD:g}; the table is the mean over cases. The published row is another model on "
        "the challenge's own images (same protocol, different data): a reference point, not a paired "
        "comparison."
    )
    lines.append("")
    lines += ["| Method | Cases | DSC AUC | NSD AUC | Final DSC | Final NSD |", "|---|---:|---:|---:|---:|---:|"]
    if scores:
        lines.append(
            f"| this run | {len(scores)} | {_mean([s.dsc_auc for s in scores])} | "
            f"{_mean([s.nsd_auc for s in scores])} | {_mean([s.dsc[-1] for s in scores])} | "
            f"{_mean([s.nsd[-1] for s in scores])} |"
        )
    for name, ref in PUBLISHED:
        lines.append(
            f"| {name} | - | {ref['dsc_auc']:.3f} | {ref['nsd_auc']:.3f} | "
            f"{ref['dsc_final']:.3f} | {ref['nsd_final']:.3f} |"
        )
    if scores:  # last: the only part that depends on the machine and its load
        within = [s for s in scores if s.within_budget]
        zeroed_auc = [s.dsc_auc if s.within_budget else 0.0 for s in scores]
        lines += ["", "### Time (this machine)", ""]
        lines += [f"| Label | Seconds per structure (mean) | Over {TIME_BUDGET_S_PER_CLASS:g} s |", "|---|---:|---:|"]
        for label, t in structures.items():
            over = sum(1 for v in t["seconds"] if v > TIME_BUDGET_S_PER_CLASS)
            lines.append(f"| {label} | {float(np.mean(t['seconds'])):.1f} | {over} of {len(t['seconds'])} |")
        lines += [
            "",
            f"{len(within)} of {len(scores)} cases within the challenge's {TIME_BUDGET_S_PER_CLASS:g} s per "
            "structure (all six steps); the challenge scores a case over its budget 0, which would make "
            f"the mean DSC AUC {_mean(zeroed_auc)}.",
        ]
    return "\n".join(lines) + "\n"


def plot_clicks(rows: Sequence[dict[str, Any]], plot_dir: Path, clicks: int = CLICKS) -> Optional[Path]:
    from medsam2.evaluation.plots import new_figure, save_figure

    table = _per_structure(rows, clicks)
    if not table:
        return None
    fig = new_figure(5.5, 4.0)
    ax = fig.add_subplot()
    steps = list(range(clicks + 1))
    for label, t in table.items():
        means = [float(np.mean(t[f"dsc_{s}"])) if t[f"dsc_{s}"] else np.nan for s in steps]
        ax.plot(steps, means, marker="o", label=label)
    ax.set_xticks(steps, ["box"] + [str(s) for s in steps[1:]])
    ax.set_xlabel("click number (step 0: the box)")
    ax.set_ylabel("DSC (mean over cases)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("CVPR 2025 protocol: DSC against click number")
    ax.legend()
    return save_figure(fig, plot_dir / "cvpr25_dice_per_click.png")
