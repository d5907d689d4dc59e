"""All-or-nothing prompt operations on a server session.

An engine session records a prompt, then runs the model on it (SAM2 writes its inputs and outputs
into the inference state as it goes). A failure in between (out of memory in the preview, a
cancelled request, a bug) would leave a prompt recorded that the model never saw, or an object
registered without prompts: the next propagation would then differ from what the user asked for.
In process the caller sees the exception and can reset; a server client cannot see the state, so
the server restores it.

The snapshot copies the containers (the dicts and lists of the prompt records and of SAM2's
per-object state), not the tensors in them: SAM2 replaces entries rather than writing into their
tensors, so a structural copy is a faithful snapshot at the cost of a few dict copies per request.
Slice features encoded meanwhile stay in the feature cache, which is a cache (a later request would
encode the same features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# SAM2 inference-state entries a prompt operation may change (sam2_video_predictor.py), with the
# depth of nested containers under each: obj_idx -> {frame -> out}, or obj_idx -> {kind -> {frame -> out}}.
_STATE_DEPTHS = {
    "point_inputs_per_obj": 2,
    "mask_inputs_per_obj": 2,
    "output_dict_per_obj": 3,
    "temp_output_dict_per_obj": 3,
    "frames_tracked_per_obj": 2,
    "obj_id_to_idx": 1,
    "obj_idx_to_id": 1,
    "obj_ids": 1,
}
_ABSENT = object()


def structural_copy(value: Any, depth: int) -> Any:
    """Copies of the dicts and lists ``depth`` levels down; the leaves are shared."""
    if depth <= 0:
        return value
    if isinstance(value, dict):
        copied = value.copy()  # keeps the type (OrderedDict)
        for key, item in value.items():
            copied[key] = structural_copy(item, depth - 1)
        return copied
    if isinstance(value, list):
        return [structural_copy(item, depth - 1) for item in value]
    return value


def snapshot(session: Any) -> dict[str, Any]:
    state = session._state
    return {
        "state": {key: structural_copy(state.get(key, _ABSENT), depth) for key, depth in _STATE_DEPTHS.items()},
        "tracking_has_started": state.get("tracking_has_started", _ABSENT),
        "prompts": structural_copy(session._prompts, 2),
        "masks": dict(session._masks),
        "probabilities": dict(session._probabilities),
    }


def restore(session: Any, saved: dict[str, Any]) -> None:
    state = session._state
    for key, value in {**saved["state"], "tracking_has_started": saved["tracking_has_started"]}.items():
        if value is _ABSENT:
            state.pop(key, None)
        else:
            state[key] = value
    session._prompts = saved["prompts"]
    session._masks = saved["masks"]
    session._probabilities = saved["probabilities"]


@contextlib.contextmanager
def all_or_nothing(session: Any) -> Iterator[None]:
    """Run the block; if it raises, put the session back as it was before and re-raise."""
    saved = snapshot(session)
    try:
        yield
    except BaseException:
        restore(session, saved)
        raise
