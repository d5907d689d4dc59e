"""Atomic file output: write to a temporary sibling, then rename over the destination.

A crash, a full disk or an exception half-way through a write must never leave a truncated file
where the user expects their segmentation; ``os.replace`` within one directory is atomic on POSIX
and Windows, so readers see either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from medsam2.errors import MedSAM2Error


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it to ``path``, on error delete it.

    The temporary name ends with the destination's full name so that writers choosing the format by
    extension (SimpleITK: ``.nii.gz``, ``.nrrd``) pick the same format.
    """
    final = Path(path)
    if not final.parent.is_dir():
        raise MedSAM2Error(f"output folder {final.parent} does not exist; create it first")
    tmp = final.with_name(f".tmp-{secrets.token_hex(4)}-{final.name}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path`` (creating its folder), then rename it
    over ``path``; returns ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        write(tmp)
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_atomic(path, write)
