"""Reading requests: geometry, axis and intensity from the query, prompts and propagation options
checked before they reach a session (every bad value a one-line 400, never a 500)."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
from fastapi import Request

from medsam2.errors import (
    InvalidPromptError,
    InvalidVolumeError,
)
from medsam2.geometry import VolumeGeometry
from medsam2.intensity import IntensityPreparation, parse_intensity
from medsam2.remote.wire import (
    WireFormatError,
    decode_mask_b64,
)
from medsam2.server.live import LiveSession
from medsam2.server.schemas import (
    BoxPrompt,
    MaskPrompt,
    PointsPrompt,
    PropagateRequest,
)
from medsam2.server.sessions import (
    BadRequestError,
    RequestTooLargeError,
)


def check_slice(session: LiveSession, slice_index: int) -> None:
    if not 0 <= slice_index < session.num_slices:
        raise InvalidPromptError(f"slice {slice_index} is outside the volume (0..{session.num_slices - 1})")


async def read_limited(request: Request, limit: int) -> bytearray:
    """The body, counted as it arrives (a declared Content-Length was checked by BodyLimitMiddleware;
    this bounds a chunked upload too)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLargeError(
                f"upload is over this server's limit of {limit:,} bytes; crop or downsample the volume, "
                "or ask the operator to raise --max-upload-mb"
            )
    if not body:
        raise BadRequestError(
            "empty upload: send the volume as gzip-compressed .npy bytes in the request body"
        )
    return body


def floats(text: Optional[str], count: int, name: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidVolumeError(f"{name} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise InvalidVolumeError(f"{name} must be {count} comma-separated numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise InvalidVolumeError(f"{name} must be {count} finite numbers, got {text[:120]!r}")
    return values


def parse_geometry(
    spacing: Optional[str], origin: Optional[str], direction: Optional[str]
) -> Optional[VolumeGeometry]:
    if spacing is None and origin is None and direction is None:
        return None  # as an in-process session without geometry (a 2D image stays 2D)
    default = VolumeGeometry()
    return VolumeGeometry(
        spacing=floats(spacing, 3, "spacing") or default.spacing,  # type: ignore[arg-type]
        origin=floats(origin, 3, "origin") or default.origin,  # type: ignore[arg-type]
        direction=floats(direction, 9, "direction") or default.direction,
    )


def parse_axis(axis: str) -> Union[int, str]:
    value = axis.strip().lower()
    if value in ("0", "1", "2"):
        return int(value)
    if value in ("axial", "coronal", "sagittal"):
        return value
    raise InvalidVolumeError(f"axis must be axial, coronal, sagittal or a voxel axis 0, 1, 2; got {axis!r}")


def intensity_from_query(text: Optional[str], nonzero_only: Optional[bool]) -> Optional[IntensityPreparation]:
    if text is None:
        return None
    prep = parse_intensity(text)
    if nonzero_only is not None and prep.mode == "percentile":
        prep = IntensityPreparation(
            mode=prep.mode,
            lower_percentile=prep.lower_percentile,
            upper_percentile=prep.upper_percentile,
            nonzero_only=nonzero_only,
        )
    return prep


def apply_prompt(session: LiveSession, prompt: Union[PointsPrompt, BoxPrompt, MaskPrompt]) -> Any:
    if isinstance(prompt, PointsPrompt):
        return session.add_points(prompt.object_id, prompt.points, prompt.labels, replace=prompt.replace)
    if isinstance(prompt, BoxPrompt):
        return session.add_box(
            prompt.object_id, prompt.corners[0], prompt.corners[1], prompt.points, prompt.labels
        )
    # Checked before decoding, so the client's shape never decides what is allocated.
    check_slice(session, prompt.slice_index)
    expected = session.layout.from_frame(np.empty(session.frame_shape, bool)).shape
    if tuple(prompt.shape) != tuple(expected):
        raise InvalidPromptError(
            f"mask for slice {prompt.slice_index} has shape {tuple(prompt.shape)}, expected {tuple(expected)}"
        )
    try:
        mask = decode_mask_b64(prompt.data, prompt.shape)
    except WireFormatError as exc:
        raise InvalidPromptError(f"mask for slice {prompt.slice_index}: {exc}") from None
    return session.add_mask(prompt.object_id, prompt.slice_index, mask)


def check_propagate(session: LiveSession, params: PropagateRequest) -> None:
    """The engine's own up-front checks, answered now as a 400 rather than later as a failed run."""
    lo, hi, selected = session.check_run(
        params.direction, params.slice_range, params.stop_when_absent, params.object_ids, params.mode
    )
    # The engine finds this only once the run has started; a client is better told now.
    state = session._state
    for o in selected:
        idx = state["obj_id_to_idx"][o]
        prompted = set(state["point_inputs_per_obj"].get(idx, {})) | set(state["mask_inputs_per_obj"].get(idx, {}))
        if not any(lo <= f <= hi for f in prompted):
            raise InvalidPromptError(f"object {o} has no prompt between slices {lo} and {hi}")
