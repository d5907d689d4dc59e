"""Building SAM2 models from the configs packaged with ``sam2`` (or a local YAML), at any input size.

The model registry (registry.py) decides *which* config, size and weights; this module only turns
them into an :class:`EngineVideoPredictor` on a device.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from medsam2.errors import ModelError
from medsam2.predictor import EngineVideoPredictor

log = logging.getLogger("medsam2")

# SAM2's image encoder has a total stride of 16: the memory-attention RoPE grid is image_size / 16.
BACKBONE_STRIDE = 16

# The overrides Meta's build_sam2_video_predictor applies by default (apply_postprocessing=True), so
# engine and reference run the same model. Hole filling needs sam2's CUDA extension; where it was not
# built, sam2 skips it after a three-line warning on every slice (see sam2_extension_available).
POSTPROCESSING_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)


# A correction on an already-propagated slice becomes a conditioning slice, so the next propagation
# keeps it and every slice attends to it. With sam2's default (False) the corrected slice is stored as
# an ordinary tracked slice and the next propagation overwrites it: the radiologist's click is lost.
ENGINE_OVERRIDES = ("++model.add_all_frames_to_correct_as_cond=true",)


def image_size_overrides(image_size: int) -> list[str]:
    """Hydra overrides that run a packaged config at another input size (MedSAM2 runs 2.1 tiny at 512)."""
    if image_size % (BACKBONE_STRIDE * 4) != 0 or image_size < 64:
        raise ModelError(f"image size must be a multiple of 64 and at least 64, got {image_size}")
    grid = image_size // BACKBONE_STRIDE
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


def compose_model_config(
    config: str,
    image_size: Optional[int] = None,
    extra_overrides: tuple[str, ...] = (),
    target: str = "medsam2.predictor.EngineVideoPredictor",
    postprocessing: bool = True,
):
    """Hydra-compose a sam2 config (packaged name such as ``configs/sam2.1/sam2.1_hiera_t.yaml`` or a
    path to a YAML file) with the engine's predictor class and optional size override."""
    import sam2  # noqa: F401  (initialises sam2's hydra config module)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [f"++model._target_={target}", *ENGINE_OVERRIDES]
    if postprocessing:
        overrides += list(POSTPROCESSING_OVERRIDES)
    if image_size is not None:
        overrides += image_size_overrides(image_size)
    overrides += list(extra_overrides)

    path = Path(config)
    try:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            # A user's own config file: compose it from its folder, then restore sam2's search path.
            GlobalHydra.instance().clear()
            try:
                with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base="1.2"):
                    cfg = compose(config_name=path.stem, overrides=overrides)
            finally:
                GlobalHydra.instance().clear()
                from hydra import initialize_config_module

                initialize_config_module("sam2", version_base="1.2")
        else:
            cfg = compose(config_name=config, overrides=overrides)
    except Exception as exc:  # hydra raises several unrelated types for a missing or bad config
        raise ModelError(f"cannot read model config {config!r}: {str(exc).splitlines()[0]}") from None
    OmegaConf.resolve(cfg)
    return cfg


def build_predictor(
    config: str,
    image_size: Optional[int] = None,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    device: Union[str, torch.device] = "cpu",
    seed: Optional[int] = None,
    postprocessing: bool = True,
) -> EngineVideoPredictor:
    """Instantiate the engine predictor; with ``state_dict=None`` the weights are random (``seed``),
    which is what tests and benchmarks use where no checkpoint can be downloaded."""
    from hydra.utils import instantiate

    cfg = compose_model_config(config, image_size=image_size, postprocessing=postprocessing)
    if seed is not None:
        torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict)
    if getattr(model, "fill_hole_area", 0) > 0 and not sam2_extension_available():
        # Without the extension sam2 tries the hole filling on every slice, fails, warns in three lines
        # that read like an error, and keeps the mask unchanged. Turning it off gives the same masks
        # without the noise; the fact is logged once (the CLI shows it with --debug).
        model.fill_hole_area = 0
    model = model.to(device)
    model.eval()
    return model


@functools.cache
def sam2_extension_available() -> bool:
    """Whether sam2's compiled CUDA extension (``sam2._C``, hole filling) is installed."""
    available = importlib.util.find_spec("sam2._C") is not None
    if not available:
        log.info(
            "sam2's CUDA extension is not installed: small holes in masks are not filled "
            "(the same masks sam2 itself gives without it)"
        )
    return available


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights, naming the keys and shapes that do not fit instead of raising torch's wall of text."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong_shape:
            parts.append(
                "wrong shape "
                + _few([f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape])
            )
        raise ModelError("checkpoint does not fit the model config: " + "; ".join(parts))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def save_checkpoint(path: Union[str, os.PathLike], model: torch.nn.Module) -> None:
    """Write weights in Meta's layout ``{"model": state_dict}`` (loadable with weights_only=True)."""
    torch.save({"model": model.state_dict()}, path)
