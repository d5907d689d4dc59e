"""Request and response bodies of the HTTP API (they are what /openapi.json documents).

Coordinates are continuous voxel indices (i, j, k), the engine's own convention: the client converts
from RAS millimetres with the volume's geometry, exactly as it would in process. Masks travel as
base64 of gzip(np.packbits(mask)) (see wire.py) in JSON, and as raw gzip bytes from the mask routes.
"""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from medsam2.remote.wire import MASK_ENCODING, MAX_OBJECT_ID, MAX_POINTS, MAX_SIDE, MAX_SLICE_INDEX

Point = tuple[float, float, float]
# Bounded integers: an out-of-range value is a 400 naming the field and the bound (wire.py says why).
ObjectId = Annotated[int, Field(ge=0, le=MAX_OBJECT_ID, description=f"0..{MAX_OBJECT_ID}")]
SliceIndex = Annotated[int, Field(ge=0, le=MAX_SLICE_INDEX)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Label = Annotated[int, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PointsPrompt(_Strict):
    type: Literal["points"]
    object_id: ObjectId
    points: list[Point] = Field(
        description="(i, j, k) voxel coordinates, all on one slice", min_length=1, max_length=MAX_POINTS
    )
    labels: list[Label] = Field(description="1 positive, 0 negative, one per point", max_length=MAX_POINTS)
    replace: bool = Field(
        default=False, description="replace this slice's earlier clicks instead of adding to them"
    )


class BoxPrompt(_Strict):
    type: Literal["box"]
    object_id: ObjectId
    corners: tuple[Point, Point] = Field(description="two opposite corners (i, j, k) on one slice, inclusive")
    points: Optional[list[Point]] = Field(
        default=None, description="optional clicks refining the box", max_length=MAX_POINTS
    )
    labels: Optional[list[Label]] = Field(default=None, max_length=MAX_POINTS)


class MaskPrompt(_Strict):
    type: Literal["mask"]
    object_id: ObjectId
    slice_index: SliceIndex = Field(description="slice along the session axis")
    shape: tuple[Side, Side] = Field(description="the slice's shape as cut from the [k, j, i] array")
    data: str = Field(description=f"base64 of the mask, encoded {MASK_ENCODING}")


Prompt = Annotated[Union[PointsPrompt, BoxPrompt, MaskPrompt], Field(discriminator="type")]


class SlicePreviewOut(BaseModel):
    object_id: int
    slice_index: int
    shape: tuple[int, int]
    encoding: str = MASK_ENCODING
    data: str = Field(description="base64 of the prompted slice's mask, as cut from the [k, j, i] array")


class PropagateRequest(_Strict):
    direction: str = Field(default="both", description="both, forward or backward")
    slice_range: Optional[tuple[SliceIndex, SliceIndex]] = Field(
        default=None, description="first and last slice (inclusive)"
    )
    stop_when_absent: Optional[Annotated[int, Field(ge=1, le=MAX_SLICE_INDEX)]] = Field(
        default=None, description="end a direction after this many empty slices"
    )
    object_ids: Optional[list[ObjectId]] = Field(
        default=None, description="objects to propagate (default: all)", min_length=1, max_length=MAX_OBJECT_ID + 1
    )
    mode: Optional[str] = Field(
        default=None,
        description=(
            "full (every selected object through the range) or local (only objects whose prompts "
            "changed, outward from each changed slice until the masks agree with the previous run's); "
            "default: local after the session's first run, as in process"
        ),
    )


class RunOut(BaseModel):
    run_id: Optional[str] = None
    kind: Optional[str] = Field(default=None, description="propagate or precompute")
    state: str = Field(description="idle (no run yet), running, done, cancelled or failed")
    done: int = Field(default=0, description="slices done so far")
    total: int = Field(default=0, description="slices this run visits (0 until the first slice is done)")
    error: Optional[str] = None
    error_type: Optional[str] = None
    object_ids: list[int] = Field(default_factory=list, description="objects whose masks this run produced")
    propagated: dict[str, tuple[int, int]] = Field(default_factory=dict)
    stopped_early: dict[str, list[str]] = Field(default_factory=dict)
    recomputed: dict[str, list[int]] = Field(
        default_factory=dict, description="slices each object's run recomputed (a local correction: fewer)"
    )
    object_scores: dict[str, list[Optional[float]]] = Field(
        default_factory=dict, description="SAM2 object-score logit per slice (null where not visited)"
    )


class CacheOut(BaseModel):
    hits: int
    misses: int
    encoded: int
    not_admitted: int
    slices_cached: int
    bytes_used: int
    budget_bytes: int


class SessionOut(BaseModel):
    session_id: str
    model: str
    shape: tuple[int, int, int]
    dtype: str
    num_slices: int
    voxel_axis: int = Field(description="0 = i, 1 = j, 2 = k")
    flip_rows: bool
    flip_cols: bool
    transpose: bool
    object_ids: list[int]
    cache: CacheOut
    reserved_bytes: int
    idle_expiry_seconds: float
    run: RunOut


class SessionSummaryOut(BaseModel):
    session_id: str
    owner: str = Field(description="the user who created it")
    model: str
    shape: tuple[int, int, int]
    state: str = Field(description="its run: idle, running, done, cancelled or failed")
    idle_seconds: float
    reserved_bytes: int


class HealthOut(BaseModel):
    status: str
    version: str


class ServerInfoOut(BaseModel):
    version: str
    models: list[str]
    default_model: str
    sessions: int
    max_sessions: int
    max_upload_bytes: int
    max_voxels: int
    idle_seconds: float
    memory_budget_bytes: Optional[int]
    memory_reserved_bytes: int
    mask_encoding: str = MASK_ENCODING


class ErrorOut(BaseModel):
    detail: str = Field(description="one line naming the problem and the fix")
    error: str = Field(description="error class, e.g. InvalidPromptError, SessionNotFoundError")
