"""Training data: the evaluation's dataset layouts (plus Slicer ``.seg.nrrd`` labels), checked in full
before training, split into training and validation cases, and cut into prompted batches.

Layouts are those of :mod:`medsam2.evaluation.datasets` (Decathlon/nnU-Net, BraTS, image/label
folders). An image/label folder may also hold segmentations exported from Slicer
(``labels/case1.seg.nrrd`` next to ``images/case1.nii.gz``): their structures are the segments named in
the file's header, overlapping segments (separate layers) included. A ``.seg.nrrd`` saved with a
smaller extent than its volume (same voxel grid, shifted origin) is placed into the volume's grid.

Checks (every case is read once before the first training step; the first problem is reported in one
line naming the file, with the count of other problems): unreadable files, image/label shape or
spacing mismatch, NaN or constant images, empty labels, label values that the dataset's description
does not name (``dataset.json`` labels, BraTS's 0-4, a ``.seg.nrrd`` header's segments).

Batches are built exactly as inference sees the data: slices cut along the session's axis with its
row flip (``SliceLayout``), intensities prepared by the session's ``SlicePreparer`` and stretched to
the model's square input, prompts scaled from slice pixels to the input as ``SAM2VideoPredictor``
scales them. 3D mode: clips of consecutive slices (a video), prompts on one or more slices of each
clip, the same clip positions across the batch so the clips run as one batch. 2D mode: single slices
with a box or clicks.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidVolumeError
from ..evaluation.datasets import (
    IMAGE_SUFFIXES,
    LabelSpec,
    check_label_grid,
    open_dataset,
    parse_label_spec,
    read_image,
    volume_files,
)
from ..evaluation.protocols import box_prompt, click_prompt
from ..geometry import SliceLayout, VolumeGeometry
from ..intensity import IntensityPreparation
from ..preparation import SlicePreparer, intensity_bounds
from ..volume import frames_to_device

SEG_NRRD = ".seg.nrrd"
MODES = ("3d", "2d")
PROMPT_KINDS_3D = ("box", "points", "mask")
PROMPT_KINDS_2D = ("box", "points")
BRATS_VALUES = (0, 1, 2, 3, 4)
# Box sides move by up to this share of the box's larger side (SAM's box noise is ~10 % of the side).
BOX_JITTER_FRACTION = 0.1
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


# ------------------------------------------------------------------------------------------ .seg.nrrd
def read_seg_nrrd(
    path: Path, shown: Optional[str] = None
) -> tuple[dict[str, np.ndarray], VolumeGeometry, tuple[int, int, int]]:
    """Slicer's ``.seg.nrrd``: ``{segment name: bool [k, j, i]}``, the file's geometry and shape.

    Voxel values are segment label values within a layer (``SegmentN_LabelValue`` / ``_Layer``); a
    value no segment of its layer names is an error, since it would be silently dropped."""
    import SimpleITK as sitk

    name = shown or path.name
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InvalidVolumeError(f"cannot read label {name}: {str(exc).strip().splitlines()[-1]}") from None
    keys = set(image.GetMetaDataKeys())
    array = sitk.GetArrayFromImage(image)
    layers = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 3:
        raise InvalidVolumeError(f"label {name} is a {image.GetDimension()}D segmentation; expected 3D")
    if layers == 1:
        array = array[..., None]
    segments: dict[str, np.ndarray] = {}
    described: dict[int, set[int]] = {}
    n = 0
    while f"Segment{n}_ID" in keys or f"Segment{n}_Name" in keys:

        def meta(field_name: str, default: str, n: int = n) -> str:
            key = f"Segment{n}_{field_name}"
            return image.GetMetaData(key).strip() if key in keys else default

        seg_name = meta("Name", meta("ID", f"Segment_{n + 1}"))
        try:
            value = int(meta("LabelValue", str(n + 1)))
            layer = int(meta("Layer", "0"))
        except ValueError:
            raise InvalidVolumeError(
                f"label {name}: segment {seg_name!r} has a non-integer label value or layer"
            ) from None
        if not 0 <= layer < array.shape[-1]:
            raise InvalidVolumeError(
                f"label {name}: segment {seg_name!r} is on layer {layer}, the file has {array.shape[-1]}"
            )
        if seg_name in segments:
            raise InvalidVolumeError(f"label {name} names segment {seg_name!r} twice; rename one in Slicer")
        segments[seg_name] = array[..., layer] == value
        described.setdefault(layer, set()).add(value)
        n += 1
    if not segments:
        raise InvalidVolumeError(
            f"label {name} has no Segment*_ header entries; export it from Slicer as a segmentation"
        )
    for layer in range(array.shape[-1]):
        found = {int(v) for v in np.unique(array[..., layer]) if v != 0}
        unknown = sorted(found - described.get(layer, set()))
        if unknown:
            raise InvalidVolumeError(
                f"label {name} holds value(s) {', '.join(map(str, unknown))} in layer {layer} that no segment "
                "in its header describes; re-export it from Slicer"
            )
    d = np.asarray(image.GetDirection(), dtype=float)
    geometry = VolumeGeometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(d))
    return segments, geometry, tuple(array.shape[:3])  # type: ignore[return-value]


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


# ------------------------------------------------------------------------------------------ batches
@dataclass
class PreparedCase:
    """A case in host memory in frame orientation: the raw slices (the volume's own dtype) with the
    session's clipping bounds, and one uint8 mask stack per structure."""

    case_id: str
    frames: torch.Tensor  # (num_slices, rows, cols)
    bounds: tuple[float, float]  # intensity clipping bounds of the whole volume
    masks: dict[str, torch.Tensor]  # structure -> (num_slices, rows, cols) uint8

    @property
    def nbytes(self) -> int:
        tensors = [self.frames, *self.masks.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class CaseStore:
    """Training cases held in host memory (most recently used first, within ``budget_bytes``; at least
    one), so a case is read and decompressed once rather than at every clip. Only the slices of a clip
    travel to the training device, where the session's own ``SlicePreparer`` prepares them with the
    whole volume's bounds: the model sees exactly what inference feeds it."""

    def __init__(
        self,
        dataset: TrainingDataset,
        layout_for: Callable[[VolumeGeometry], SliceLayout],
        intensity: IntensityPreparation,
        image_size: int,
        device: torch.device,
        budget_bytes: int = 8 << 30,
    ) -> None:
        self.dataset = dataset
        self.layout_for = layout_for
        self.intensity = intensity
        self.image_size = image_size
        self.device = device
        self.budget_bytes = max(0, int(budget_bytes))
        self._cases: OrderedDict[str, PreparedCase] = OrderedDict()
        self.loads = 0

    def get(self, case_id: str) -> PreparedCase:
        if case_id in self._cases:
            self._cases.move_to_end(case_id)
            return self._cases[case_id]
        case = self.dataset.load(self.dataset.record(case_id))
        self.loads += 1
        layout = self.layout_for(case.geometry)
        cpu = torch.device("cpu")
        frames = frames_to_device(case.image, layout, cpu)
        prepared = PreparedCase(
            case_id,
            frames,
            intensity_bounds(frames, self.intensity),
            {name: frames_to_device(mask.astype(np.uint8), layout, cpu) for name, mask in case.structures.items()},
        )
        self._cases[case_id] = prepared
        while len(self._cases) > 1 and sum(c.nbytes for c in self._cases.values()) > self.budget_bytes:
            self._cases.popitem(last=False)
        return prepared

    def images(self, case: PreparedCase, slices: Sequence[int]) -> torch.Tensor:
        """(T, 3, S, S) model inputs for the slices, on the training device."""
        frames = case.frames[list(slices)].to(self.device, non_blocking=True)
        preparer = SlicePreparer(frames, self.intensity, self.image_size, bounds=case.bounds)
        return preparer(list(range(len(slices))))

    def masks(self, case: PreparedCase, name: str, slices: Sequence[int]) -> torch.Tensor:
        """(T, rows, cols) uint8 masks of a structure on the training device."""
        return case.masks[name][list(slices)].to(self.device, non_blocking=True)


@dataclass
class TrainBatch:
    """B clips of T slices. Images are frame-major: row ``t * B + b`` is slice t of clip b."""

    images: torch.Tensor  # (T * B, 3, S, S)
    targets: torch.Tensor  # (T, B, 1, S, S) in {0, 1}
    prompt_frames: tuple[int, ...]
    prompt_kind: str
    point_inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # SAM 2's point dicts
    mask_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (B, 1, S, S)
    keys: list[tuple[str, int]] = field(default_factory=list)  # (case, slice) per image row

    @property
    def num_frames(self) -> int:
        return int(self.targets.size(0))

    @property
    def batch_size(self) -> int:
        return int(self.targets.size(1))


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, 1, S, S) float {0, 1}, as SAM2VideoPredictor resizes a mask prompt."""
    m = masks.float()[:, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (m >= 0.5).float()


class ClipSampler:
    """Random prompted clips (3D) or slices (2D) from the training cases; all randomness from ``rng``."""

    def __init__(
        self,
        store: CaseStore,
        index: dict[str, CaseIndex],
        case_ids: Sequence[str],
        *,
        mode: str,
        clip_length: int,
        prompt_slices: int,
        prompt_kinds: Sequence[str],
        batch_size: int,
        rng: np.random.Generator,
        log: Optional[Log] = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidVolumeError(f"mode must be 3d or 2d, got {mode!r}")
        allowed = PROMPT_KINDS_3D if mode == "3d" else PROMPT_KINDS_2D
        bad = [k for k in prompt_kinds if k not in allowed]
        if bad or not prompt_kinds:
            raise InvalidVolumeError(
                f"prompts for {mode} training must be among {', '.join(allowed)}, "
                f"got {', '.join(prompt_kinds) or 'none'}"
            )
        if batch_size < 1:
            raise InvalidVolumeError(f"batch size must be at least 1, got {batch_size}")
        self.store = store
        self.mode = mode
        self.prompt_kinds = tuple(prompt_kinds)
        self.batch_size = batch_size
        self.rng = rng
        self.image_size = store.image_size
        if mode == "3d":
            if clip_length < 2:
                raise InvalidVolumeError(f"clip length must be at least 2 slices in 3D mode, got {clip_length}")
            if not 1 <= prompt_slices < clip_length:
                raise InvalidVolumeError(f"prompted slices per clip must be 1..{clip_length - 1}, got {prompt_slices}")
        self.clip_length = clip_length if mode == "3d" else 1
        self.prompt_slices = prompt_slices if mode == "3d" else 1
        pairs = []
        short = []
        for case_id in case_ids:
            entry = index[case_id]
            if entry.num_slices < self.clip_length:
                short.append(case_id)
                continue
            for name, slices in entry.present.items():
                if slices:
                    present = np.zeros(entry.num_slices, dtype=bool)
                    present[list(slices)] = True
                    pairs.append((case_id, name, present))
        if short and log:
            log(
                f"{len(short)} case(s) have fewer than {self.clip_length} slices and are not used for clips: "
                + ", ".join(short[:5])
            )
        if not pairs:
            longest = max((index[c].num_slices for c in case_ids), default=0)
            if short:
                raise InvalidVolumeError(
                    f"clip length {self.clip_length} exceeds the slices of every training case (at most {longest}); "
                    "lower --clip-length"
                )
            raise InvalidVolumeError("no training case holds a labelled structure")
        self.pairs = pairs

    def next_batch(self) -> TrainBatch:
        kind = str(self.rng.choice(self.prompt_kinds))
        positions, samples = self._draw()
        length = self.clip_length
        images, targets, keys, frame_masks = [], [], [], []
        for case_id, name, start in samples:
            prepared = self.store.get(case_id)
            slices = list(range(start, start + length))
            images.append(self.store.images(prepared, slices))  # (T, 3, S, S)
            masks = self.store.masks(prepared, name, slices)
            frame_masks.append(masks)
            targets.append(resize_masks(masks, self.image_size))  # (T, 1, S, S)
            keys.append([(case_id, s) for s in slices])
        image_t = torch.stack(images, dim=1)  # (T, B, 3, S, S)
        target_t = torch.stack(targets, dim=1)  # (T, B, 1, S, S)
        batch = TrainBatch(
            images=image_t.reshape(-1, *image_t.shape[2:]),
            targets=target_t,
            prompt_frames=tuple(int(p) for p in positions),
            prompt_kind=kind,
            keys=[keys[b][t] for t in range(length) for b in range(len(samples))],
        )
        for p in batch.prompt_frames:
            if kind == "mask":
                batch.mask_inputs[p] = target_t[p]
            else:
                batch.point_inputs[p] = self._points(kind, [m[p] for m in frame_masks])
        return batch

    def _draw(self) -> tuple[np.ndarray, list[tuple[str, str, int]]]:
        """Prompt positions shared by the batch and (case, structure, first slice) per clip such that the
        structure is on every prompted slice."""
        length = self.clip_length
        for _ in range(100):
            positions = np.sort(self.rng.choice(length, size=self.prompt_slices, replace=False))
            samples: list[tuple[str, str, int]] = []
            for _b in range(self.batch_size):
                for _try in range(50):
                    case_id, name, present = self.pairs[int(self.rng.integers(len(self.pairs)))]
                    starts = np.arange(len(present) - length + 1)
                    ok = present[starts[:, None] + positions[None, :]].all(axis=1)
                    valid = starts[ok]
                    if len(valid):
                        samples.append((case_id, name, int(self.rng.choice(valid))))
                        break
                else:
                    break
            if len(samples) == self.batch_size:
                return positions, samples
        raise InvalidVolumeError(
            f"cannot cut clips of {length} slices with {self.prompt_slices} prompted slice(s) on the structure; "
            "lower --prompt-slices or --clip-length"
        )

    def _points(self, kind: str, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Box or clicks per clip on one slice, in model input pixels (x, y), padded with label -1."""
        coords: list[list[tuple[float, float]]] = []
        labels: list[list[int]] = []
        positives = int(self.rng.integers(1, 4))
        negatives = int(self.rng.integers(0, 2))
        for mask in masks:
            m = mask.cpu().numpy() != 0
            rows, cols = m.shape
            sx, sy = self.image_size / cols, self.image_size / rows
            if kind == "box":
                r0, c0, r1, c1 = _box_extent(m)
                jitter = int(round(BOX_JITTER_FRACTION * max(r1 - r0 + 1, c1 - c0 + 1)))
                r0, c0, r1, c1 = box_prompt(m, jitter, self.rng)
                coords.append([(c0 * sx, r0 * sy), (c1 * sx, r1 * sy)])
                labels.append([2, 3])
            else:
                points, point_labels = click_prompt(m, positives, negatives, self.rng)
                coords.append([(c * sx, r * sy) for r, c in points])
                labels.append(list(point_labels))
        width = max(len(c) for c in coords)
        device = self.store.device
        coord_t = torch.zeros(len(coords), width, 2, dtype=torch.float32)
        label_t = -torch.ones(len(coords), width, dtype=torch.int32)
        for b, (c, lab) in enumerate(zip(coords, labels)):
            coord_t[b, : len(c)] = torch.tensor(c, dtype=torch.float32)
            label_t[b, : len(lab)] = torch.tensor(lab, dtype=torch.int32)
        return {"point_coords": coord_t.to(device), "point_labels": label_t.to(device)}


def _box_extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])
