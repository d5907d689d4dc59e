"""Loading a model: the catalogue entry (:mod:`medsam2.models.catalogue`) or a user's own file, to a predictor.

``load_model("medsam2-latest")`` finds the file in the Hugging Face cache (downloading it the first
time), reads it safely (checkpoints.py), builds the sam2 model its entry names at the entry's image
size and loads the weights strictly. A user's own file runs with ``load_model(checkpoint=PATH)``; its
config is taken from ``config=``, from the file's own ``"config"`` entry, or recognised from its
weights, and ``name=`` with ``checkpoint=`` runs a local copy of a catalogue model with that model's
settings.

Image size: SAM 2 weights do not depend on the input size (positional embeddings are interpolated,
the RoPE grid is computed), which is how MedSAM2 runs SAM 2.1 tiny at 512. ``image_size=`` overrides
the entry's size for any model; the test-suite uses it to run catalogue entries at 128 px on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from medsam2.errors import ModelError
from medsam2.models import hub
from medsam2.models.catalogue import (  # the catalogue's names, re-exported for loading callers
    DEFAULT_MODEL,
    MEDICAL_SAM2_MAPPING_NOTE,
    ModelEntry,
    PathLike,
    entry_for,
    get_model,
)
from medsam2.models.checkpoints import LoadedCheckpoint, load_into_model, read_checkpoint, suggested_config

if TYPE_CHECKING:
    from medsam2.predictor import EngineVideoPredictor


def cached_path(model: Union[str, ModelEntry], cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where the model's file is, if it is already on this machine. Never touches the network."""
    entry = entry_for(model)
    if entry.local_path is not None:
        return entry.local_path if entry.local_path.is_file() else None
    assert entry.repo_id and entry.filename
    return hub.cached_file(entry.repo_id, entry.filename, cache_dir)


def resolve_checkpoint(
    name: Union[str, ModelEntry],
    cache_dir: Optional[PathLike] = None,
    download: bool = True,
    progress: hub.Progress = True,
    force: bool = False,
) -> Path:
    """The local path of a model's checkpoint: from the cache with no network call when it is there,
    otherwise downloaded (unless ``download=False`` or the hub is offline, which is an error)."""
    entry = entry_for(name)
    if entry.local_path is not None:
        if not entry.local_path.is_file():
            raise ModelError(f"checkpoint {entry.local_path} does not exist")
        return entry.local_path
    assert entry.repo_id and entry.filename
    if not force:
        found = hub.cached_file(entry.repo_id, entry.filename, cache_dir)
        if found is not None:
            return found
    if not download:
        raise ModelError(
            f"model {entry.name} is not in the model cache {cache_dir or hub.default_cache_dir()}; "
            f"run medsam2 models download {entry.name}"
        )
    if hub.is_offline():
        if force:
            raise ModelError(f"cannot download {entry.name} again while HF_HUB_OFFLINE is set; unset it")
        raise ModelError(
            f"model {entry.name} is not in the model cache {cache_dir or hub.default_cache_dir()} and "
            f"HF_HUB_OFFLINE is set; run medsam2 models download {entry.name} on a machine with network "
            "and copy the cache folder, or pass --checkpoint FILE"
        )
    return hub.download(
        entry.repo_id,
        entry.filename,
        cache_dir,
        size_hint=entry.size_bytes,
        catalogue_sha256=entry.sha256,
        catalogue_certain=entry.sha256_certain,
        progress=progress,
        force=force,
    )


def localentry_for(
    checkpoint: PathLike,
    loaded: Optional[LoadedCheckpoint] = None,
    base: Optional[ModelEntry] = None,
    config: Optional[str] = None,
    image_size: Optional[int] = None,
) -> ModelEntry:
    """An entry for a user's own file. Settings come from the arguments, then from the file's own
    ``config``/``image_size``/``intensity`` entries, then from ``base`` (a catalogue model the file is a
    copy or fine-tune of), then from what the weights look like (config) and SAM 2's 1024 px."""
    path = Path(os.path.expanduser(str(checkpoint))).resolve()
    meta = loaded.metadata if loaded is not None else {}
    detected = suggested_config(loaded.state_dict) if loaded is not None else None
    chosen_config = config or _str(meta.get("config")) or (base.config if base else None) or detected
    if chosen_config is None:
        raise ModelError(
            f"cannot tell which model config fits {path.name} (not a recognised SAM 2/2.1 size); "
            "pass --config"
        )
    size = image_size or _int(meta.get("image_size")) or (base.image_size if base else None) or 1024
    own_intensity = _str(meta.get("intensity"))
    intensity = own_intensity or (base.intensity_spec if base else "minmax")
    if own_intensity:
        modality_intensity: tuple[tuple[str, str], ...] = (("*", own_intensity),)
    else:
        modality_intensity = base.modality_intensity if base else ()
    version = (loaded.sam2_version if loaded is not None else None) or (base.sam2_version if base else "?")
    return ModelEntry(
        name=f"local:{path.name}",
        title=f"local checkpoint {path}" + (f" ({base.name} settings)" if base else ""),
        config=chosen_config,
        image_size=int(size),
        sam2_version=version,
        intensity_spec=intensity,
        trained_intensity=base.trained_intensity if base else "unknown (local checkpoint)",
        licence=base.licence if base else "as its author set it",
        licence_note=base.licence_note if base else "",
        size_bytes=path.stat().st_size if path.is_file() else None,
        modality_intensity=modality_intensity,
        key_mapping=base.key_mapping if base else "sam2",
        local_path=path,
    )


def _str(value: object) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_model(
    name: Optional[str] = None,
    checkpoint: Optional[PathLike] = None,
    config: Optional[str] = None,
    image_size: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    cache_dir: Optional[PathLike] = None,
    download: bool = True,
    progress: hub.Progress = True,
) -> tuple[EngineVideoPredictor, ModelEntry]:
    """Build the engine predictor for a catalogue model (``name``, default :data:`DEFAULT_MODEL`) or a
    local ``checkpoint``; ``config``/``image_size`` override the entry's. Returns the predictor and
    the entry describing what was actually loaded (its config, size and intensity preparation)."""
    from medsam2.devices import resolve_device
    from medsam2.models.build import build_predictor

    target = resolve_device(device) if isinstance(device, str) else device
    if checkpoint is not None:
        base = get_model(name) if name else None
        path = Path(os.path.expanduser(str(checkpoint)))
        loaded = read_checkpoint(path, fix="replace it with a good copy")
        entry = localentry_for(path, loaded, base, config, image_size)
    else:
        entry = get_model(name or DEFAULT_MODEL)
        path = resolve_checkpoint(entry, cache_dir=cache_dir, download=download, progress=progress)
        loaded = read_checkpoint(path, fix=f"download it again: medsam2 models download {entry.name} --force")
        entry = dataclasses.replace(
            entry, config=config or entry.config, image_size=image_size or entry.image_size
        )

    predictor = build_predictor(entry.config, image_size=entry.image_size, device="cpu")
    note = MEDICAL_SAM2_MAPPING_NOTE if entry.key_mapping == "medical-sam2" else ""
    load_into_model(predictor, loaded, entry.config, mapping_note=note)
    predictor = predictor.to(target)
    predictor.eval()
    return predictor, entry
