"""Prompts from the command line and from files, converted to voxel indices for a session.

Formats:
- Slicer markups JSON (``.mrk.json``, saved from Slicer's Markups module): point lists and ROIs, in
  the file's ``coordinateSystem`` (LPS, Slicer's default on disk, or RAS). A point list whose name
  contains "negative" (or a control point whose label or description starts with "-" or says
  "negative") gives negative clicks. Each point list / ROI belongs to object 1 unless its name ends in
  ``#N`` (object N).
- Simple JSON::

      {"coordinates": "RAS",                       # RAS (default), LPS or IJK
       "objects": [{"id": 1, "label": "liver",
                    "points": [[x, y, z], ...], "negative_points": [[x, y, z]],
                    "box": [[x, y, z], [x, y, z]]}]}

A box (two corners, or an ROI) is placed on the slice through its centre; its in-plane extent is the
corners' (or the ROI's corners') extent on that slice.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from medsam2.api import Session, SlicePreview, send_prompts
from medsam2.errors import InvalidPromptError
from medsam2.geometry import SliceLayout, VolumeGeometry


@dataclass
class ObjectPrompts:
    """One object's prompts in continuous voxel indices (i, j, k)."""

    object_id: int
    label: Optional[str] = None
    positive: list[tuple[float, float, float]] = field(default_factory=list)
    negative: list[tuple[float, float, float]] = field(default_factory=list)
    boxes: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.positive or self.boxes)


def parse_triplet(text: str, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise InvalidPromptError(f"{what} {text!r} must be three numbers separated by commas, e.g. 10.5,-20,35")
    return values  # type: ignore[return-value]


def parse_box(text: str, what: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 6:
        raise InvalidPromptError(f"{what} {text!r} must be two corners, six numbers: x1,y1,z1,x2,y2,z2")
    return parse_triplet(",".join(parts[:3]), what), parse_triplet(",".join(parts[3:]), what)


def to_ijk(
    points: Sequence[Sequence[float]], system: str, geometry: VolumeGeometry
) -> list[tuple[float, float, float]]:
    if not len(points):
        return []
    system = system.upper()
    if system == "IJK":
        arr = np.asarray(points, dtype=float)
    elif system == "RAS":
        arr = geometry.ras_to_ijk(points)
    elif system == "LPS":
        arr = geometry.lps_to_ijk(points)
    else:
        raise InvalidPromptError(f"unknown coordinate system {system!r}; use RAS, LPS or IJK")
    return [tuple(float(v) for v in p) for p in arr]  # type: ignore[misc]


def box_on_slice(
    corners_ijk: Sequence[Sequence[float]], layout: SliceLayout
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Corners of any 3D box (2 or 8 points) -> two corners on the slice through its centre."""
    pts = np.asarray(corners_ijk, dtype=float)
    axis = layout.voxel_axis
    centre = float(np.round(pts[:, axis].mean()))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    lo[axis] = hi[axis] = centre
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def _object_of(name: str) -> int:
    match = re.search(r"#(\d+)\s*$", name or "")
    return int(match.group(1)) if match else 1


def _is_negative(name: str, point: dict[str, Any]) -> bool:
    text = " ".join(str(point.get(k, "")) for k in ("label", "description")).strip().lower()
    return "negative" in (name or "").lower() or text.startswith("-") or "negative" in text


def _roi_corners(markup: dict[str, Any]) -> list[list[float]]:
    centre = np.asarray(markup.get("center"), dtype=float)
    size = np.asarray(markup.get("size"), dtype=float)
    if centre.shape != (3,) or size.shape != (3,):
        raise InvalidPromptError("ROI markup needs 'center' and 'size' (three numbers each)")
    axes = np.asarray(markup.get("orientation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    corners = []
    for sx in (-0.5, 0.5):
        for sy in (-0.5, 0.5):
            for sz in (-0.5, 0.5):
                corners.append(list(centre + axes @ (size * np.array([sx, sy, sz]))))
    return corners


def read_prompt_file(
    path: Union[str, os.PathLike], geometry: VolumeGeometry, layout: SliceLayout
) -> dict[int, ObjectPrompts]:
    """Read a Slicer ``.mrk.json`` or the simple JSON format into per-object voxel prompts."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidPromptError(f"prompt file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidPromptError(f"prompt file {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidPromptError(f"prompt file {path} must hold a JSON object")
    objects: dict[int, ObjectPrompts] = {}
    if "markups" in doc:
        for markup in doc["markups"]:
            system = markup.get("coordinateSystem", "LPS")
            name = markup.get("name", "")
            obj = objects.setdefault(_object_of(name), ObjectPrompts(_object_of(name)))
            kind = markup.get("type", "")
            if kind == "ROI":
                corners = to_ijk(_roi_corners(markup), system, geometry)
                obj.boxes.append(box_on_slice(corners, layout))
            elif kind in ("Fiducial", "Point", "PointList"):
                for cp in markup.get("controlPoints", []):
                    if cp.get("positionStatus", "defined") != "defined" or "position" not in cp:
                        continue
                    target = obj.negative if _is_negative(name, cp) else obj.positive
                    target += to_ijk([cp["position"]], system, geometry)
            else:
                raise InvalidPromptError(f"{path}: markup type {kind!r} is not a prompt; use point lists or ROIs")
    elif "objects" in doc:
        system = str(doc.get("coordinates", "RAS"))
        for entry in doc["objects"]:
            try:
                oid = int(entry.get("id", 1))
            except (TypeError, ValueError):
                raise InvalidPromptError(f"{path}: object id {entry.get('id')!r} is not an integer") from None
            obj = objects.setdefault(oid, ObjectPrompts(oid))
            obj.label = entry.get("label", obj.label)
            obj.positive += to_ijk(entry.get("points", []), system, geometry)
            obj.negative += to_ijk(entry.get("negative_points", []), system, geometry)
            if entry.get("box") is not None:
                box = entry["box"]
                if len(box) != 2:
                    raise InvalidPromptError(f"{path}: object {oid} box must be two corners")
                obj.boxes.append(box_on_slice(to_ijk(box, system, geometry), layout))
    else:
        raise InvalidPromptError(f"prompt file {path} has neither 'markups' (Slicer) nor 'objects' (simple JSON)")
    empty = [o for o, p in objects.items() if p.is_empty()]
    if not objects or empty:
        raise InvalidPromptError(f"prompt file {path} has no positive point or box for object(s) {empty or '(none)'}")
    return objects


def apply_prompts(session: Session, objects: dict[int, ObjectPrompts]) -> list[SlicePreview]:
    """Send each object's prompts to the session, one call per prompted slice (box first)."""
    previews = []
    for oid, obj in sorted(objects.items()):
        points = [*obj.positive, *obj.negative]
        labels = [1] * len(obj.positive) + [0] * len(obj.negative)
        previews += send_prompts(session, oid, points, labels, obj.boxes)
    return previews
