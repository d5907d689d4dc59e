"""Training datasets: the evaluation's dataset layouts plus Slicer ``.seg.nrrd`` labels, checked in full
before training and split into training and validation cases.

Layouts are those of :mod:`medsam2.datasets.layouts` (Decathlon/nnU-Net, BraTS, image/label
folders). An image/label folder may also hold segmentations exported from Slicer
(``labels/case1.seg.nrrd`` next to ``images/case1.nii.gz``): their structures are the segments named in
the file's header, overlapping segments (separate layers) included. A ``.seg.nrrd`` saved with a
smaller extent than its volume (same voxel grid, shifted origin) is placed into the volume's grid.

Checks (every case is read once before the first training step; the first problem is reported in one
line naming the file, with the count of other problems): unreadable files, image/label shape or
spacing mismatch, NaN or constant images, empty labels, label values that the dataset's description
does not name (``dataset.json`` labels, BraTS's 0-4, a ``.seg.nrrd`` header's segments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from medsam2.datasets.layouts import (
    IMAGE_SUFFIXES,
    LabelSpec,
    check_label_grid,
    open_dataset,
    parse_label_spec,
    read_image,
    volume_files,
)
from medsam2.errors import InvalidVolumeError
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import IntensityPreparation
from medsam2.io.seg_nrrd import SEG_NRRD, read_seg_nrrd
from medsam2.preparation import intensity_bounds
from medsam2.volume import frames_to_device

BRATS_VALUES = (0, 1, 2, 3, 4)
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class TrainingRecord:
    case_id: str
    image: Path
    label: Path
    channel: int = 0

    @property
    def is_seg_nrrd(self) -> bool:
        return self.label.name.lower().endswith(SEG_NRRD)


@dataclass
class TrainingCase:
    """One case in memory: the image ``[k, j, i]`` and a boolean mask per structure."""

    case_id: str
    image: np.ndarray
    geometry: VolumeGeometry
    structures: dict[str, np.ndarray]


@dataclass(frozen=True)
class CaseIndex:
    """What sampling needs to know about a case without holding it in memory."""

    case_id: str
    num_slices: int
    frame_shape: tuple[int, int]
    present: dict[str, tuple[int, ...]]  # structure -> slices (along the training axis) holding it


@dataclass
class TrainingDataset:
    root: Path
    layout: str
    records: list[TrainingRecord]
    label_specs: Optional[list[LabelSpec]]  # structures of label-map cases; None: every value found
    described_values: Optional[frozenset[int]]  # values the description names (None: no description)
    description: str  # where those values come from, for messages
    segment_names: Optional[list[str]]  # selected .seg.nrrd segments by name; None: every segment
    name: str = ""
    modality: str = ""
    seen_segments: set[str] = field(default_factory=set)  # every .seg.nrrd segment name read so far

    def record(self, case_id: str) -> TrainingRecord:
        for rec in self.records:
            if rec.case_id == case_id:
                return rec
        raise InvalidVolumeError(f"case {case_id} is not in dataset {self.root}")

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    # -------------------------------------------------------------------------------- loading
    def load(self, record: TrainingRecord) -> TrainingCase:
        """Read one case and check it (see the module notes); errors name the file."""
        image, geometry = read_image(record.image, channel=record.channel)
        image_name = self.relative(record.image)
        label_name = self.relative(record.label)
        if not np.all(np.isfinite(image)):
            bad = int(np.count_nonzero(~np.isfinite(image)))
            raise InvalidVolumeError(f"image {image_name} has {bad} NaN or infinite voxel(s); replace them first")
        if image.size and float(image.min()) == float(image.max()):
            raise InvalidVolumeError(f"image {image_name} has constant intensity {float(image.min()):g}")
        if record.is_seg_nrrd:
            structures = self._load_seg_nrrd(record, image.shape, geometry, label_name, image_name)
        else:
            label, label_geometry = read_image(record.label, channel=0, as_label=True)
            check_label_grid(label.shape, label_geometry, image.shape, geometry, label_name, image_name)
            structures = self._structures_from_labelmap(label, label_name)
        return TrainingCase(record.case_id, image, geometry, structures)

    def _structures_from_labelmap(self, label: np.ndarray, label_name: str) -> dict[str, np.ndarray]:
        values = np.unique(label)
        nonzero = [int(v) for v in values if v != 0]
        if not nonzero:
            raise InvalidVolumeError(f"label {label_name} is empty (no labelled voxel); remove the case or label it")
        if self.described_values is not None:
            unknown = sorted(set(nonzero) - self.described_values)
            if unknown:
                described = ", ".join(str(v) for v in sorted(self.described_values))
                raise InvalidVolumeError(
                    f"label {label_name} holds value(s) {', '.join(map(str, unknown))} that {self.description} "
                    f"does not describe (described values: {described}); fix the label or the description"
                )
        specs = self.label_specs
        if specs is None:
            return {str(v): label == v for v in nonzero}
        return {spec.name: spec.mask(label) for spec in specs}

    def _load_seg_nrrd(
        self,
        record: TrainingRecord,
        shape: tuple[int, ...],
        geometry: VolumeGeometry,
        label_name: str,
        image_name: str,
    ) -> dict[str, np.ndarray]:
        segments, seg_geometry, seg_shape = read_seg_nrrd(record.label, label_name)
        self.seen_segments.update(segments)
        if not any(mask.any() for mask in segments.values()):
            raise InvalidVolumeError(f"label {label_name} is empty (no segment has a voxel); remove the case")
        if tuple(seg_shape) != tuple(shape):
            segments = {
                name: place_on_grid(mask, seg_geometry, shape, geometry, label_name, image_name)
                for name, mask in segments.items()
            }
        else:
            check_label_grid(seg_shape, seg_geometry, shape, geometry, label_name, image_name)
        if self.segment_names is None:
            return segments
        by_lower = {name.lower(): mask for name, mask in segments.items()}
        return {name: by_lower.get(name.lower(), np.zeros(tuple(shape), dtype=bool)) for name in self.segment_names}

    # -------------------------------------------------------------------------------- checking
    def check(
        self,
        layout_for: Callable[[VolumeGeometry], SliceLayout],
        intensity: IntensityPreparation,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> dict[str, CaseIndex]:
        """Read every case, check it and index where each structure is; raises one line for the first
        problem (with the number of others) before anything is trained."""
        index: dict[str, CaseIndex] = {}
        problems: list[str] = []
        for n, record in enumerate(self.records, 1):
            try:
                case = self.load(record)
                layout = layout_for(case.geometry)
                frames = frames_to_device(case.image, layout, torch.device("cpu"))
                try:
                    intensity_bounds(frames, intensity)
                except InvalidVolumeError as exc:
                    raise InvalidVolumeError(f"image {self.relative(record.image)}: {exc}") from None
                index[record.case_id] = _index_case(case, layout)
            except InvalidVolumeError as exc:
                problems.append(str(exc))
            if progress:
                progress(n, len(self.records))
        if problems:
            more = f" (and {len(problems) - 1} more problem(s) in other cases)" if len(problems) > 1 else ""
            raise InvalidVolumeError(problems[0] + more)
        if self.segment_names and any(r.is_seg_nrrd for r in self.records):
            seen = {name.lower() for name in self.seen_segments}
            maps = any(not r.is_seg_nrrd for r in self.records)  # there, a number selects a label value
            unknown = [
                n for n in self.segment_names if n.lower() not in seen and not (maps and n.lstrip("-").isdigit())
            ]
            if unknown:
                raise InvalidVolumeError(
                    f"no .seg.nrrd file has a segment named {', '.join(map(repr, unknown))}; segments found: "
                    + ", ".join(sorted(self.seen_segments))
                )
        if not any(slices for entry in index.values() for slices in entry.present.values()):
            wanted = self.selection_text()
            raise InvalidVolumeError(f"no case of {self.root} holds {wanted}; check --label")
        return index

    def selection_text(self) -> str:
        names = [s.name for s in self.label_specs or []] + list(self.segment_names or [])
        return "the selected structures (" + ", ".join(names) + ")" if names else "any labelled structure"


def _index_case(case: TrainingCase, layout: SliceLayout) -> CaseIndex:
    shape = tuple(case.image.shape)
    axis = layout.array_axis
    other = tuple(a for a in range(3) if a != axis)
    present = {
        name: tuple(int(s) for s in np.flatnonzero(mask.any(axis=other))) for name, mask in case.structures.items()
    }
    return CaseIndex(case.case_id, layout.num_slices(shape), layout.frame_shape(shape), present)  # type: ignore[arg-type]


def place_on_grid(
    mask: np.ndarray,
    mask_geometry: VolumeGeometry,
    shape: tuple[int, ...],
    geometry: VolumeGeometry,
    label_name: str,
    image_name: str,
) -> np.ndarray:
    """A mask saved on a sub-extent of the image's voxel grid (same spacing and direction, origin a whole
    number of voxels away), placed into the full grid. Anything else is a grid mismatch."""
    mismatch = InvalidVolumeError(
        f"label {label_name} has shape {tuple(mask.shape)} (k, j, i) but image {image_name} has {tuple(shape)}, "
        "and it is not a crop of the image's voxel grid; resample the label onto the image grid"
    )
    if not (
        np.allclose(mask_geometry.spacing, geometry.spacing, rtol=1e-4, atol=1e-5)
        and np.allclose(mask_geometry.direction, geometry.direction, atol=1e-4)
    ):
        raise mismatch
    offset_ijk = geometry.lps_to_ijk([mask_geometry.origin])[0]
    offset = np.round(offset_ijk).astype(int)
    if not np.allclose(offset_ijk, offset, atol=1e-3):
        raise mismatch
    full = np.zeros(tuple(shape), dtype=bool)
    k0, j0, i0 = int(offset[2]), int(offset[1]), int(offset[0])
    src = np.argwhere(mask)
    if len(src) == 0:
        return full
    dst = src + np.array([k0, j0, i0])
    if (dst < 0).any() or (dst >= np.array(shape)).any():
        raise InvalidVolumeError(
            f"label {label_name} has labelled voxels outside image {image_name}; export the segmentation with "
            "the image as its reference geometry"
        )
    full[dst[:, 0], dst[:, 1], dst[:, 2]] = True
    return full


# ------------------------------------------------------------------------------------------ opening
def _files_by_stem(folder: Path) -> dict[str, Path]:
    return volume_files(folder, (*IMAGE_SUFFIXES, SEG_NRRD))  # Slicer's .seg.nrrd is a label format here


def _image_label_dirs(root: Path) -> Optional[tuple[Path, Path]]:
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr"), ("image", "label")):
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    return None


def _has_seg_nrrd(folder: Path) -> bool:
    return any(p.name.lower().endswith(SEG_NRRD) and not p.name.startswith(".") for p in folder.iterdir())


def _pair_folders(images: Path, labels: Path, channel: int) -> list[TrainingRecord]:
    image_files = _files_by_stem(images)
    records = []
    for stem, label in _files_by_stem(labels).items():
        per_channel = image_files.get(f"{stem}_{channel:04d}")
        image = per_channel or (image_files.get(stem) if channel == 0 else None)
        if image is not None:
            records.append(TrainingRecord(stem, image, label, 0 if per_channel is not None else channel))
    if not records:
        raise InvalidVolumeError(
            f"no image in {images} has the name of a label in {labels} (e.g. images/case1.nii.gz with "
            "labels/case1.nii.gz or labels/case1.seg.nrrd)"
        )
    return records


def open_training_dataset(
    path: Union[str, Path],
    layout: str = "auto",
    labels: Optional[Sequence[str]] = None,
    channel: Union[int, str, None] = None,
) -> TrainingDataset:
    """Open a dataset folder for training. ``labels`` selects structures as the evaluation does (a name,
    a value or ``NAME=V1,V2``), or ``.seg.nrrd`` segments by name; None trains on every structure."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidVolumeError(f"dataset folder {root} does not exist")
    selection = [str(t).strip() for t in labels] if labels else None
    if selection is not None and len({t.lower() for t in selection}) != len(selection):
        raise InvalidVolumeError(f"label selection names a structure twice: {', '.join(selection)}")
    dirs = _image_label_dirs(root)
    seg_folder = (
        layout in ("auto", "pairs")
        and not (root / "dataset.json").is_file()
        and dirs is not None
        and _has_seg_nrrd(dirs[1])
    )
    if seg_folder:
        assert dirs is not None
        if channel is not None and not str(channel).isdigit():
            raise InvalidVolumeError(f"a plain image/label folder has numbered channels only, got {channel!r}")
        records = _pair_folders(dirs[0], dirs[1], int(channel) if channel is not None else 0)
        has_maps = any(not r.is_seg_nrrd for r in records)
        specs: Optional[list[LabelSpec]] = None
        segment_names = None
        if selection is not None:
            # names select segments of .seg.nrrd files; values and NAME=V1,V2 select label-map values
            segment_names = [t for t in selection if "=" not in t]
            if has_maps:
                specs = [parse_label_spec(t, None) for t in selection if "=" in t or t.lstrip("-").isdigit()]
        return TrainingDataset(root, "pairs", records, specs, None, "", segment_names, name=root.name)

    dataset = open_dataset(root, layout=layout, labels=None, channel=channel)
    records = [TrainingRecord(c.case_id, c.image, c.label, c.channel) for c in dataset.cases]
    described: Optional[frozenset[int]]
    if dataset.layout == "msd" and dataset.labels is not None:
        described = frozenset({0} | {v for spec in dataset.labels for v in spec.values})
        description = "dataset.json"
    elif dataset.layout == "brats":
        described = frozenset(BRATS_VALUES)
        description = "the BraTS label convention"
    else:
        described, description = None, ""
    specs = dataset.labels
    if selection is not None:
        specs = [parse_label_spec(t, dataset.labels) for t in selection]
    return TrainingDataset(
        root,
        dataset.layout,
        records,
        list(specs) if specs is not None else None,
        described,
        description,
        None,
        name=dataset.name,
        modality=dataset.modality,
    )


# ------------------------------------------------------------------------------------------ split
def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/validation split: the same ids, fraction and seed give the same split anywhere."""
    if not 0 <= val_fraction < 1:
        raise InvalidVolumeError(f"validation fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    if val_fraction == 0:
        return ids, []
    if len(ids) < 2:
        raise InvalidVolumeError(
            f"{len(ids)} case cannot be split into training and validation; add cases or pass --val-fraction 0"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(max(1, int(round(len(ids) * val_fraction))), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


