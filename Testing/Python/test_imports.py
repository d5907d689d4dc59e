"""The remote client and the intensity settings import where torch is absent (Slicer before its
first-use installation, a thin client talking to a GPU server)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["medsam2", "medsam2.remote", "medsam2.intensity", "medsam2.geometry"])
def test_imports_without_torch(module):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        f"import {module}\n"
        "assert sys.modules['torch'] is None\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1]


def test_session_still_reachable_from_the_package():
    import medsam2

    assert medsam2.SegmentationSession.__name__ == "SegmentationSession"
