"""Reading checkpoint files safely and fitting their weights to a sam2 model config.

A checkpoint is loaded with ``torch.load(weights_only=True)`` and nothing else: a file that needs to
import or call code to unpickle is refused, never executed. The publishers' layouts are normalised to
a plain float32 state dict:

* Meta SAM 2 / SAM 2.1 and bowang-lab MedSAM2: ``{"model": state_dict}``;
* a bare state dict (``torch.save(model.state_dict())``);
* ImprintLab Medical-SAM2: ``{"model": state_dict}`` in bfloat16 (its 3D trainer casts the network to
  bf16 before saving), ``{"model": ..., "parameter": ...}`` from its 2D trainer, and keys prefixed with
  ``module.`` when it trained under ``torch.nn.DataParallel``.

Medical-SAM2's training package ``sam2_train`` is Meta's first SAM 2.0 release renamed; building its
tiny model from its own code gives exactly the state-dict keys and shapes of the sam2 package's
``configs/sam2/sam2_hiera_t.yaml`` (checked against MedicineToken/Medical-SAM2, the repository now
published as ImprintLab's). So its key mapping is the identity after the layout is unwrapped. If a file
ever disagrees, loading fails naming the keys and saying that the mapping does not hold.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from medsam2.errors import ModelError, one_line
from medsam2.models.build import load_state_dict_strict

# Present in every SAM 2.1 state dict and absent from every SAM 2.0 one: the spatial no-object
# embedding and the projection of temporal position encodings into object pointers.
SAM21_ONLY_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias")

# Hiera trunk (embedding width, number of blocks) -> size name; read off the packaged configs.
HIERA_VARIANTS: dict[tuple[int, int], str] = {
    (96, 12): "tiny",
    (96, 16): "small",
    (112, 24): "base-plus",
    (144, 48): "large",
}
_CONFIG_SUFFIX = {"tiny": "t", "small": "s", "base-plus": "b+", "large": "l"}

# Wrappers that prefix every key: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Optional entries a checkpoint may carry next to "model" so that a fine-tuned file is self-describing
# (plain strings and ints load under weights_only=True).
METADATA_KEYS = ("config", "image_size", "intensity")

_PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")


@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights as plain float32 tensors, plus what was learned while unwrapping them."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    layout: str
    metadata: dict[str, object] = field(default_factory=dict)
    converted_from: tuple[str, ...] = ()
    stripped_prefix: str = ""

    @property
    def sam2_version(self) -> Optional[str]:
        return sam2_version(self.state_dict)

    @property
    def hiera_variant(self) -> Optional[str]:
        return hiera_variant(self.state_dict)

    def describe(self) -> str:
        parts = [self.layout]
        if self.stripped_prefix:
            parts.append(f"'{self.stripped_prefix}' prefix removed")
        if self.converted_from:
            parts.append(f"{'/'.join(self.converted_from)} converted to float32")
        version, variant = self.sam2_version, self.hiera_variant
        if version or variant:
            parts.append(f"looks like SAM {version or '?'} hiera-{variant or '?'}")
        return ", ".join(parts)


_DEFAULT_FIX = "replace it with a good copy"


def torch_load_weights_only(path: Union[str, os.PathLike], fix: str = _DEFAULT_FIX) -> object:
    """``torch.load(weights_only=True)`` with every failure turned into one line that says which it is:
    missing, empty, truncated/corrupt, or a pickle that would need to run code. ``fix`` ends the message
    for damaged files (the registry says which download command repairs a cached model)."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"checkpoint {file} does not exist")
    if file.stat().st_size == 0:
        raise ModelError(f"checkpoint {file} is empty (0 bytes); {fix}")
    # A zip checkpoint can be memory-mapped: the tensors are not read twice into RAM (a 900 MB large
    # model would otherwise need twice that while loading). Legacy pickles cannot be mapped.
    mmap = zipfile.is_zipfile(file)
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ModelError(_unpickling_message(file, str(exc), fix)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"checkpoint {file} is truncated or corrupt ({one_line(exc, 160)}); {fix}") from None


def _unpickling_message(file: Path, text: str, fix: str) -> str:
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (
            f"checkpoint {file} was refused: unpickling it would import and run code ({code.group(1)}); "
            "only plain weights are loaded (weights_only=True). Re-save it from trusted code as "
            "torch.save({'model': model.state_dict()}, path)"
        )
    reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
    if "Unsupported operand" in reason or "Weights only load failed" not in text:
        # Bytes that are not a pickle opcode: random data, an HTML error page saved as .pt, a cut file.
        detail = reason or (text.strip().splitlines()[0] if text.strip() else "unpickling failed")
        return f"checkpoint {file} is truncated or corrupt, or not a PyTorch checkpoint ({detail}); {fix}"
    return (
        f"checkpoint {file} was refused: it is not a plain weights file"
        + (f" ({reason})" if reason else "")
        + "; only plain weights are loaded (weights_only=True)"
    )


def read_checkpoint(path: Union[str, os.PathLike], fix: str = _DEFAULT_FIX) -> LoadedCheckpoint:
    """Load a checkpoint file and unwrap it to a float32 state dict (see the module docstring)."""
    file = Path(path)
    obj = torch_load_weights_only(file, fix)
    state, layout, metadata = _unwrap(obj, file)
    state, prefix = _strip_wrapper_prefixes(state)
    converted: set[str] = set()
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(
                f"checkpoint {file} is not a state dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
        if value.is_floating_point() and value.dtype != torch.float32:
            # bf16/fp16 weights (Medical-SAM2 saves bf16) run in float32 here; autocast lowers precision
            # again on GPUs where that is faster.
            converted.add(str(value.dtype).replace("torch.", ""))
            value = value.float()
        clean[key] = value
    return LoadedCheckpoint(
        path=file,
        state_dict=clean,
        layout=layout,
        metadata=metadata,
        converted_from=tuple(sorted(converted)),
        stripped_prefix=prefix,
    )


def _unwrap(obj: object, file: Path) -> tuple[Mapping[str, object], str, dict[str, object]]:
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"checkpoint {file} holds a {type(obj).__name__}, not a state dict or {{'model': ...}}"
        )
    for wrapper in ("model", "state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            extra = sorted(str(k) for k in obj if k != wrapper)
            if "parameter" in obj:
                _check_medical_sam2_parameters(obj["parameter"], inner, file)
            layout = (
                f"{{'{wrapper}': state_dict"
                + (f", {', '.join(repr(k) for k in extra)}" if extra else "")
                + "}"
            )
            metadata = {key: obj[key] for key in METADATA_KEYS if key in obj}
            _check_metadata(metadata, file)
            return inner, layout, metadata
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "bare state dict", {}
    keys = ", ".join(repr(k) for k in list(obj)[:6])
    raise ModelError(
        f"checkpoint {file} has no state dict: expected a bare state dict or {{'model': state_dict}}, "
        f"found top-level keys {keys or '(none)'}"
    )


def _check_medical_sam2_parameters(parameters: object, state: Mapping[str, object], file: Path) -> None:
    """Medical-SAM2's 2D trainer saves ``net._parameters`` beside the state dict: the top-level
    parameters of the same network, which duplicate state-dict entries. A name that is not in the state
    dict means its network differs from the one the key mapping assumes: fail rather than guess."""
    if not isinstance(parameters, Mapping):
        raise ModelError(f"checkpoint {file}: 'parameter' is a {type(parameters).__name__}, expected a dict")
    names = {_strip_one(str(k)) for k in state}
    unknown = sorted(str(k) for k in parameters if _strip_one(str(k)) not in names)
    if unknown:
        raise ModelError(
            f"checkpoint {file}: its 'parameter' entries {', '.join(unknown[:4])} are not in its state dict; "
            "the Medical-SAM2 key mapping (identical to SAM 2.0) does not hold for this file"
        )


def _strip_one(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _check_metadata(metadata: dict[str, object], file: Path) -> None:
    if "config" in metadata and not isinstance(metadata["config"], str):
        raise ModelError(
            f"checkpoint {file}: 'config' must be a string, got {type(metadata['config']).__name__}"
        )
    if "image_size" in metadata and not isinstance(metadata["image_size"], int):
        raise ModelError(f"checkpoint {file}: 'image_size' must be an int, got {metadata['image_size']!r}")
    if "intensity" in metadata and not isinstance(metadata["intensity"], str):
        raise ModelError(f"checkpoint {file}: 'intensity' must be a string, got {metadata['intensity']!r}")


def _strip_wrapper_prefixes(state: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """Remove ``module.``/``_orig_mod.`` when *every* key carries it; a mixture is left for the strict
    load to report, because guessing which keys belong where could load the wrong weights."""
    current = {str(k): v for k, v in state.items()}
    removed = ""
    changed = True
    while changed and current:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in current):
                current = {k[len(prefix) :]: v for k, v in current.items()}
                removed += prefix
                changed = True
    return current, removed


def sam2_version(state: Mapping[str, object]) -> Optional[str]:
    """``"2.1"`` when all of SAM 2.1's extra entries are present, ``"2.0"`` when none are (and the file
    is a SAM 2 model at all), None otherwise."""
    present = [k for k in SAM21_ONLY_KEYS if k in state]
    if len(present) == len(SAM21_ONLY_KEYS):
        return "2.1"
    if not present and _PATCH_EMBED in state:
        return "2.0"
    return None


def hiera_variant(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """tiny/small/base-plus/large from the trunk's width and depth, or None for anything else."""
    patch = state.get(_PATCH_EMBED)
    if not isinstance(patch, torch.Tensor) or patch.dim() == 0:
        return None
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        return None
    return HIERA_VARIANTS.get((int(patch.shape[0]), max(blocks) + 1))


def packaged_config(version: str, variant: str) -> str:
    """The sam2 package's config for a version and Hiera size."""
    suffix = _CONFIG_SUFFIX[variant]
    if version == "2.1":
        return f"configs/sam2.1/sam2.1_hiera_{suffix}.yaml"
    return f"configs/sam2/sam2_hiera_{suffix}.yaml"


def suggested_config(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The packaged config whose model matches these weights, when version and size are recognised."""
    version, variant = sam2_version(state), hiera_variant(state)
    if version and variant:
        return packaged_config(version, variant)
    return None


def load_into_model(
    model: torch.nn.Module,
    checkpoint: LoadedCheckpoint,
    config: str,
    mapping_note: str = "",
) -> None:
    """Copy the checkpoint into ``model`` (built from ``config``), strictly.

    A SAM 2.0 file in a SAM 2.1 config (or the reverse) is reported as exactly that, with the config
    that fits; any other mismatch names the keys and shapes, plus the config the weights look like.
    ``mapping_note`` prefixes key errors for publishers whose keys were mapped (Medical-SAM2).
    """
    own = model.state_dict()
    state = checkpoint.state_dict
    file_version, model_version = sam2_version(state), sam2_version(own)
    if file_version and model_version and file_version != model_version:
        evidence = "has" if file_version == "2.1" else "lacks"
        fix = suggested_config(state) or f"a SAM {file_version} config"
        raise ModelError(
            f"checkpoint {checkpoint.path.name} is a SAM {file_version} file (it {evidence} "
            f"no_obj_embed_spatial and obj_ptr_tpos_proj.*) but config {config} builds SAM {model_version}; "
            f"use {fix}"
        )
    try:
        load_state_dict_strict(model, state)
    except ModelError as exc:
        hint = ""
        suggestion = suggested_config(state)
        if suggestion and suggestion != config:
            looks = f"SAM {sam2_version(state)} hiera-{hiera_variant(state)}"
            hint = f"; the file looks like {looks}: try {suggestion}"
        prefix = f"{mapping_note}: " if mapping_note else ""
        raise ModelError(f"{prefix}{checkpoint.path.name} with config {config}: {exc}{hint}") from None
