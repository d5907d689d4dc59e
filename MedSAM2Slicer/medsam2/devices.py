"""Compute device selection and the precision each device runs at."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Optional

import torch

from medsam2.errors import DeviceUnavailableError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; a named device that is missing is an error."""
    value = (name or "auto").strip().lower()
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return _cpu()
    if value == "cpu":
        return _cpu()
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} requested but CUDA is not available here (torch {torch.__version__}); "
                "use --device cpu or auto"
            )
        device = torch.device(value)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    if value == "mps":
        if not _mps_available():
            raise DeviceUnavailableError("device 'mps' requested but Apple MPS is not available here")
        return torch.device("mps")
    raise DeviceUnavailableError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cpu() -> torch.device:
    # torch defaults to the physical cores it detects; use every core this process may run on, unless
    # OMP_NUM_THREADS says otherwise (on a shared machine fewer threads can be many times faster).
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    if torch.get_num_threads() < cores and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cores)
    return torch.device("cpu")


def autocast(device: torch.device) -> ContextManager[object]:
    """bf16 autocast on CUDA (what SAM2 was trained and benchmarked with); full float32 elsewhere.

    MPS and CPU stay in float32: bf16 on them is slower or unsupported for several SAM2 ops, and
    float32 on the CPU keeps the engine bit-compatible with the reference predictor.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA) or available RAM (CPU/MPS), for the default cache budget."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def enable_fast_math(device: torch.device) -> bool:
    """TF32 for float32 matmuls and convolutions on CUDA (what Meta's own benchmark runs with); the
    few float32 ops left under bf16 autocast then use tensor cores too. No effect elsewhere: the CPU
    stays bit-compatible with the reference. Returns whether it was switched on."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def cached_feature_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype slice features are cached in: bf16 on CUDA (matching its autocast), as computed
    elsewhere (float32)."""
    return torch.bfloat16 if device.type == "cuda" else None
