"""Volume geometry: voxel index <-> patient coordinates, and which voxel axis is axial/coronal/sagittal.

Conventions (the ones SimpleITK, ITK and DICOM use, and Slicer uses on disk):
- arrays are indexed ``[k, j, i]``; voxel axis 0 is i (fastest, numpy axis 2), axis 2 is k;
- ``spacing``, ``origin`` and ``direction`` are in ITK order and in LPS millimetres; ``direction`` is
  3x3 row-major with the *columns* giving the i, j, k axis directions;
- integer voxel indices are voxel centres.
Slicer works in RAS; RAS = diag(-1, -1, 1) * LPS, converted here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medsam2.errors import InvalidVolumeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Patient axis of each view's slice normal, as an index into LPS (x: L/R, y: P/A, z: S/I).
VIEW_NORMAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class VolumeGeometry:
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        spacing = np.asarray(self.spacing, dtype=float)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InvalidVolumeError(f"spacing must be three positive numbers, got {tuple(self.spacing)}")
        if len(self.origin) != 3 or not np.all(np.isfinite(self.origin)):
            raise InvalidVolumeError(f"origin must be three finite numbers, got {tuple(self.origin)}")
        direction = np.asarray(self.direction, dtype=float)
        if direction.size != 9:
            raise InvalidVolumeError(f"direction must have 9 values (3x3), got {direction.size}")
        if not np.all(np.isfinite(direction)):  # a NaN determinant would pass the test below
            raise InvalidVolumeError(f"direction must be nine finite numbers, got {tuple(direction.ravel())}")
        if abs(abs(np.linalg.det(direction.reshape(3, 3))) - 1.0) > 1e-3:
            raise InvalidVolumeError("direction matrix is not orthonormal (|det| != 1)")
        object.__setattr__(self, "spacing", tuple(float(v) for v in spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in direction.ravel()))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's IJKToRAS)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps_matrix()

    @classmethod
    def from_ijk_to_ras_matrix(cls, matrix: np.ndarray) -> VolumeGeometry:
        """Inverse of :meth:`ijk_to_ras_matrix` (for a Slicer volume's IJKToRAS)."""
        matrix = np.asarray(matrix, dtype=float)
        lps = LPS_TO_RAS @ matrix[:3, :4]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return cls(tuple(spacing), tuple(lps[:3, 3]), tuple(direction.ravel()))

    def ras_to_ijk(self, points_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """(N, 3) RAS millimetres -> (N, 3) continuous voxel indices (i, j, k)."""
        pts = np.atleast_2d(np.asarray(points_ras, dtype=float))
        inv = np.linalg.inv(self.ijk_to_ras_matrix())
        return (pts @ inv[:3, :3].T) + inv[:3, 3]

    def ijk_to_ras(self, points_ijk: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        m = self.ijk_to_ras_matrix()
        return (pts @ m[:3, :3].T) + m[:3, 3]

    def lps_to_ijk(self, points_lps: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(np.asarray(points_lps, dtype=float))
        inv = np.linalg.inv(self.ijk_to_lps_matrix())
        return (pts @ inv[:3, :3].T) + inv[:3, 3]

    def voxel_axis_for_view(self, view: str) -> int:
        """Voxel axis (0=i, 1=j, 2=k) whose direction is closest to the view's slice normal.

        An oblique or coronally acquired volume is sliced along the voxel axis nearest to what
        the radiologist asked for, so slices stay whole voxel planes (no resampling).
        """
        if view not in VIEW_NORMAL_AXIS:
            raise InvalidVolumeError(f"unknown view {view!r}; use one of {sorted(VIEW_NORMAL_AXIS)}")
        patient_axis = VIEW_NORMAL_AXIS[view]
        return int(np.argmax(np.abs(self.direction_matrix[patient_axis, :])))


# How each view is shown (Slicer's and radiology's convention), as LPS unit vectors for "down the rows"
# and "along the columns": axial with anterior at the top and the patient's right on the left of the
# screen; coronal and sagittal with the head at the top; sagittal with anterior on the left.
_DISPLAY_AXES = {
    2: (np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])),  # axial: rows -> P, columns -> L
    1: (np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0])),  # coronal: rows -> I, columns -> L
    0: (np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0])),  # sagittal: rows -> I, columns -> P
}


@dataclass(frozen=True)
class SliceLayout:
    """How 2D frames are cut from a ``[k, j, i]`` array along one voxel axis.

    A frame is the slice as a radiologist sees it in Slicer (axial: anterior up, patient's right on the
    left; coronal/sagittal: head up), whatever the storage order: a NIfTI stored in RAS order and a
    DICOM series stored in LPS order give the same frames for the same anatomy. SAM2 was trained on
    upright images, and results should not depend on how a file happened to be written. Frames are
    numpy views (transpose and flips only), so writing into a frame writes into the volume.
    """

    voxel_axis: int
    flip_rows: bool = False
    flip_cols: bool = False
    transpose: bool = False  # frame rows run along the faster of the two remaining array axes

    @property
    def array_axis(self) -> int:
        return 2 - self.voxel_axis

    @classmethod
    def for_axis(cls, voxel_axis: int, geometry: VolumeGeometry) -> SliceLayout:
        if voxel_axis not in (0, 1, 2):
            raise InvalidVolumeError(f"slice axis must be 0 (i), 1 (j) or 2 (k), got {voxel_axis}")
        d = geometry.direction_matrix
        view = int(np.argmax(np.abs(d[:, voxel_axis])))  # the patient axis this slice stack runs along
        want_rows, want_cols = _DISPLAY_AXES[view]
        slow, fast = [a for a in (2, 1, 0) if a != voxel_axis]  # remaining voxel axes, array order
        transpose = abs(d[:, fast] @ want_rows) > abs(d[:, slow] @ want_rows)
        row_axis, col_axis = (fast, slow) if transpose else (slow, fast)
        return cls(
            voxel_axis,
            flip_rows=bool(d[:, row_axis] @ want_rows < 0),
            flip_cols=bool(d[:, col_axis] @ want_cols < 0),
            transpose=bool(transpose),
        )

    def frame(self, volume: np.ndarray, index: int) -> np.ndarray:
        """A view (no copy) of slice ``index`` in display orientation; writes go into ``volume``."""
        return self.to_frame(_slice_view(volume, self.array_axis, index))

    def to_frame(self, cut: np.ndarray) -> np.ndarray:
        """A slice as cut from the array (remaining axes in array order) -> display orientation."""
        f = cut.T if self.transpose else cut
        if self.flip_rows:
            f = f[::-1]
        if self.flip_cols:
            f = f[:, ::-1]
        return f

    def from_frame(self, frame: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_frame`."""
        f = frame[:, ::-1] if self.flip_cols else frame
        if self.flip_rows:
            f = f[::-1]
        return f.T if self.transpose else f

    def frame_shape(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        rest = [s for a, s in enumerate(shape) if a != self.array_axis]
        return (rest[1], rest[0]) if self.transpose else (rest[0], rest[1])

    def num_slices(self, shape: tuple[int, int, int]) -> int:
        return int(shape[self.array_axis])

    def ijk_to_frame(self, ijk: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(N,3) voxel indices -> (slice index per point, (N,2) frame pixel (x=col, y=row))."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        slow, fast = [a for a in (2, 1, 0) if a != self.voxel_axis]
        row_axis, col_axis = (fast, slow) if self.transpose else (slow, fast)
        rows, cols = ijk[:, row_axis].copy(), ijk[:, col_axis].copy()
        n_rows, n_cols = self.frame_shape(shape)
        if self.flip_rows:
            rows = (n_rows - 1) - rows
        if self.flip_cols:
            cols = (n_cols - 1) - cols
        return ijk[:, self.voxel_axis], np.stack([cols, rows], axis=1)


def _slice_view(volume: np.ndarray, array_axis: int, index: int) -> np.ndarray:
    if array_axis == 0:
        return volume[index]
    if array_axis == 1:
        return volume[:, index]
    return volume[:, :, index]
