"""Errors as the panel shows them: one line."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def describeError(exc: BaseException) -> str:
    """Engine and installation errors are one line written for users; anything else is a bug, so it
    keeps its type and the traceback goes to the log."""
    from .dependencies import DependencyError

    try:
        from medsam2.errors import MedSAM2Error
    except ImportError:  # engine not importable yet: nothing can be one of its errors
        MedSAM2Error = DependencyError  # type: ignore[misc,assignment]
    if isinstance(exc, (MedSAM2Error, DependencyError)):
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    logger.error("MedSAM2 error", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"
