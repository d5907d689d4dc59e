"""Figures for the evaluation reports: matplotlib without a display, written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsam2.io.atomic import write_atomic


def new_figure(width: float, height: float) -> Any:
    # Figure without pyplot: no global backend switch, so a report can be made inside Slicer or a
    # notebook without disturbing its interactive figures; savefig renders with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig: Any, path: Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
