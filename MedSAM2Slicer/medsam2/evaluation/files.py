"""Result files written whole or not at all: a crash, a kill or a full disk never leaves half a CSV
that a resumed run would take for a finished case."""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def safe_name(text: str) -> str:
    """A file name for a case id or label name (spaces, slashes and the like become '_')."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    return name or "unnamed"


def write_atomic(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path`` (same suffixes, so writers that pick the
    format from the extension still work), then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_text_atomic(path: PathLike, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_atomic(path, write)


def csv_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    # str(float) is the shortest repr that reads back to the same float: metrics survive exactly.
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def write_csv_atomic(path: PathLike, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    return write_text_atomic(path, csv_text(rows, fields))


def read_csv(path: PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
