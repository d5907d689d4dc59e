"""Labelled datasets on disk: Medical Segmentation Decathlon, BraTS, and plain image/label folders.

Layouts
-------
``msd``    ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (the Decathlon's, and nnU-Net v2's where
           images are ``case_0000.nii.gz`` per channel). Label names come from ``dataset.json``.
``brats``  one folder per case holding ``<case>_seg.nii.gz`` (2018-2021) or ``<case>-seg.nii.gz``
           (2023+) next to one file per MR sequence. Labels are the challenge's regions: whole
           tumour WT = {1, 2, 3, 4}, tumour core TC = {1, 3, 4}, enhancing tumour ET = {3, 4} (the
           enhancing label is 4 before 2023 and 3 after; the absent one never matches).
``pairs``  a folder with ``images/`` and ``labels/`` (also ``imagesTr``/``labelsTr`` without a
           ``dataset.json``) whose files pair up by name; labels are the values found in each case.

Labels are :class:`LabelSpec` (a name and the label values it covers), so regions made of several
values (BraTS) and single organs (MSD) are evaluated the same way. Volumes are read with SimpleITK
into ``[k, j, i]`` arrays with a :class:`~medsam2.geometry.VolumeGeometry`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from medsam2.errors import InvalidVolumeError
from medsam2.geometry import VolumeGeometry

LAYOUTS = ("auto", "msd", "brats", "pairs")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".mhd.gz")
BRATS_REGIONS = (("WT", (1, 2, 3, 4)), ("TC", (1, 3, 4)), ("ET", (3, 4)))
# Sequence names across BraTS editions (2018-2021 | 2023+): either spelling picks the same file.
BRATS_SEQUENCES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


@dataclass(frozen=True)
class LabelSpec:
    """One evaluated structure: a name and the ground-truth label values that make it up."""

    name: str
    values: tuple[int, ...]

    def mask(self, label_volume: np.ndarray) -> np.ndarray:
        return np.isin(label_volume, self.values)


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    image: Path
    label: Path
    channel: int = 0  # component of a multi-channel (4D or vector) image


@dataclass
class LoadedCase:
    case_id: str
    image: np.ndarray  # float32 [k, j, i]
    label: np.ndarray  # integer [k, j, i]
    geometry: VolumeGeometry


@dataclass
class EvaluationDataset:
    root: Path
    layout: str
    cases: list[CaseRecord]
    labels: Optional[list[LabelSpec]]  # None: every non-zero value found in each case
    name: str = ""
    modality: str = ""

    def labels_for(self, case: LoadedCase) -> list[LabelSpec]:
        if self.labels is not None:
            return list(self.labels)
        return [LabelSpec(str(int(v)), (int(v),)) for v in np.unique(case.label) if v != 0]

    def load(self, case: CaseRecord) -> LoadedCase:
        image, geometry = read_image(case.image, channel=case.channel)
        label, label_geometry = read_image(case.label, channel=0, as_label=True)
        check_label_grid(label.shape, label_geometry, image.shape, geometry, case.label.name, case.image.name)
        return LoadedCase(case.case_id, image, label, geometry)


def check_label_grid(
    label_shape: tuple[int, ...],
    label_geometry: VolumeGeometry,
    shape: tuple[int, ...],
    geometry: VolumeGeometry,
    label_name: str,
    image_name: str,
) -> None:
    """A label must lie on its image's voxel grid: same shape (k, j, i) and spacing."""
    if tuple(label_shape) != tuple(shape):
        raise InvalidVolumeError(
            f"label {label_name} has shape {tuple(label_shape)} (k, j, i) but image {image_name} has "
            f"{tuple(shape)}; resample the label onto the image grid"
        )
    if not np.allclose(geometry.spacing, label_geometry.spacing, rtol=1e-3, atol=1e-4):
        raise InvalidVolumeError(
            f"label {label_name} has spacing {tuple(label_geometry.spacing)} but image {image_name} has "
            f"{tuple(geometry.spacing)}; resample the label onto the image grid"
        )


def read_image(path: Union[str, Path], channel: int = 0, as_label: bool = False) -> tuple[np.ndarray, VolumeGeometry]:
    """A 3D volume as ``[k, j, i]`` plus its geometry; ``channel`` picks one component of a 4D or
    multi-component image (the Decathlon stores BraTS's four sequences as a 4D NIfTI)."""
    from medsam2.io.volumes import read_volume

    path = Path(path)
    if not path.is_file():
        raise InvalidVolumeError(f"cannot find {path}")
    array, geometry = read_volume(path, channel=channel)
    if as_label:
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise InvalidVolumeError(f"label file {path.name} holds non-integer values; expected a label map")
        return np.ascontiguousarray(array.astype(np.int32, copy=False)), geometry
    return np.ascontiguousarray(array.astype(np.float32, copy=False)), geometry


def strip_volume_suffix(name: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Optional[str]:
    """``case_001.nii.gz`` -> ``case_001``; None for a file that is not a volume."""
    low = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):  # .seg.nrrd before .nrrd, .nii.gz before .nii
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def volume_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Files by name without extension; hidden files (macOS ``._`` forks in the Decathlon tars) skipped."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem = strip_volume_suffix(p.name, suffixes)
        if stem is not None and p.is_file() and not p.name.startswith("."):
            out[stem] = p
    return out


def detect_layout(root: Path) -> str:
    if (root / "dataset.json").is_file():
        return "msd"
    if _image_label_dirs(root) is not None:
        return "pairs"
    if any(_brats_label_file(d) is not None for d in root.iterdir() if d.is_dir()):
        return "brats"
    raise InvalidVolumeError(
        f"{root} is not a dataset this tool knows: expected dataset.json (Decathlon), images/ + labels/ "
        "folders, or BraTS case folders with *_seg.nii.gz"
    )


def _image_label_dirs(root: Path) -> Optional[tuple[Path, Path]]:
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr"), ("image", "label")):
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    return None


def _brats_label_file(folder: Path) -> Optional[Path]:
    for p in folder.iterdir():
        stem = strip_volume_suffix(p.name)
        if stem is not None and (stem.endswith("_seg") or stem.endswith("-seg")):
            return p
    return None


def _pair_by_name(images: Path, labels: Path, channel: int) -> list[CaseRecord]:
    image_files = volume_files(images)
    label_files = volume_files(labels)
    cases = []
    for stem, label in label_files.items():
        # nnU-Net names channels case_0000, case_0001...: the label is plain ``case``.
        image = image_files.get(f"{stem}_{channel:04d}") or (image_files.get(stem) if channel == 0 else None)
        if image is not None:
            cases.append(CaseRecord(stem, image, label, 0 if f"{stem}_{channel:04d}" in image_files else channel))
    if not cases:
        raise InvalidVolumeError(
            f"no image in {images} has the name of a label in {labels} (e.g. images/case1.nii.gz with "
            "labels/case1.nii.gz, or nnU-Net's images/case1_0000.nii.gz)"
        )
    return cases


def _msd_labels(meta: dict) -> list[LabelSpec]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InvalidVolumeError("dataset.json has no 'labels' mapping")
    specs = []
    values: tuple[int, ...]
    for key, value in raw.items():
        if str(key).lstrip("-").isdigit():  # Decathlon: {"1": "spleen"}
            name, values = str(value), (int(key),)
        elif isinstance(value, list):  # nnU-Net v2 regions: {"whole tumor": [1, 2, 3]}
            name, values = str(key), tuple(int(v) for v in value)
        else:  # nnU-Net v2: {"spleen": 1}
            name, values = str(key), (int(value),)
        if values != (0,):
            specs.append(LabelSpec(name, values))
    return specs


def _msd_channel(meta: dict, channel: Union[int, str, None]) -> tuple[int, str]:
    names = meta.get("modality") or meta.get("channel_names") or {}
    names = {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}
    if channel is None:
        return 0, names.get(0, "")
    if isinstance(channel, int) or str(channel).isdigit():
        index = int(channel)
        if names and index not in names:
            raise InvalidVolumeError(f"dataset has channels {sorted(names)}; channel {index} does not exist")
        return index, names.get(index, "")
    for index, name in names.items():
        if name.lower() == str(channel).lower():
            return index, name
    raise InvalidVolumeError(f"dataset has no channel named {channel!r}; channels: {', '.join(names.values())}")


def _open_msd(root: Path, channel: Union[int, str, None]) -> EvaluationDataset:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidVolumeError(f"cannot read {root / 'dataset.json'}: {exc}") from None
    labels = _msd_labels(meta)
    index, modality = _msd_channel(meta, channel)
    training = meta.get("training")
    cases: list[CaseRecord] = []
    if isinstance(training, list) and training and isinstance(training[0], dict):
        for entry in training:
            image, label = root / str(entry["image"]), root / str(entry["label"])
            case_id = strip_volume_suffix(label.name) or label.name
            image_stem = strip_volume_suffix(image.name)
            per_channel = image_stem is not None and image.with_name(
                f"{image_stem}_{index:04d}{image.name[len(image_stem) :]}"
            )
            if not image.is_file() and per_channel and per_channel.is_file():
                # nnU-Net-style entries name the case; each channel is its own file, case_0000...
                cases.append(CaseRecord(case_id, per_channel, label, 0))
            else:
                cases.append(CaseRecord(case_id, image, label, index))
    else:
        dirs = _image_label_dirs(root)
        if dirs is None:
            raise InvalidVolumeError(f"{root} has a dataset.json without 'training' entries and no imagesTr/labelsTr")
        cases = _pair_by_name(dirs[0], dirs[1], index)
    return EvaluationDataset(root, "msd", cases, labels, name=str(meta.get("name", root.name)), modality=modality)


def _open_brats(root: Path, channel: Union[int, str, None]) -> EvaluationDataset:
    sequence = str(channel).lower() if channel is not None else "flair"
    wanted = {sequence, BRATS_SEQUENCES.get(sequence, sequence)}
    wanted |= {k for k, v in BRATS_SEQUENCES.items() if v in wanted}
    cases = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        label = _brats_label_file(folder)
        if label is None:
            continue
        image = None
        for p in sorted(folder.iterdir()):
            stem = strip_volume_suffix(p.name)
            if stem is not None and re.split(r"[_-]", stem)[-1].lower() in wanted:
                image = p
        if image is None:
            raise InvalidVolumeError(f"BraTS case {folder.name} has no {sequence} image (*_{sequence}.nii.gz)")
        cases.append(CaseRecord(folder.name, image, label, 0))
    labels = [LabelSpec(name, values) for name, values in BRATS_REGIONS]
    return EvaluationDataset(root, "brats", cases, labels, name=root.name, modality=sequence)


def open_dataset(
    path: Union[str, Path],
    layout: str = "auto",
    labels: Optional[Sequence[str]] = None,
    channel: Union[int, str, None] = None,
) -> EvaluationDataset:
    """Open a dataset folder. ``labels`` selects structures by name, by value, or as a new group
    ``"NAME=V1,V2"``; None evaluates every label. ``channel`` picks the image channel (index or
    modality name, e.g. ``flair`` for BraTS)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidVolumeError(f"dataset folder {root} does not exist")
    if layout not in LAYOUTS:
        raise InvalidVolumeError(f"unknown dataset layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "msd":
        dataset = _open_msd(root, channel)
    elif layout == "brats":
        dataset = _open_brats(root, channel)
    else:
        dirs = _image_label_dirs(root)
        if dirs is None:
            raise InvalidVolumeError(f"{root} has no images/ and labels/ folders")
        index = int(channel) if channel is not None and str(channel).isdigit() else 0
        if channel is not None and not str(channel).isdigit():
            raise InvalidVolumeError(f"a plain image/label folder has numbered channels only, got {channel!r}")
        dataset = EvaluationDataset(root, "pairs", _pair_by_name(dirs[0], dirs[1], index), None, name=root.name)
    if not dataset.cases:
        raise InvalidVolumeError(f"no labelled cases found in {root}")
    if labels:
        dataset.labels = [parse_label_spec(text, dataset.labels) for text in labels]
        names = [spec.name for spec in dataset.labels]
        if len(set(names)) != len(names):
            raise InvalidVolumeError(f"label selection names a structure twice: {', '.join(names)}")
    return dataset


def parse_label_spec(text: str, known: Optional[Sequence[LabelSpec]]) -> LabelSpec:
    """``spleen`` (a known name), ``1`` (a value) or ``tumour=1,2`` (a group of values)."""
    text = str(text).strip()
    if "=" in text:
        name, _, values = text.partition("=")
        try:
            group = tuple(int(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise InvalidVolumeError(f"label group {text!r} must be NAME=V1,V2 with integer values") from None
        if not name.strip() or not group or 0 in group:
            raise InvalidVolumeError(f"label group {text!r} needs a name and non-zero values, e.g. tumour=1,2")
        return LabelSpec(name.strip(), group)
    for spec in known or []:
        if spec.name.lower() == text.lower():
            return spec
    if text.lstrip("-").isdigit():
        value = int(text)
        if value == 0:
            raise InvalidVolumeError("label 0 is the background; choose a structure")
        for spec in known or []:
            if spec.values == (value,):
                return spec
        return LabelSpec(text, (value,))
    choices = ", ".join(spec.name for spec in known or []) or "label values such as 1"
    raise InvalidVolumeError(f"unknown label {text!r}; choose one of: {choices}")
