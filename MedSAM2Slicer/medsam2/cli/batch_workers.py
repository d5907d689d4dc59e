"""What ``medsam2 batch`` does besides segmenting: opening the next case ahead of time, and sharing a
manifest among torchrun's processes (device per process, one merged summary)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional

from medsam2.cli.common import ModelCache
from medsam2.cli.segment import SegmentJob, open_case
from medsam2.distributed import RankInfo, barrier

Opened = tuple[Any, Any, Any]  # (loaded input, registry entry, session), as open_case returns
MERGE_DIR = ".medsam2-batch"
BARRIER_TIMEOUT_S = 7 * 24 * 3600.0  # a rank may wait for the slowest one's whole share


class CaseOpener:
    """Opens one case ahead in a thread: reads and decodes its input, builds its session, and where
    the device has room (CUDA: the session's own budget check passed) starts its background
    encoding, so its slices are encoded while the current case propagates. On a CPU the encoder
    already uses every core, so only reading and preparation are overlapped."""

    def __init__(self, models: ModelCache) -> None:
        self._models = models
        self._job: Optional[SegmentJob] = None
        self._thread: Optional[threading.Thread] = None
        self._opened: Optional[Opened] = None

    def open_now(self, job: SegmentJob) -> Optional[Opened]:
        try:
            opened = open_case(job, self._models)
        except Exception:  # segment_one opens it again and reports the error with the case
            return None
        share_cpu(job.args.device)
        return opened

    def start(self, job: SegmentJob) -> None:
        self.cancel()
        self._job, self._opened = job, None

        def work() -> None:
            opened = self.open_now(job)
            if opened is not None and opened[2].device.type == "cuda":
                opened[2].start_background_encoding()
            self._opened = opened

        self._thread = threading.Thread(target=work, name="medsam2-open-next", daemon=True)
        self._thread.start()

    def take(self, job: SegmentJob) -> Optional[Opened]:
        """The case opened ahead for ``job`` (None if it was not, or could not be, opened)."""
        if self._job is not job or self._thread is None:
            return None
        self._thread.join()
        opened, self._job, self._thread, self._opened = self._opened, None, None, None
        return opened

    def cancel(self) -> None:
        if self._thread is not None:
            self._thread.join()
            if self._opened is not None:
                self._opened[2].close()
        self._job, self._thread, self._opened = None, None, None


def device_for_rank(device: Optional[str], info: RankInfo) -> Optional[str]:
    """Under torchrun, each process on its own GPU (local rank modulo the GPUs there)."""
    if info.world_size < 2:
        return device
    import torch

    value = (device or "auto").strip().lower()
    if value in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return device


def share_cpu(device: Optional[str]) -> None:
    """Under torchrun on the CPU, each process gets its share of the cores: each taking all of them
    (what loading a model sets) oversubscribes the machine and slows every process many times."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local < 2 or (device or "auto").startswith("cuda"):
        return
    import torch

    if (device or "auto") == "auto" and torch.cuda.is_available():
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local))


def gather_results(results: list[dict[str, Any]], base: Path, info: RankInfo) -> list[dict[str, Any]]:
    """Every process's case records, in manifest order, for rank 0's summary (each process gets its
    own back). The records travel as files next to the outputs, after a gloo barrier."""
    folder = base / MERGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"rank{info.rank}.json"
    tmp = mine.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, mine)
    if not info.launched:
        return results
    barrier(info, BARRIER_TIMEOUT_S)
    if info.rank != 0:
        return results
    merged: list[dict[str, Any]] = []
    for r in range(info.world_size):
        part = folder / f"rank{r}.json"
        merged += json.loads(part.read_text())
        part.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass
    return sorted(merged, key=lambda record: int(record["case"]))
