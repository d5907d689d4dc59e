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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional, Union

from fastapi import FastAPI, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from medsam2 import __version__
from medsam2.api import PropagationResult
from medsam2.errors import (
    InvalidPromptError,
    PropagationCancelled,
)
from medsam2.remote.wire import (
    ENCODING_HEADER,
    MASK_ENCODING,
    MASK_MEDIA_TYPE,
    MAX_OBJECT_ID,
    MAX_SLICE_INDEX,
    RUN_STATE_HEADER,
    SHAPE_HEADER,
    SLICE_STATE_HEADER,
    VOLUME_MEDIA_TYPE,
    decode_volume,
    encode_mask,
    encode_mask_b64,
    format_shape,
)
from medsam2.server.access_log import AccessLogMiddleware
from medsam2.server.auth import BearerTokenMiddleware, request_user
from medsam2.server.limits import BodyLimitMiddleware, FramingMiddleware
from medsam2.server.live import LiveSession, Run
from medsam2.server.requests import (
    apply_prompt,
    check_propagate,
    check_slice,
    intensity_from_query,
    parse_axis,
    parse_geometry,
    read_limited,
)
from medsam2.server.responses import (
    ObjectNotPropagatedError,
    document_security,
    install_error_handlers,
    run_out,
    run_state,
    session_out,
)
from medsam2.server.schemas import (
    ErrorOut,
    HealthOut,
    Prompt,
    PropagateRequest,
    RunOut,
    ServerInfoOut,
    SessionOut,
    SessionSummaryOut,
    SlicePreviewOut,
)
from medsam2.server.sessions import (
    ManagedSession,
    PredictorFactory,
    SessionManager,
)
from medsam2.server.settings import ServerSettings
from medsam2.server.users import User

log = logging.getLogger("medsam2.server")

_ERRORS: dict[Union[int, str], dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 429, 503)
}


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
    users = settings.resolve_users(environ)
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
    install_error_handlers(app)

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
        geometry = parse_geometry(spacing, origin, direction)
        session_axis = parse_axis(axis)
        prep = intensity_from_query(intensity, nonzero_only)
        manager.resolve_model(model)
        user = _user(request)
        manager.check_capacity(user)  # refuse before reading a large body
        try:
            body = await read_limited(request, settings.max_upload_bytes)
        except ClientDisconnect:
            log.info("client disconnected during upload")
            return Response(status_code=400)

        def build() -> ManagedSession:
            volume = decode_volume(body, settings.max_voxels)
            return manager.create(volume, geometry, session_axis, prep, model, user)

        managed = await run_in_threadpool(build)
        return session_out(managed, settings)

    @app.get(
        "/sessions",
        response_model=list[SessionSummaryOut],
        tags=["sessions"],
        summary="Your open sessions (an admin sees everyone's)",
        responses=_ERRORS,
    )
    def list_sessions(request: Request) -> list[SessionSummaryOut]:
        now = manager.clock()
        return [
            SessionSummaryOut(
                session_id=m.id,
                owner=m.owner,
                model=m.model,
                shape=m.session.shape,
                state=run_state(m.run),
                idle_seconds=max(0.0, now - m.last_used),
                reserved_bytes=m.reserved_bytes,
            )
            for m in manager.sessions_of(_user(request))
        ]

    @app.get("/sessions/{session_id}", response_model=SessionOut, tags=["sessions"], responses=_ERRORS)
    def get_session(session_id: str, request: Request) -> SessionOut:
        return session_out(manager.get(session_id, _user(request)), settings)

    @app.delete(
        "/sessions/{session_id}",
        status_code=204,
        tags=["sessions"],
        summary="End a session (yours; an admin may end anyone's)",
        responses=_ERRORS,
    )
    def close_session(session_id: str, request: Request) -> Response:
        manager.close(session_id, _user(request))
        return Response(status_code=204)

    # ------------------------------------------------------------------ prompts
    @app.post(
        "/sessions/{session_id}/prompts",
        response_model=SlicePreviewOut,
        tags=["prompts"],
        summary="Points, a box or a mask on one slice; returns that slice's mask",
        responses=_ERRORS,
    )
    def add_prompt(session_id: str, prompt: Prompt, request: Request) -> SlicePreviewOut:
        managed = manager.get(session_id, _user(request))
        preview = managed.operate(lambda session: apply_prompt(session, prompt))
        return SlicePreviewOut(
            object_id=preview.object_id,
            slice_index=preview.slice_index,
            shape=(int(preview.mask.shape[0]), int(preview.mask.shape[1])),
            data=encode_mask_b64(preview.mask),
        )

    @app.delete(
        "/sessions/{session_id}/objects/{object_id}", status_code=204, tags=["prompts"], responses=_ERRORS
    )
    def remove_object(session_id: str, request: Request, object_id: int = _object_id_path()) -> Response:
        manager.get(session_id, _user(request)).operate(lambda session: session.remove_object(object_id))
        return Response(status_code=204)

    @app.delete(
        "/sessions/{session_id}/objects/{object_id}/slices/{slice_index}",
        status_code=204,
        tags=["prompts"],
        summary="Remove an object's prompts on one slice",
        responses=_ERRORS,
    )
    def clear_slice(
        session_id: str, request: Request, object_id: int = _object_id_path(), slice_index: int = _slice_index_path()
    ) -> Response:
        def clear(session: LiveSession) -> None:
            check_slice(session, slice_index)
            session.clear_slice(object_id, slice_index)

        manager.get(session_id, _user(request)).operate(clear)
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/reset", status_code=204, tags=["prompts"], responses=_ERRORS)
    def reset(session_id: str, request: Request) -> Response:
        manager.get(session_id, _user(request)).operate(lambda session: session.reset())
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
    def propagate(session_id: str, request: Request, options: Optional[PropagateRequest] = None) -> RunOut:
        params = options or PropagateRequest()
        managed = manager.get(session_id, _user(request))
        check_propagate(managed.session, params)

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
                mode=params.mode,
            )

        return run_out(manager.start_run(managed, "propagate", body))

    @app.post(
        "/sessions/{session_id}/precompute",
        status_code=202,
        response_model=RunOut,
        tags=["propagation"],
        summary="Encode every slice in the background (makes the first propagation faster)",
        responses=_ERRORS,
    )
    def precompute(
        session_id: str,
        request: Request,
        from_slice: Optional[int] = Query(
            None, ge=0, le=MAX_SLICE_INDEX, description="encode outward from this slice (default: in order)"
        ),
    ) -> RunOut:
        managed = manager.get(session_id, _user(request))
        if from_slice is not None:
            check_slice(managed.session, from_slice)

        def body(session: LiveSession, run: Run) -> None:
            def progress(done: int, total: int) -> None:
                run.done, run.total = done, total
                if run.cancel.is_set():
                    raise PropagationCancelled(
                        "precomputation cancelled; the slices encoded so far stay cached"
                    )

            session.precompute_features(progress, from_slice)

        return run_out(manager.start_run(managed, "precompute", body))

    @app.get(
        "/sessions/{session_id}/propagate/status",
        response_model=RunOut,
        tags=["propagation"],
        responses=_ERRORS,
    )
    def run_status(session_id: str, request: Request) -> RunOut:
        return run_out(manager.get(session_id, _user(request)).run)

    @app.post(
        "/sessions/{session_id}/cancel",
        status_code=202,
        response_model=RunOut,
        tags=["propagation"],
        summary="Cancel the running propagation; the previous masks stay",
        responses=_ERRORS,
    )
    def cancel(session_id: str, request: Request) -> RunOut:
        return run_out(manager.get(session_id, _user(request)).cancel())

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
        request: Request,
        object_id: int = _object_id_path(),
        slice_index: Optional[int] = Query(
            None, alias="slice", ge=0, le=MAX_SLICE_INDEX, description="one slice along the session axis"
        ),
    ) -> Response:
        managed = manager.get(session_id, _user(request))
        session = managed.session
        headers = {RUN_STATE_HEADER: run_state(managed.run), ENCODING_HEADER: MASK_ENCODING}
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

    document_security(app)
    # The last added runs first: the access log sees every answer; ambiguous framing is refused for
    # anyone; then the token is checked before anything else, even the size limits.
    app.add_middleware(BodyLimitMiddleware, upload_limit=settings.max_upload_bytes)
    app.add_middleware(BearerTokenMiddleware, users=users)
    app.add_middleware(FramingMiddleware)  # ambiguous framing is refused (and the connection closed) for anyone
    app.add_middleware(AccessLogMiddleware)  # outermost: it sees every answer, the 401s too
    return app


# ---------------------------------------------------------------------------- helpers
def _object_id_path() -> Any:
    return Path(ge=0, le=MAX_OBJECT_ID, description=f"0..{MAX_OBJECT_ID}")


def _slice_index_path() -> Any:
    return Path(ge=0, le=MAX_SLICE_INDEX, description="slice along the session axis")


def _user(request: Request) -> User:
    user = request_user(request.scope)
    assert user is not None, "BearerTokenMiddleware lets no request through without a user"
    return user
