"""Byte formats shared by the server and :mod:`medsam2.remote` (numpy and the standard library only,
so the client side runs in Slicer's Python without FastAPI).

Volume upload: a ``.npy`` file (numpy's own self-describing format: dtype, byte order, shape), gzip
compressed. numpy reads it with ``allow_pickle`` off, so an upload can never carry code. The server
reads the 100-odd byte header first and checks the voxel count *before* inflating the rest: a small
gzip bomb is refused without allocating anything.

Masks: the uint8 0/1 mask flattened in C order, ``np.packbits`` (8 voxels a byte), gzip compressed.
A 512x512x300 mask is 9.8 MB packed and typically 50-200 kB compressed, so whole-volume masks are
cheap to fetch after every propagation.
"""

from __future__ import annotations

import base64
import gzip
import io
import math
import zlib
from typing import Optional, Sequence, Union

import numpy as np

from medsam2.errors import MedSAM2Error

MASK_ENCODING = "gzip+packbits"
VOLUME_MEDIA_TYPE = "application/x-npy"  # gzip-compressed (or plain) .npy
MASK_MEDIA_TYPE = "application/octet-stream"
SHAPE_HEADER = "X-MedSAM2-Shape"
ENCODING_HEADER = "X-MedSAM2-Encoding"
RUN_STATE_HEADER = "X-MedSAM2-Run-State"  # idle, running, done, cancelled, failed
SLICE_STATE_HEADER = "X-MedSAM2-Slice-State"  # current (this run) or previous (the last result)
_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"
_HEADER_PEEK = 1 << 16  # enough for any .npy header numpy writes (it caps them at 10 kB by default)
# Bounds on every integer a client sends (schemas.py and the routes enforce them; the client checks
# object ids before sending). Object ids fit the uint16 labelmaps every writer produces; slice indices
# and sides are far above any real volume and far below anything that overflows a C integer.
MAX_OBJECT_ID = 65535
MAX_SLICE_INDEX = (1 << 20) - 1
MAX_SIDE = 1 << 16
MAX_POINTS = 4096  # clicks in one prompt
MAX_MASK_VOXELS = 1 << 31  # a decoded mask is never allocated larger than this (2 GiB of uint8)
# What the engine takes (volume.py moves each to a torch dtype that holds it exactly): numpy kind and
# item sizes. uint64 has no exact torch dtype, float128 and complex none at all.
ENGINE_DTYPES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4), "f": (2, 4, 8)}


class WireFormatError(MedSAM2Error, ValueError):
    """A request or response body is not in the documented format."""


class VolumeTooLargeError(MedSAM2Error, ValueError):
    """An uploaded volume has more voxels than the server accepts."""


def encode_mask(mask: np.ndarray) -> bytes:
    # mtime=0: identical masks give identical bytes (cacheable, comparable in tests).
    bits = np.packbits(np.asarray(mask).astype(bool, copy=False), axis=None)
    return gzip.compress(bits.tobytes(), compresslevel=6, mtime=0)


def check_shape(shape: Sequence[int], what: str, max_count: Optional[int] = None) -> int:
    """The element count of ``shape`` (exact: Python integers cannot overflow), or a one-line error
    for a negative or zero size or a count over ``max_count``; nothing is allocated before this."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise WireFormatError(f"{what} shape {shape} has a negative size")
    if any(s == 0 for s in shape):
        raise WireFormatError(f"{what} shape {shape} has a zero-size axis")
    count = math.prod(shape)
    if max_count is not None and count > max_count:
        raise WireFormatError(f"{what} shape {shape} has {count:,} elements, over the limit of {max_count:,}")
    return count


def check_dtype(dtype: np.dtype, what: str = "volume") -> None:
    supported = "bool, (u)int8/16/32, int64 or float16/32/64"
    if dtype.hasobject or dtype.kind not in ENGINE_DTYPES:
        raise WireFormatError(f"{what} dtype {dtype} is not numeric; send {supported}")
    if dtype.itemsize not in ENGINE_DTYPES[dtype.kind]:
        raise WireFormatError(f"{what} dtype {dtype} is not supported by the engine; send {supported}")


def decode_mask(data: bytes, shape: Sequence[int], max_count: int = MAX_MASK_VOXELS) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    count = check_shape(shape, "mask", max_count)
    packed_len = (count + 7) // 8
    raw = _gunzip_exact(data, packed_len, "mask")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count)
    return bits.reshape(shape)


def encode_mask_b64(mask: np.ndarray) -> str:
    return base64.b64encode(encode_mask(mask)).decode("ascii")


def decode_mask_b64(text: str, shape: Sequence[int]) -> np.ndarray:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise WireFormatError("mask data is not valid base64") from None
    return decode_mask(data, shape)


def format_shape(shape: Sequence[int]) -> str:
    return ",".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise WireFormatError(f"bad shape {text!r}; expected comma-separated integers") from None


def encode_volume(volume: np.ndarray, compresslevel: int = 1) -> bytes:
    """gzip(.npy) in little-endian byte order. Level 1: a CT compresses nearly as well as at level 6
    in a fifth of the time, and the upload happens while the radiologist waits."""
    arr = np.asarray(volume)
    check_dtype(arr.dtype)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return gzip.compress(buf.getbuffer(), compresslevel=compresslevel, mtime=0)


def decode_volume(data: Union[bytes, bytearray], max_voxels: int) -> np.ndarray:
    """Parse an uploaded gzip(.npy) (or plain .npy); the voxel limit is checked on the header alone."""
    if data[:2] == _GZIP_MAGIC:
        inflater = zlib.decompressobj(wbits=31)
        try:
            head = inflater.decompress(data, _HEADER_PEEK)
        except zlib.error as exc:
            raise WireFormatError(f"volume upload is not valid gzip ({exc})") from None
    elif data[:6] == _NPY_MAGIC:
        inflater = None
        head = bytes(data[:_HEADER_PEEK])
    else:
        raise WireFormatError("volume upload is neither gzip nor .npy; send gzip-compressed .npy bytes")

    shape, fortran, dtype, offset = _read_npy_header(head)
    if len(shape) not in (2, 3):
        raise WireFormatError(f"volume must be 3D (or a 2D image), got shape {shape}")
    voxels = check_shape(shape, "volume")  # the exact count, however large
    if voxels > max_voxels:
        raise VolumeTooLargeError(
            f"volume {shape} has {voxels:,} voxels, over this server's limit of {max_voxels:,}; "
            "crop or downsample it"
        )
    nbytes = voxels * dtype.itemsize
    buf = bytearray(nbytes)  # writable, so torch can wrap it without a copy or a warning
    have = head[offset : offset + nbytes]
    buf[: len(have)] = have
    filled = len(have)
    if inflater is None:
        if len(data) != offset + nbytes:
            raise WireFormatError(f"volume upload has {len(data) - offset} data bytes, expected {nbytes}")
    else:
        if len(head) > offset + nbytes:
            raise WireFormatError("volume upload has bytes after the array")
        try:
            while not inflater.eof:
                # max_length 1 once the array is full: any further output is junk after it.
                chunk = inflater.decompress(inflater.unconsumed_tail, max(1, min(nbytes - filled, 1 << 24)))
                if not chunk:
                    break  # input used up before the end of the gzip stream
                if filled + len(chunk) > nbytes:
                    raise WireFormatError("volume upload has bytes after the array")
                buf[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        except zlib.error as exc:
            raise WireFormatError(f"volume upload is corrupt gzip ({exc})") from None
        if not inflater.eof or filled < nbytes:
            raise WireFormatError(f"volume upload is truncated: {filled} of {nbytes} array bytes arrived")
        if inflater.unused_data:
            raise WireFormatError("volume upload has bytes after the gzip stream")
    arr = np.frombuffer(buf, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    # Native byte order: torch cannot hold big-endian tensors.
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


def _read_npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError) as exc:
        raise WireFormatError(
            f"volume upload has no valid .npy header ({str(exc).splitlines()[0]})"
        ) from None
    check_dtype(dtype)
    return tuple(int(s) for s in shape), bool(fortran), dtype, f.tell()


def _gunzip_exact(data: bytes, expected: int, what: str) -> bytes:
    """Inflate at most ``expected`` bytes; anything else (a bomb, truncation, junk) is an error."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as exc:
        raise WireFormatError(f"{what} data is not valid gzip ({exc})") from None
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise WireFormatError(f"{what} data does not match its shape ({len(raw)} bytes, expected {expected})")
    return raw
