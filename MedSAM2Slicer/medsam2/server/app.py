"""The HTTP API: ``create_app(settings, predictor_factory)`` returns a FastAPI application.

Flow: POST /sessions uploads the volume once (gzip .npy, geometry in the query); prompts come back
with the prompted slice's mask; POST .../propagate starts a background run whose progress is polled
at .../propagate/status while finished slices can already be fetched one by one; the whole-volume
masks are fetched when it is done. Every route but /health needs the bearer token (auth.py).

Route handlers that touch the model or encode masks are plain ``def``: FastAPI runs them in its
thread pool, so the event loop only ever parses requests and hands bytes around. The upload is the
one ``async`` route, because it streams the body to enforce the size limit as it arrives.
"""

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional, Union

import numpy as np
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medsam2 import __version__
from medsam2.api import DIRECTIONS, PropagationResult
from medsam2.errors import (
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    MemoryBudgetError,
    PropagationCancelled,
)
from medsam2.geometry import VolumeGeometry
from medsam2.intensity import IntensityPreparation, parse_intensity
from medsam2.remote.wire import (
    ENCODING_HEADER,
    MASK_ENCODING,
    MASK_MEDIA_TYPE,
    RUN_STATE_HEADER,
    SHAPE_HEADER,
    SLICE_STATE_HEADER,
    VOLUME_MEDIA_TYPE,
    VolumeTooLargeError,
    WireFormatError,
    decode_mask_b64,
    decode_volume,
    encode_mask,
    encode_mask_b64,
    format_shape,
)
from medsam2.server.auth import OPEN_PATHS, BearerTokenMiddleware
from medsam2.server.limits import BodyLimitMiddleware
from medsam2.server.schemas import (
    BoxPrompt,
    CacheOut,
    ErrorOut,
    HealthOut,
    MaskPrompt,
    PointsPrompt,
    Prompt,
    PropagateRequest,
    RunOut,
    ServerInfoOut,
    SessionOut,
    SlicePreviewOut,
)
from medsam2.server.sessions import (
    BadRequestError,
    LiveSession,
    ManagedSession,
    PredictorFactory,
    RequestTooLargeError,
    Run,
    ServerFullError,
    SessionBusyError,
    SessionManager,
    SessionNotFoundError,
)
from medsam2.server.settings import ServerSettings

log = logging.getLogger("medsam2.server")

# Most specific first: the first matching class decides the status.
_STATUS: list[tuple[type, int]] = [
    (SessionNotFoundError, 404),
    (SessionBusyError, 409),
    (ServerFullError, 503),
    (RequestTooLargeError, 413),
    (VolumeTooLargeError, 413),
    (MemoryBudgetError, 413),
    (MedSAM2Error, 400),
]

_ERRORS: dict[Union[int, str], dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 503)
}


class ObjectNotPropagatedError(InvalidPromptError):
    """The in-process engine's InvalidPromptError for mask(obj), as a 404 here."""

    status = 404


def create_app(
    settings: ServerSettings,
    predictor_factory: PredictorFactory,
    *,
    clock: Callable[[], float] = time.monotonic,
    environ: Optional[dict[str, str]] = None,
    manager_options: Optional[dict[str, Any]] = None,
) -> FastAPI:
    """The API for these settings. Raises ServerConfigError (one line) without a usable token.
    ``manager_options`` go to the SessionManager (serve --devices: placement, device_factory)."""
    settings.validate()
    token = settings.resolve_token(environ)
    manager = SessionManager(settings, predictor_factory, clock=clock, **(manager_options or {}))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.start_reaper()
        try:
            yield
        finally:
            await run_in_threadpool(manager.shutdown)

    app = FastAPI(
        title="MedSAM2 inference server",
        version=__version__,
        description=__doc__,
        docs_url=None,  # the Swagger/ReDoc pages load scripts from a CDN: useless on an isolated network
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.settings = settings
    _install_error_handlers(app)

    # ------------------------------------------------------------------ server
    @app.get("/health", response_model=HealthOut, tags=["server"], summary="Liveness (no token needed)")
    def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__)

    @app.get("/info", response_model=ServerInfoOut, tags=["server"], summary="Models and limits")
    def info() -> ServerInfoOut:
        return ServerInfoOut(
            version=__version__,
            models=list(settings.models),
            default_model=manager.resolve_model(None),
            sessions=manager.count(),
            max_sessions=settings.max_sessions,
            max_upload_bytes=settings.max_upload_bytes,
            max_voxels=settings.max_voxels,
            idle_seconds=settings.idle_seconds,
            memory_budget_bytes=manager.budget_bytes,
            memory_reserved_bytes=manager.reserved_bytes,
        )

    # ------------------------------------------------------------------ sessions
    @app.post(
        "/sessions",
        status_code=201,
        response_model=SessionOut,
        tags=["sessions"],
        summary="Upload a volume and open a session",
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The volume as a .npy file (indexed [k, j, i]), gzip-compressed.",
                "content": {VOLUME_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def create_session(
        request: Request,
        spacing: Optional[str] = Query(None, description="sx,sy,sz in mm (ITK order)"),
        origin: Optional[str] = Query(None, description="LPS mm of voxel (0,0,0)"),
        direction: Optional[str] = Query(None, description="9 values, row-major, columns = i, j, k axes"),
        axis: str = Query("axial", description="axial, coronal, sagittal, or a voxel axis 0, 1, 2"),
        intensity: Optional[str] = Query(None, description="preset, W,L, mri, percentile:LO,HI or minmax"),
        nonzero_only: Optional[bool] = Query(None, description="percentile mode: ignore zero voxels"),
        model: Optional[str] = Query(None, description="model name (default: the server's first)"),
    ) -> Union[SessionOut, Response]:
        geometry = _parse_geometry(spacing, origin, direction)
        session_axis = _parse_axis(axis)
        prep = _parse_intensity(intensity, nonzero_only)
        manager.resolve_model(model)
        manager.check_capacity()  # refuse before reading a large body
        try:
            body = await _read_limited(request, settings.max_upload_bytes)
        except ClientDisconnect:
            log.info("client disconnected during upload")
            return Response(status_code=400)

        def build() -> ManagedSession:
            volume = decode_volume(body, settings.max_voxels)
            return manager.create(volume, geometry, session_axis, prep, model)

        managed = await run_in_threadpool(build)
        return _session_out(managed, settings)

    @app.get("/sessions/{session_id}", response_model=SessionOut, tags=["sessions"], responses=_ERRORS)
    def get_session(session_id: str) -> SessionOut:
        return _session_out(manager.get(session_id), settings)

    @app.delete("/sessions/{session_id}", status_code=204, tags=["sessions"], responses=_ERRORS)
    def close_session(session_id: str) -> Response:
        manager.close(session_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------ prompts
    @app.post(
        "/sessions/{session_id}/prompts",
        response_model=SlicePreviewOut,
        tags=["prompts"],
        summary="Points, a box or a mask on one slice; returns that slice's mask",
        responses=_ERRORS,
    )
    def add_prompt(session_id: str, prompt: Prompt) -> SlicePreviewOut:
        managed = manager.get(session_id)
        preview = managed.operate(lambda session: _apply_prompt(session, prompt))
        return SlicePreviewOut(
            object_id=preview.object_id,
            slice_index=preview.slice_index,
            shape=(int(preview.mask.shape[0]), int(preview.mask.shape[1])),
            data=encode_mask_b64(preview.mask),
        )

    @app.delete(
        "/sessions/{session_id}/objects/{object_id}", status_code=204, tags=["prompts"], responses=_ERRORS
    )
    def remove_object(session_id: str, object_id: int) -> Response:
        manager.get(session_id).operate(lambda session: session.remove_object(object_id))
        return Response(status_code=204)

    @app.delete(
        "/sessions/{session_id}/objects/{object_id}/slices/{slice_index}",
        status_code=204,
        tags=["prompts"],
        summary="Remove an object's prompts on one slice",
        responses=_ERRORS,
    )
    def clear_slice(session_id: str, object_id: int, slice_index: int) -> Response:
        manager.get(session_id).operate(lambda session: session.clear_slice(object_id, slice_index))
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/reset", status_code=204, tags=["prompts"], responses=_ERRORS)
    def reset(session_id: str) -> Response:
        manager.get(session_id).operate(lambda session: session.reset())
        return Response(status_code=204)

    # ------------------------------------------------------------------ runs
    @app.post(
        "/sessions/{session_id}/propagate",
        status_code=202,
        response_model=RunOut,
        tags=["propagation"],
        summary="Start propagating in the background; poll .../propagate/status",
        responses=_ERRORS,
    )
    def propagate(session_id: str, options: Optional[PropagateRequest] = None) -> RunOut:
        params = options or PropagateRequest()
        managed = manager.get(session_id)
        _check_propagate(managed.session, params)

        def body(session: LiveSession, run: Run) -> PropagationResult:
            def progress(done: int, total: int) -> None:
                run.done, run.total = done, total

            return session.propagate(
                params.direction,
                params.slice_range,
                params.stop_when_absent,
                object_ids=params.object_ids,
                progress=progress,
                cancel=run.cancel,
            )

        return _run_out(manager.start_run(managed, "propagate", body))

    @app.post(
        "/sessions/{session_id}/precompute",
        status_code=202,
        response_model=RunOut,
        tags=["propagation"],
        summary="Encode every slice in the background (makes the first propagation faster)",
        responses=_ERRORS,
    )
    def precompute(session_id: str) -> RunOut:
        managed = manager.get(session_id)

        def body(session: LiveSession, run: Run) -> None:
            def progress(done: int, total: int) -> None:
                run.done, run.total = done, total
                if run.cancel.is_set():
                    raise PropagationCancelled(
                        "precomputation cancelled; the slices encoded so far stay cached"
                    )

            session.precompute_features(progress)

        return _run_out(manager.start_run(managed, "precompute", body))

    @app.get(
        "/sessions/{session_id}/propagate/status",
        response_model=RunOut,
        tags=["propagation"],
        responses=_ERRORS,
    )
    def run_status(session_id: str) -> RunOut:
        return _run_out(manager.get(session_id).run)

    @app.post(
        "/sessions/{session_id}/cancel",
        status_code=202,
        response_model=RunOut,
        tags=["propagation"],
        summary="Cancel the running propagation; the previous masks stay",
        responses=_ERRORS,
    )
    def cancel(session_id: str) -> RunOut:
        return _run_out(manager.get(session_id).cancel())

    # ------------------------------------------------------------------ masks
    @app.get(
        "/sessions/{session_id}/masks/{object_id}",
        response_class=Response,
        tags=["masks"],
        summary="An object's mask: the whole volume, or one slice (also while a propagation runs)",
        responses={
            200: {
                "description": (
                    f"{MASK_ENCODING} bytes; {SHAPE_HEADER} gives the shape ([k, j, i] for the volume, the "
                    f"slice as cut from it otherwise); {SLICE_STATE_HEADER} says whether a single slice is "
                    "from the running propagation ('current') or the previous result ('previous')"
                ),
                "content": {MASK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
            **_ERRORS,
        },
    )
    def get_mask(
        session_id: str,
        object_id: int = Path(),
        slice_index: Optional[int] = Query(
            None, alias="slice", description="one slice along the session axis"
        ),
    ) -> Response:
        managed = manager.get(session_id)
        session = managed.session
        headers = {RUN_STATE_HEADER: _run_state(managed.run), ENCODING_HEADER: MASK_ENCODING}
        try:
            if slice_index is None:
                mask = session.mask(object_id)
            else:
                mask, current = session.slice_mask(object_id, slice_index)
                headers[SLICE_STATE_HEADER] = "current" if current else "previous"
        except InvalidPromptError as exc:
            if "has not been propagated" in str(exc):
                raise ObjectNotPropagatedError(str(exc)) from None
            raise
        headers[SHAPE_HEADER] = format_shape(mask.shape)
        return Response(content=encode_mask(mask), media_type=MASK_MEDIA_TYPE, headers=headers)

    _document_security(app)
    # The last added runs first: the token is checked before anything else, even the size limits.
    app.add_middleware(BodyLimitMiddleware, upload_limit=settings.max_upload_bytes)
    app.add_middleware(BearerTokenMiddleware, token=token)
    return app


# ---------------------------------------------------------------------------- helpers
async def _read_limited(request: Request, limit: int) -> bytearray:
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


def _floats(text: Optional[str], count: int, name: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidVolumeError(f"{name} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise InvalidVolumeError(f"{name} must be {count} comma-separated numbers, got {len(values)}")
    return values


def _parse_geometry(
    spacing: Optional[str], origin: Optional[str], direction: Optional[str]
) -> Optional[VolumeGeometry]:
    if spacing is None and origin is None and direction is None:
        return None  # as an in-process session without geometry (a 2D image stays 2D)
    default = VolumeGeometry()
    return VolumeGeometry(
        spacing=_floats(spacing, 3, "spacing") or default.spacing,  # type: ignore[arg-type]
        origin=_floats(origin, 3, "origin") or default.origin,  # type: ignore[arg-type]
        direction=_floats(direction, 9, "direction") or default.direction,
    )


def _parse_axis(axis: str) -> Union[int, str]:
    value = axis.strip().lower()
    if value in ("0", "1", "2"):
        return int(value)
    if value in ("axial", "coronal", "sagittal"):
        return value
    raise InvalidVolumeError(f"axis must be axial, coronal, sagittal or a voxel axis 0, 1, 2; got {axis!r}")


def _parse_intensity(text: Optional[str], nonzero_only: Optional[bool]) -> Optional[IntensityPreparation]:
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


def _apply_prompt(session: LiveSession, prompt: Union[PointsPrompt, BoxPrompt, MaskPrompt]) -> Any:
    if isinstance(prompt, PointsPrompt):
        return session.add_points(prompt.object_id, prompt.points, prompt.labels, replace=prompt.replace)
    if isinstance(prompt, BoxPrompt):
        return session.add_box(
            prompt.object_id, prompt.corners[0], prompt.corners[1], prompt.points, prompt.labels
        )
    try:
        mask = decode_mask_b64(prompt.data, prompt.shape)
    except WireFormatError as exc:
        raise InvalidPromptError(f"mask for slice {prompt.slice_index}: {exc}") from None
    return session.add_mask(prompt.object_id, prompt.slice_index, mask)


def _check_propagate(session: LiveSession, params: PropagateRequest) -> None:
    """The engine's own up-front checks, answered now as a 400 rather than later as a failed run."""
    if params.direction not in DIRECTIONS:
        raise InvalidPromptError(
            f"direction must be one of {', '.join(DIRECTIONS)}, got {params.direction!r}"
        )
    if params.stop_when_absent is not None and params.stop_when_absent < 1:
        raise InvalidPromptError(f"stop_when_absent must be at least 1 slice, got {params.stop_when_absent}")
    session._check_range(params.slice_range)
    known = session.object_ids
    if not known:
        raise InvalidPromptError("no prompts: add points, a box or a mask on a slice first")
    for o in params.object_ids or []:
        if o not in known:
            raise InvalidPromptError(f"unknown object id {o}")


def _run_state(run: Optional[Run]) -> str:
    return "idle" if run is None else run.state


def _run_out(run: Optional[Run]) -> RunOut:
    if run is None:
        return RunOut(state="idle")
    out = RunOut(
        run_id=run.run_id,
        kind=run.kind,
        state=run.state,
        done=run.done,
        total=run.total,
        error=run.error,
        error_type=run.error_type,
    )
    result = run.result if run.state == "done" else None
    if result is not None:
        out.object_ids = sorted(result.masks)
        out.propagated = {str(o): span for o, span in result.propagated.items()}
        out.stopped_early = {str(o): d for o, d in result.stopped_early.items()}
        out.object_scores = {
            str(o): [None if math.isnan(v) else float(v) for v in np.asarray(s, dtype=float)]
            for o, s in result.object_scores.items()
        }
    return out


def _session_out(managed: ManagedSession, settings: ServerSettings) -> SessionOut:
    session = managed.session
    cache = session.feature_cache
    stats = cache.stats
    return SessionOut(
        session_id=managed.id,
        model=managed.model,
        shape=session.shape,
        dtype=str(session.volume.dtype),
        num_slices=session.num_slices,
        voxel_axis=session.layout.voxel_axis,
        flip_rows=session.layout.flip_rows,
        flip_cols=session.layout.flip_cols,
        transpose=session.layout.transpose,
        object_ids=sorted(session.object_ids),
        cache=CacheOut(
            hits=stats.hits,
            misses=stats.misses,
            encoded=stats.encoded,
            not_admitted=stats.not_admitted,
            slices_cached=len(cache),
            bytes_used=cache.bytes_used,
            budget_bytes=cache.budget_bytes,
        ),
        reserved_bytes=managed.reserved_bytes,
        idle_expiry_seconds=settings.idle_seconds,
        run=_run_out(managed.run),
    )


def _error_response(
    status: int, detail: str, error: str, headers: Optional[dict[str, str]] = None
) -> JSONResponse:
    # One line, always: entry points show the message as it is.
    detail = " ".join(str(detail).split())
    return JSONResponse(status_code=status, content={"detail": detail, "error": error}, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def engine_error(_: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status", None) or next(code for cls, code in _STATUS if isinstance(exc, cls))
        name = "InvalidPromptError" if isinstance(exc, ObjectNotPropagatedError) else type(exc).__name__
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServerFullError) else None
        return _error_response(status, str(exc), name, headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = first.get("msg", "invalid value")
            detail = f"invalid request: {where}: {message}" if where else f"invalid request: {message}"
        else:
            detail = "invalid request"
        return _error_response(400, detail, "BadRequestError")

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _error_response(exc.status_code, str(exc.detail), "HTTPError", dict(exc.headers or {}))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        return _error_response(500, f"internal server error: {type(exc).__name__}: {first}", "InternalError")

    app.add_exception_handler(MedSAM2Error, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _document_security(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI schema (the middleware enforces it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "the server's API token (--token-file or $MEDSAM2_SERVER_TOKEN)",
        }
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}]
                operation.setdefault("responses", {}).setdefault(
                    "401", {"description": "missing or invalid token", "content": {"application/json": {}}}
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
