"""CSV result tables, written whole or not at all (:mod:`medsam2.io.atomic`): a crash, a kill or a
full disk never leaves half a CSV that a resumed run would take for a finished case."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from medsam2.io.atomic import write_text_atomic

PathLike = Union[str, "os.PathLike[str]"]


def safe_name(text: str) -> str:
    """A file name for a case id or label name (spaces, slashes and the like become '_')."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    return name or "unnamed"


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
