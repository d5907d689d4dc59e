"""A segmentation session on a remote inference server (``medsam2 serve``), with the interface of
:class:`medsam2.session.SegmentationSession`, so the Slicer module's "remote" mode and scripts use
either one the same way::

    session = RemoteSession("https://gpu-server:8765", token, volume, geometry, axis="axial",
                            intensity="abdomen", ca_file="server.crt")
    session.add_points(1, [[120, 200, 40]], [1])
    result = session.propagate(progress=print, cancel=stop_event)
    session.close()

The volume is uploaded once (gzip .npy); prompts return the prompted slice's mask; propagation runs
on the server while this client polls its progress (and cancels it when ``cancel`` fires);
whole-volume masks come back packed and compressed. Only the standard library's urllib is used, so
this runs inside Slicer's Python with nothing to install.

Errors are one line, as everywhere in the engine: the engine's own classes for bad input
(InvalidPromptError, InvalidVolumeError, ...), and RemoteError subclasses for the connection:
ServerUnavailableError (refused, unreachable, TLS), AuthenticationError (token), ServerBusyError (503,
with ``retry_after``), SessionExpiredError (idle expiry or a server restart), SessionBusyError (a
propagation is already running on it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np

from medsam2.api import (
    CancelCheck,
    CornerIJK,
    PointLabels,
    PointsIJK,
    ProgressCallback,
    PropagationResult,
    SlicePreview,
    cancel_check,
)
from medsam2.errors import (
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    PropagationCancelled,
    one_line,
)
from medsam2.features import CacheStats
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import IntensityPreparation, parse_intensity
from medsam2.remote.connection import (
    ENGINE_ERRORS,
    RemoteError,
    ServerConnection,
    SessionExpiredError,
)
from medsam2.remote.wire import (
    MAX_OBJECT_ID,
    SHAPE_HEADER,
    SLICE_STATE_HEADER,
    VOLUME_MEDIA_TYPE,
    decode_mask,
    decode_mask_b64,
    encode_mask_b64,
    encode_volume,
    parse_shape,
)


def _intensity_query(intensity: Union[IntensityPreparation, str, None]) -> dict[str, str]:
    """The preparation in parse_intensity's syntax; repr() keeps every float exact."""
    if intensity is None:
        return {}
    prep = parse_intensity(intensity) if isinstance(intensity, str) else intensity
    if prep.mode == "window":
        return {"intensity": f"{prep.width!r},{prep.level!r}"}
    if prep.mode == "percentile":
        return {
            "intensity": f"percentile:{prep.lower_percentile!r},{prep.upper_percentile!r}",
            "nonzero_only": "true" if prep.nonzero_only else "false",
        }
    return {"intensity": "minmax"}


def _geometry_query(geometry: Optional[VolumeGeometry]) -> dict[str, str]:
    if geometry is None:
        return {}
    return {
        "spacing": ",".join(repr(v) for v in geometry.spacing),
        "origin": ",".join(repr(v) for v in geometry.origin),
        "direction": ",".join(repr(v) for v in geometry.direction),
    }


def _points(points_ijk: Any, what: str) -> list[list[float]]:
    """The engine's first checks on coordinates, done here: JSON cannot carry NaN."""
    pts = np.asarray(points_ijk, dtype=float)
    if pts.ndim == 1:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise InvalidPromptError(f"{what} must be a non-empty list of (i, j, k) voxel coordinates")
    if not np.all(np.isfinite(pts)):
        raise InvalidPromptError(f"{what} has a non-finite coordinate")
    return pts.tolist()


def _object_id(object_id: Any) -> int:
    if not isinstance(object_id, (int, np.integer)) or isinstance(object_id, bool):
        raise InvalidPromptError(f"object id must be an integer, got {object_id!r}")
    if not 0 <= int(object_id) <= MAX_OBJECT_ID:  # the server's bound, said before sending
        raise InvalidPromptError(f"object id must be between 0 and {MAX_OBJECT_ID}, got {object_id}")
    return int(object_id)


class RemoteSession:
    """One volume on a remote server; the methods and errors of SegmentationSession."""

    def __init__(
        self,
        url: str,
        token: str,
        volume: np.ndarray,
        geometry: Optional[VolumeGeometry] = None,
        *,
        axis: Union[int, str] = "axial",
        intensity: Union[IntensityPreparation, str, None] = None,
        model: Optional[str] = None,
        timeout: float = 120.0,
        ca_file: Optional[str] = None,
        verify_tls: bool = True,
        poll_interval: float = 0.2,
    ) -> None:
        self.connection = ServerConnection(
            url, token, timeout=timeout, ca_file=ca_file, verify_tls=verify_tls
        )
        self.poll_interval = float(poll_interval)
        self.volume = np.asarray(volume)
        self.geometry = geometry or VolumeGeometry()
        query = {"axis": str(axis), **_geometry_query(geometry), **_intensity_query(intensity)}
        if model:
            query["model"] = model
        limits = self.connection.info()
        voxels = int(self.volume.size)
        if voxels > int(limits["max_voxels"]):
            raise InvalidVolumeError(
                f"volume {self.volume.shape} has {voxels:,} voxels, over the server's limit of "
                f"{int(limits['max_voxels']):,}; crop or downsample it"
            )
        try:
            payload = encode_volume(self.volume)
        except MedSAM2Error as exc:
            raise InvalidVolumeError(str(exc)) from None
        if len(payload) > int(limits["max_upload_bytes"]):
            raise InvalidVolumeError(
                f"the compressed volume is {len(payload):,} bytes, over the server's upload limit of "
                f"{int(limits['max_upload_bytes']):,}; crop or downsample it"
            )
        info = self.connection.json(
            "POST",
            "/sessions",
            query=query,
            data=payload,
            content_type=VOLUME_MEDIA_TYPE,
            bad_request=InvalidVolumeError,
        )
        self.session_id: str = info["session_id"]
        self.model: str = info["model"]
        self.shape: tuple[int, int, int] = tuple(info["shape"])
        self.num_slices: int = int(info["num_slices"])
        self.layout = SliceLayout(
            int(info["voxel_axis"]),
            flip_rows=bool(info["flip_rows"]),
            flip_cols=bool(info["flip_cols"]),
            transpose=bool(info["transpose"]),
        )
        self.frame_shape = self.layout.frame_shape(self.shape)
        self._masks: dict[int, np.ndarray] = {}
        self._closed = False

    @property
    def url(self) -> str:
        return self.connection.url

    def __repr__(self) -> str:
        return f"RemoteSession({self.url}, session {self.session_id}, shape {self.shape})"

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except RemoteError:
            if exc_type is None:
                raise  # else the error that ended the block is the one to report

    # ------------------------------------------------------------------ plumbing
    def _path(self, suffix: str = "") -> str:
        return f"/sessions/{self.session_id}{suffix}"

    def _json(self, method: str, suffix: str, **kwargs: Any) -> Any:
        if self._closed:
            raise SessionExpiredError(f"session {self.session_id} was closed by this client")
        return self.connection.json(method, self._path(suffix), **kwargs)

    def info(self) -> dict[str, Any]:
        return self._json("GET", "")

    @property
    def object_ids(self) -> list[int]:
        return list(self.info()["object_ids"])

    @property
    def cache_stats(self) -> CacheStats:
        c = self.info()["cache"]
        return CacheStats(
            hits=c["hits"], misses=c["misses"], encoded=c["encoded"], not_admitted=c["not_admitted"]
        )

    # ------------------------------------------------------------------ prompts
    def _prompt(self, body: dict[str, Any]) -> SlicePreview:
        out = self._json("POST", "/prompts", json_body=body, bad_request=InvalidPromptError)
        mask = decode_mask_b64(out["data"], out["shape"])
        return SlicePreview(int(out["object_id"]), int(out["slice_index"]), mask)

    def add_points(
        self,
        object_id: int,
        points_ijk: PointsIJK,
        labels: PointLabels,
        *,
        replace: bool = False,
    ) -> SlicePreview:
        return self._prompt(
            {
                "type": "points",
                "object_id": _object_id(object_id),
                "points": _points(points_ijk, "points"),
                "labels": [int(v) for v in np.asarray(labels).reshape(-1)],
                "replace": bool(replace),
            }
        )

    def add_box(
        self,
        object_id: int,
        corner_a_ijk: CornerIJK,
        corner_b_ijk: CornerIJK,
        points_ijk: Optional[PointsIJK] = None,
        labels: Optional[PointLabels] = None,
    ) -> SlicePreview:
        corners = _points([list(np.ravel(corner_a_ijk)), list(np.ravel(corner_b_ijk))], "box corners")
        body: dict[str, Any] = {"type": "box", "object_id": _object_id(object_id), "corners": corners}
        if points_ijk is not None:
            body["points"] = _points(points_ijk, "points")
        if labels is not None:
            body["labels"] = [int(v) for v in np.asarray(labels).reshape(-1)]
        return self._prompt(body)

    def add_mask(self, object_id: int, slice_index: int, mask: np.ndarray) -> SlicePreview:
        mask = np.asarray(mask)
        if mask.shape != self.frame_shape:
            raise InvalidPromptError(
                f"mask for slice {slice_index} has shape {mask.shape}, expected {self.frame_shape}"
            )
        return self._prompt(
            {
                "type": "mask",
                "object_id": _object_id(object_id),
                "slice_index": int(slice_index),
                "shape": list(mask.shape),
                "data": encode_mask_b64(mask != 0),
            }
        )

    def add_mask_volume(self, object_id: int, mask: np.ndarray) -> list[int]:
        """Every slice with labelled voxels becomes a mask prompt (one request per slice)."""
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise InvalidPromptError(f"mask volume has shape {mask.shape}, expected {self.shape}")
        axis = self.layout.array_axis
        slices = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(slices) == 0:
            raise InvalidPromptError(f"mask volume for object {object_id} is empty")
        for s in slices:
            self.add_mask(object_id, int(s), np.take(mask, int(s), axis=axis))
        return [int(s) for s in slices]

    def clear_slice(self, object_id: int, slice_index: int) -> None:
        self._json(
            "DELETE",
            f"/objects/{_object_id(object_id)}/slices/{int(slice_index)}",
            bad_request=InvalidPromptError,
        )

    def remove_object(self, object_id: int) -> None:
        self._json("DELETE", f"/objects/{_object_id(object_id)}", bad_request=InvalidPromptError)
        self._masks.pop(int(object_id), None)

    def reset(self) -> None:
        self._json("POST", "/reset")
        self._masks.clear()

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        direction: str = "both",
        slice_range: Optional[tuple[int, int]] = None,
        stop_when_absent: Optional[int] = None,
        *,
        object_ids: Optional[Sequence[int]] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCheck] = None,
        probabilities: bool = False,
        mode: Optional[str] = None,
    ) -> PropagationResult:
        """As SegmentationSession.propagate; the run happens on the server while this polls it.
        Raises PropagationCancelled (the previous masks stay) when ``cancel`` fires."""
        if probabilities:
            raise InvalidPromptError(
                "probabilities are not sent by the server (binary masks only); "
                "use an in-process session for them"
            )
        if slice_range is not None:
            try:
                slice_range = (int(slice_range[0]), int(slice_range[1]))
            except (TypeError, ValueError, IndexError):
                raise InvalidPromptError(
                    f"slice range must be two slice indices, got {slice_range!r}"
                ) from None
        body = {
            "direction": direction,
            "slice_range": list(slice_range) if slice_range is not None else None,
            "stop_when_absent": stop_when_absent,
            "object_ids": [int(o) for o in object_ids] if object_ids is not None else None,
            "mode": mode,
        }
        cancelled = cancel_check(cancel)
        if cancelled():  # as in process: checked before the first slice
            raise PropagationCancelled("propagation cancelled; the previous result is unchanged")
        run = self._json("POST", "/propagate", json_body=body, bad_request=InvalidPromptError)
        run = self._wait(run, progress, cancelled)
        if run["state"] == "cancelled":
            raise PropagationCancelled("propagation cancelled; the previous result is unchanged")
        if run["state"] == "failed":
            raise ENGINE_ERRORS.get(run.get("error_type") or "", RemoteError)(
                one_line(run.get("error") or "failed")
            )
        masks = {int(o): self._fetch_mask(int(o)) for o in run["object_ids"]}
        self._masks.update(masks)
        scores = {
            int(o): np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            for o, values in run["object_scores"].items()
        }
        return PropagationResult(
            masks=masks,
            probabilities=None,
            propagated={int(o): (int(span[0]), int(span[1])) for o, span in run["propagated"].items()},
            object_scores=scores,
            stopped_early={int(o): list(d) for o, d in run["stopped_early"].items()},
            recomputed={int(o): [int(f) for f in r] for o, r in run.get("recomputed", {}).items()},
        )

    def precompute_features(
        self, progress: Optional[ProgressCallback] = None, from_slice: Optional[int] = None
    ) -> None:
        """Encode every slice on the server now (e.g. while the user looks for the first click),
        outward from ``from_slice`` when given."""
        query = {"from_slice": str(int(from_slice))} if from_slice is not None else None
        started = self._json("POST", "/precompute", query=query, bad_request=InvalidPromptError)
        run = self._wait(started, progress, lambda: False)
        if run["state"] != "done":
            raise ENGINE_ERRORS.get(run.get("error_type") or "", RemoteError)(
                one_line(run.get("error") or "failed")
            )

    def _wait(
        self, run: dict[str, Any], progress: Optional[ProgressCallback], cancelled: Callable[[], bool]
    ) -> Any:
        last: Optional[tuple[int, int]] = None
        cancel_sent = False

        def report(r: dict[str, Any]) -> None:
            nonlocal last
            if progress is not None and r["total"] and (r["done"], r["total"]) != last:
                last = (r["done"], r["total"])
                progress(r["done"], r["total"])

        try:
            while run["state"] == "running":
                report(run)
                if not cancel_sent and cancelled():
                    cancel_sent = True
                    run = self._json("POST", "/cancel")
                    continue
                time.sleep(self.poll_interval)
                run = self._json("GET", "/propagate/status")
            if run["state"] == "done":
                report(run)
        except BaseException:
            # Interrupted here (Ctrl+C, a callback raising, the network gone): do not leave the run going.
            if not cancel_sent:
                try:
                    self.connection.request("POST", self._path("/cancel"), timeout=5)
                except MedSAM2Error:
                    pass
            raise
        return run

    # ------------------------------------------------------------------ masks
    def _get_mask(self, object_id: int, query: Optional[dict[str, str]]) -> tuple[np.ndarray, Any]:
        if self._closed:
            raise SessionExpiredError(f"session {self.session_id} was closed by this client")
        body, headers = self.connection.request(
            "GET", self._path(f"/masks/{int(object_id)}"), query=query, bad_request=InvalidPromptError
        )
        return decode_mask(body, parse_shape(headers[SHAPE_HEADER])), headers

    def _fetch_mask(self, object_id: int) -> np.ndarray:
        return self._get_mask(object_id, None)[0]

    def mask(self, object_id: int) -> np.ndarray:
        cached = self._masks.get(int(object_id))
        if cached is None:
            cached = self._masks[int(object_id)] = self._fetch_mask(int(object_id))
        return cached

    def slice_mask(self, object_id: int, slice_index: int) -> tuple[np.ndarray, bool]:
        """One slice (as cut from the [k, j, i] array), also while a propagation runs; the flag says
        whether the running propagation has already produced it (False: the previous result)."""
        mask, headers = self._get_mask(object_id, {"slice": str(int(slice_index))})
        return mask, headers.get(SLICE_STATE_HEADER) == "current"

    def close(self) -> None:
        """Free the session on the server (its memory and slot); closing twice is harmless."""
        if self._closed:
            return
        try:
            self.connection.request("DELETE", self._path())
        except SessionExpiredError:
            pass
        self._closed = True


if TYPE_CHECKING:
    from medsam2.api import Session

    def _conforms(session: RemoteSession) -> Session:
        return session  # mypy: RemoteSession implements the Session protocol
