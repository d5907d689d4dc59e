"""Refusing a NIfTI file that ends early, before it is read.

ITK's NIfTI reader (SimpleITK, and so Slicer) reads a truncated ``.nii`` or ``.nii.gz`` without an
error: the missing voxels come back as whatever the buffer held, and a half-copied scan would be
segmented as if it were whole. (Its NRRD and MetaImage readers do refuse short files.) Here the header
says how many bytes the voxels take, and the file, decompressed as a stream for ``.gz``, must hold them;
a gzip stream must also end with its end marker and a matching checksum.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Optional

from medsam2.errors import InvalidVolumeError

_CHUNK = 1 << 20
_NIFTI1_HEADER, _NIFTI2_HEADER = 348, 540


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Bytes a NIfTI-1/-2 file needs (voxel offset + voxels), from its header; None if not NIfTI."""
    for order in ("<", ">"):
        if len(header) >= _NIFTI1_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI1_HEADER:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset, size = int(struct.unpack(order + "f", header[108:112])[0]), _NIFTI1_HEADER
            break
        if len(header) >= _NIFTI2_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI2_HEADER:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset, size = struct.unpack(order + "q", header[168:176])[0], _NIFTI2_HEADER
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : rank + 1]):
        return None  # a header the reader itself will refuse, with its own message
    voxels = 1
    for d in dims[1 : rank + 1]:
        voxels *= int(d)
    return (offset if offset > 0 else size) + voxels * bitpix // 8


def _gzip_length(handle: BinaryIO, path: Path) -> tuple[bytes, int]:
    """(first bytes, total decompressed length) of a gzip file; refuses a stream that ends early."""
    head = b""
    total = 0
    try:
        with gzip.GzipFile(fileobj=handle) as stream:
            while chunk := stream.read(_CHUNK):
                if len(head) < _NIFTI2_HEADER:
                    head += chunk[: _NIFTI2_HEADER - len(head)]
                total += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InvalidVolumeError(f"cannot read volume {path}: truncated or corrupt ({exc}); copy it again") from None
    return head, total


def check_nifti_complete(path: Path) -> None:
    """Raise InvalidVolumeError when ``path`` (``.nii`` or ``.nii.gz``) holds fewer bytes than its header
    promises; other files pass unchecked."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    with open(path, "rb") as handle:
        if name.endswith(".gz"):
            head, size = _gzip_length(handle, path)
        else:
            head = handle.read(_NIFTI2_HEADER)
            size = path.stat().st_size
    needed = _nifti_data_end(head)
    if needed is not None and size < needed:
        raise InvalidVolumeError(
            f"cannot read volume {path}: truncated, its header calls for {needed:,} bytes, the file holds "
            f"{size:,}; copy it again"
        )
