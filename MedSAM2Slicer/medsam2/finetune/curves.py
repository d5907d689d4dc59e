"""Loss and validation-Dice curves as a PNG, drawn with matplotlib's Agg canvas directly (no pyplot:
no global backend switch inside a host application such as Slicer, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from medsam2.io.atomic import atomic_output

LOSS_KEYS = (("total", "total"), ("seg", "segmentation"), ("srpp", "SRPP"), ("bd", "boundary"))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_curves(
    path: Union[str, os.PathLike],
    train: Sequence[dict[str, Any]],
    validation: Sequence[dict[str, Any]],
    title: str = "",
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    steps = np.array([r["step"] for r in train], dtype=float)
    window = max(1, len(train) // 50)
    for key, name in LOSS_KEYS:
        values = np.array([r.get(key, np.nan) for r in train], dtype=float)
        if len(values) and np.isfinite(values).any():
            ax_loss.plot(steps, _smooth(values, window), label=name)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss" + (f" (mean of {window} steps)" if window > 1 else ""))
    if train:
        ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if validation:
        epochs = [r["epoch"] for r in validation]
        ax_dice.plot(epochs, [r["dice"] for r in validation], marker="o")
    ax_dice.set_xlabel("epoch (0: starting model)")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    target = Path(path)
    with atomic_output(target) as tmp:
        fig.savefig(tmp, format="png")
    return target
