"""The model catalogue: every checkpoint the engine can run, by short name, as data.

No torch, no sam2: the Slicer panel lists these names (and their licences) before anything heavy is
installed, and ``medsam2 models list`` answers at once. Loading is :mod:`medsam2.models.registry`'s job.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from medsam2.errors import ModelError
from medsam2.intensity import IntensityPreparation, parse_intensity

DEFAULT_MODEL = "medsam2-latest"

PathLike = Union[str, os.PathLike]

META_LICENCE = "Apache-2.0"
MEDSAM2_LICENCE = "CC-BY-SA-4.0"
MEDSAM2_LICENCE_NOTE = "the model card also says: for research and education only"
UNKNOWN_LICENCE = "unspecified"
MEDICAL_SAM2_LICENCE_NOTE = (
    "the hub repository has no licence and no model card; the authors' code repository has Meta's "
    "Apache-2.0 LICENSE file but a GPL badge: ask the authors before any use beyond research"
)

MEDICAL_SAM2_MAPPING_NOTE = (
    "Medical-SAM2 keys are expected to be exactly SAM 2.0's (as its published training code builds "
    "them), but this file's are not, so it cannot be mapped onto the sam2 package"
)


@dataclass(frozen=True)
class ModelEntry:
    """One model: where its weights are, how to build it, how its inputs were prepared in training.

    ``intensity`` is the preparation the model was trained with for its main modality; the per-modality
    recipes are in ``modality_intensity`` (strings :func:`medsam2.intensity.parse_intensity` reads), and
    ``intensity_for(modality)`` picks from them.
    ``size_bytes`` is approximate (4 bytes per float32 parameter of the config, 2 for bf16 files); the
    exact size is read from the hub before a download. ``sha256`` is the publisher's file hash where
    one is known; ``sha256_certain=False`` marks a hash quoted by a third party, reported but not
    enforced. Downloads are always checked against the SHA-256 the hub itself announces.
    """

    name: str
    title: str
    config: str
    image_size: int
    sam2_version: str
    intensity_spec: str
    trained_intensity: str
    licence: str
    repo_id: Optional[str] = None
    filename: Optional[str] = None
    licence_note: str = ""
    size_bytes: Optional[int] = None
    sha256: Optional[str] = None
    sha256_certain: bool = False
    modality_intensity: tuple[tuple[str, str], ...] = ()
    key_mapping: str = "sam2"
    aliases: tuple[str, ...] = ()
    local_path: Optional[Path] = None

    @property
    def intensity(self) -> IntensityPreparation:
        return parse_intensity(self.intensity_spec)

    def intensity_for(self, modality: Optional[str]) -> Optional[IntensityPreparation]:
        """The training-time preparation for a DICOM modality (``CT``, ``MR``, ``US``); ``*`` in the
        table matches any modality. None when the model's recipe does not cover this modality (or the
        modality is unknown, as for NIfTI files): the caller decides from the data, because a CT window
        applied to an MRI would flatten it."""
        wanted = (modality or "").strip().upper()
        table = dict(self.modality_intensity)
        spec = table.get(wanted) if wanted else None
        if spec is None:
            spec = table.get("*")
        return parse_intensity(spec) if spec else None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def source(self) -> str:
        if self.local_path is not None:
            return str(self.local_path)
        return f"{self.repo_id}/{self.filename}"

    @property
    def licence_text(self) -> str:
        return f"{self.licence} ({self.licence_note})" if self.licence_note else self.licence

    @property
    def display_size(self) -> str:
        return f"~{self.size_bytes / 1e6:.0f} MB" if self.size_bytes else "?"

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["local_path"] = str(self.local_path) if self.local_path else None
        data["modality_intensity"] = dict(self.modality_intensity)
        return data


def _meta(version: str, size: str, suffix: str, file_size: str) -> ModelEntry:
    tag = "2.1" if version == "2.1" else "2"
    repo = f"facebook/sam{tag}-hiera-{size}"
    folder, stem = ("sam2.1", "sam2.1_hiera") if version == "2.1" else ("sam2", "sam2_hiera")
    filename = f"{stem}_{file_size}.pt"
    return ModelEntry(
        name=f"sam{tag}-{size}",
        title=f"Meta SAM {version} Hiera-{size} (natural images and video)",
        repo_id=repo,
        filename=filename,
        config=f"configs/{folder}/{stem}_{suffix}.yaml",
        image_size=1024,
        sam2_version=version,
        intensity_spec="minmax",
        trained_intensity="natural 8-bit RGB video frames, ImageNet-normalised; no medical windowing",
        licence=META_LICENCE,
        size_bytes=_PARAMS[(version, size)] * 4,
        # Meta's models saw no medical images: a CT window / MR percentile clip gives them the contrast
        # a radiologist would look at.
        modality_intensity=(("CT", "soft_tissue"), ("MR", "mri")),
        aliases=(repo, filename.lower()),
    )


# Parameter counts of the packaged configs (sam2 1.1.0), for approximate download sizes.
_PARAMS = {
    ("2.0", "tiny"): 38_946_242,
    ("2.0", "small"): 46_044_098,
    ("2.0", "base-plus"): 80_833_922,
    ("2.0", "large"): 224_430_386,
    ("2.1", "tiny"): 38_962_754,
    ("2.1", "small"): 46_060_610,
    ("2.1", "base-plus"): 80_850_434,
    ("2.1", "large"): 224_446_898,
}

_MEDSAM2_REPO = "wanglab/MedSAM2"
_MEDSAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"  # run at 512: its sam2.1_hiera_t512.yaml
_MEDSAM2_TRAINING = (
    "CT clipped to a window (its Slicer presets: abdomen 400/40, lung 1500/-600, brain 80/40, "
    "mediastinum 350/50), MR clipped to the 0.5-99.5 percentiles of non-zero voxels, both rescaled to "
    "0-255, then 512 px and ImageNet normalisation"
)


def _medsam2(
    name: str, filename: str, title: str, intensity: str, extra_aliases: tuple[str, ...] = ()
) -> ModelEntry:
    return ModelEntry(
        name=name,
        title=title,
        repo_id=_MEDSAM2_REPO,
        filename=filename,
        config=_MEDSAM2_CONFIG,
        image_size=512,
        sam2_version="2.1",
        intensity_spec=intensity,
        trained_intensity=_MEDSAM2_TRAINING,
        licence=MEDSAM2_LICENCE,
        licence_note=MEDSAM2_LICENCE_NOTE,
        size_bytes=_PARAMS[("2.1", "tiny")] * 4,
        modality_intensity=(("CT", "abdomen"), ("MR", "mri"), ("US", "minmax")),
        aliases=(filename.lower(), *extra_aliases),
    )


def _build_catalogue() -> dict[str, ModelEntry]:
    entries: list[ModelEntry] = []
    for version in ("2.0", "2.1"):
        for size, suffix, file_size in (
            ("tiny", "t", "tiny"),
            ("small", "s", "small"),
            ("base-plus", "b+", "base_plus"),
            ("large", "l", "large"),
        ):
            entries.append(_meta(version, size, suffix, file_size))
    entries += [
        _medsam2(
            "medsam2-latest",
            "MedSAM2_latest.pt",
            "MedSAM2 (bowang-lab), latest general model: CT, MR, ultrasound, video",
            "abdomen",
            extra_aliases=(_MEDSAM2_REPO.lower(), "medsam2"),
        ),
        _medsam2("medsam2-2411", "MedSAM2_2411.pt", "MedSAM2 base model of November 2024", "abdomen"),
        _medsam2("medsam2-ct-lesion", "MedSAM2_CTLesion.pt", "MedSAM2 fine-tuned for CT lesions", "abdomen"),
        _medsam2(
            "medsam2-mri-liver-lesion",
            "MedSAM2_MRI_LiverLesion.pt",
            "MedSAM2 fine-tuned for liver lesions in MRI",
            "mri",
        ),
        _medsam2(
            "medsam2-us-heart",
            "MedSAM2_US_Heart.pt",
            "MedSAM2 fine-tuned for heart ultrasound video",
            "minmax",
        ),
        _medsam2(
            "medsam2-flare25-recist",
            "medsam2_FLARE25_RECIST_baseline.pt",
            "MedSAM2 FLARE25 pan-cancer RECIST-to-3D baseline (CT lesions)",
            "abdomen",
        ),
        ModelEntry(
            name="medical-sam2",
            title="Medical-SAM2 (ImprintLab) pretrained weights, SAM 2.0 tiny; a 3D CT model",
            repo_id="jiayuanz3/MedSAM2_pretrain",
            filename="MedSAM2_pretrain.pth",
            config="configs/sam2/sam2_hiera_t.yaml",
            image_size=1024,
            sam2_version="2.0",
            intensity_spec="minmax",
            trained_intensity=(
                "slices pre-converted to 8-bit RGB JPEG, 1024 px, ImageNet-normalised; the windowing used "
                "to make them is not published, so min-max is the default"
            ),
            licence=UNKNOWN_LICENCE,
            licence_note=MEDICAL_SAM2_LICENCE_NOTE,
            # bf16 on disk: 2 bytes per parameter (the hub lists 78.1 MB).
            size_bytes=78_100_000,
            # Quoted by a third-party loader (SKKU-IBE Medical-SAM2 GUI); not checked against the file.
            sha256="059572b072eff2e41975bf85b0dcca96bc58889db60a89e9f5b1f075236735d7",
            sha256_certain=False,
            modality_intensity=(("CT", "minmax"),),
            key_mapping="medical-sam2",
            aliases=("jiayuanz3/medsam2_pretrain", "medsam2_pretrain.pth", "medical_sam2"),
        ),
    ]
    return {entry.name: entry for entry in entries}


_CATALOGUE: dict[str, ModelEntry] = _build_catalogue()


def list_models() -> list[ModelEntry]:
    return list(_CATALOGUE.values())


def get_model(name: str) -> ModelEntry:
    """The catalogue entry for a short name, a hub repository id or a file name (any case)."""
    key = (name or "").strip().lower()
    if key in _CATALOGUE:
        return _CATALOGUE[key]
    for entry in _CATALOGUE.values():
        if key in entry.aliases:
            return entry
    known = list(_CATALOGUE) + [alias for e in _CATALOGUE.values() for alias in e.aliases]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    close_names = []
    for match in close:
        resolved = _CATALOGUE.get(match) or next(e for e in _CATALOGUE.values() if match in e.aliases)
        if resolved.name not in close_names:
            close_names.append(resolved.name)
    hint = f"did you mean {', '.join(close_names)}?" if close_names else "see medsam2 models list"
    raise ModelError(f"unknown model {name!r}; {hint} (or pass --checkpoint FILE for your own weights)")


def entry_for(model: Union[str, ModelEntry]) -> ModelEntry:
    return model if isinstance(model, ModelEntry) else get_model(model)
