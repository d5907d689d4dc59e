"""Writing responses: runs and sessions as JSON, engine errors as one-line statuses, the OpenAPI
security scheme."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam2.errors import InvalidPromptError, MedSAM2Error, MemoryBudgetError
from medsam2.remote.wire import VolumeTooLargeError
from medsam2.server.auth import OPEN_PATHS
from medsam2.server.live import Run
from medsam2.server.schemas import (
    CacheOut,
    RunOut,
    SessionOut,
)
from medsam2.server.sessions import (
    ManagedSession,
    RequestTooLargeError,
    ServerFullError,
    ServerOutOfMemoryError,
    SessionBusyError,
    SessionNotFoundError,
    UserLimitError,
)
from medsam2.server.settings import ServerSettings

log = logging.getLogger("medsam2.server")

# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type, int]] = [
    (SessionNotFoundError, 404),
    (SessionBusyError, 409),
    (ServerFullError, 503),
    (ServerOutOfMemoryError, 503),
    (UserLimitError, 429),
    (RequestTooLargeError, 413),
    (VolumeTooLargeError, 413),
    (MemoryBudgetError, 413),
    (MedSAM2Error, 400),
]


class ObjectNotPropagatedError(InvalidPromptError):
    """The in-process engine's InvalidPromptError for mask(obj), as a 404 here."""

    status = 404


def run_state(run: Optional[Run]) -> str:
    return "idle" if run is None else run.state


def run_out(run: Optional[Run]) -> RunOut:
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
        out.recomputed = {str(o): list(r) for o, r in result.recomputed.items()}
        out.object_scores = {
            str(o): [None if math.isnan(v) else float(v) for v in np.asarray(s, dtype=float)]
            for o, s in result.object_scores.items()
        }
    return out


def session_out(managed: ManagedSession, settings: ServerSettings) -> SessionOut:
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
        run=run_out(managed.run),
    )


def error_response(
    status: int, detail: str, error: str, headers: Optional[dict[str, str]] = None
) -> JSONResponse:
    # One line, always: entry points show the message as it is.
    detail = " ".join(str(detail).split())
    return JSONResponse(status_code=status, content={"detail": detail, "error": error}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def engine_error(_: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status", None) or next(code for cls, code in STATUS if isinstance(exc, cls))
        name = "InvalidPromptError" if isinstance(exc, ObjectNotPropagatedError) else type(exc).__name__
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return error_response(status, str(exc), name, headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = first.get("msg", "invalid value")
            detail = f"invalid request: {where}: {message}" if where else f"invalid request: {message}"
        else:
            detail = "invalid request"
        return error_response(400, detail, "BadRequestError")

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), "HTTPError", dict(exc.headers or {}))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        return error_response(500, f"internal server error: {type(exc).__name__}: {first}", "InternalError")

    app.add_exception_handler(MedSAM2Error, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def document_security(app: FastAPI) -> None:
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
