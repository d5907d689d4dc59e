"""Running ``medsam2`` as users do: the installed console script, in a subprocess.

Tests of a command go through here, not through ``medsam2.cli.main`` in-process, so what they check
is what a user typing the command gets (entry point, argument parsing, exit code, stdout/stderr).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

# The script pip installed next to this interpreter (the venv's bin/), else the one on PATH.
_BESIDE = Path(sys.executable).with_name("medsam2")
MEDSAM2 = str(_BESIDE) if _BESIDE.exists() else (shutil.which("medsam2") or "medsam2")


def run_medsam2(
    *args: object, cwd: Optional[Path] = None, timeout: float = 600, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """``medsam2 ARGS...``; never reaches the network (HF_HUB_OFFLINE=1), runs on the CPU."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [MEDSAM2, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=environ
    )
