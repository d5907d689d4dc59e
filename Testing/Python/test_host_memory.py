"""Freed host memory goes back to the OS after model work (medsam2.host_memory): the pages a thread's
malloc arena keeps after its tensors are freed are returned by release_free_host_memory()."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from medsam2.host_memory import release_free_host_memory

BLOCK = 64 * 1024  # below glibc's mmap threshold: served from the thread's arena, kept there when freed
BLOCKS = 2000  # ~125 MB


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _fill_and_free_in_a_thread(kept: list[np.ndarray]) -> None:
    """Fill an arena, then free all but the last block (which pins the heap's top, so glibc's
    automatic trimming on free cannot release the rest)."""
    blocks = [np.ones(BLOCK, np.uint8) for _ in range(BLOCKS)]
    kept.append(blocks.pop())
    del blocks


@pytest.mark.skipif(not release_free_host_memory(), reason="the C library is not glibc (no malloc_trim)")
def test_pages_a_worker_thread_freed_are_returned():
    kept: list[np.ndarray] = []
    # Earlier tests' freed pages first: an arena reused from an exited thread may hold resident free
    # memory that the new blocks would fill without raising the RSS.
    release_free_host_memory()
    before = _rss_mb()
    worker = threading.Thread(target=_fill_and_free_in_a_thread, args=(kept,))
    worker.start()
    worker.join()
    retained = _rss_mb() - before
    assert retained > 0.5 * BLOCK * BLOCKS / 2**20, f"the arena kept only {retained:.0f} MB; nothing to test"
    assert release_free_host_memory()
    assert _rss_mb() - before < 0.25 * retained, "freed pages stayed resident"
