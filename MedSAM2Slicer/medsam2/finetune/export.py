"""The fine-tuned model as the engine loads it: a self-describing checkpoint.

``{"model": state_dict, "config": ..., "image_size": ..., "intensity": ...}`` is the layout
:mod:`medsam2.models.checkpoints` reads (plain tensors, strings and ints: it loads with weights_only=True),
so ``medsam2.models.registry.load_model(checkpoint=path)`` rebuilds the same model with the same input size
and intensity preparation, with no other argument. The training heads (SRPP, BD) are not part of it:
the engine never needs them. Written to a temporary file and renamed, so a crash never leaves a
truncated model where the user expects one.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Union

import torch
from torch import nn

from medsam2.errors import ModelError
from medsam2.io.atomic import atomic_output


def finetuned_checkpoint(model: nn.Module, config: str, image_size: int, intensity: str) -> dict[str, object]:
    if not config:
        raise ModelError("cannot export a model without its config name (e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"model": state, "config": str(config), "image_size": int(image_size), "intensity": str(intensity)}


def export_checkpoint(
    path: Union[str, os.PathLike],
    model: nn.Module,
    *,
    config: str,
    image_size: int,
    intensity: str,
) -> Path:
    """Write the engine checkpoint of ``model`` (the SAM 2 predictor, without training heads)."""
    payload = finetuned_checkpoint(model, config, image_size, intensity)
    target = Path(path)
    with atomic_output(target) as tmp:
        torch.save(payload, tmp)
    return target


def keep_copy(source: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> Path:
    """Make ``target`` a copy of the finished file ``source`` (the best model so far), atomically.

    A hard link costs no disk and no time (the source is later replaced by rename, never rewritten in
    place, so the link keeps this version); where links are not supported the file is copied."""
    src, dst = Path(source), Path(target)
    tmp = dst.with_name(f".tmp-{secrets.token_hex(4)}-{dst.name}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
