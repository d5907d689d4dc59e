"""Give freed host (CPU) memory back to the operating system after a block of model work.

Why: glibc keeps freed blocks in the malloc arena of the thread that used them, and raises its mmap
threshold as large blocks are freed, so the short-lived tensors of the image encoder and memory
attention (on the CPU, ~100-200 MB per slice for SAM 2.1 tiny at 512 px) stay resident after the
work that needed them. Each thread that runs the model keeps its own arena's worth: a session that
encodes in the background (one thread) and propagates (another) holds that transient memory twice,
which is most of what separates its peak from Meta's single-threaded predictor. ``malloc_trim(0)``
returns the free pages of every arena. It runs once per propagation or background run, never per
slice. Where the C library is not glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Callable, Optional

log = logging.getLogger("medsam2")


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _find_malloc_trim()


def release_free_host_memory() -> bool:
    """Return freed heap pages to the OS; True if the C library could (glibc), else False."""
    if _MALLOC_TRIM is None:
        return False
    try:
        _MALLOC_TRIM(0)
    except OSError as exc:  # never worth failing a segmentation over
        log.debug("malloc_trim failed: %s", exc)
        return False
    return True
