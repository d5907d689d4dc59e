"""Which device a new session goes to, on a server with several GPUs (``medsam2 serve --devices``).

Each device has its own memory budget (``--memory-budget-gb`` applies per device; by default half of
what is free on it when first used) and its own copy of each model, loaded on first use. A new
session goes to the device with the most free memory among those whose budget still has room for
it; the budgets keep the promise that an admitted session never runs out of memory, the free-memory
measure spreads sessions over the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from medsam2.devices import available_memory_bytes, resolve_device
from medsam2.errors import DeviceUnavailableError

# (slot, device) -> free bytes now; a slot is a device's position in the list (two CPU "devices"
# in a test are the same torch device in different slots).
FreeMemory = Callable[[int, torch.device], int]


def parse_devices(value: str) -> list[torch.device]:
    """``cuda:0,cuda:1`` (each checked), or ``auto``: every CUDA device, else the one ``auto`` device."""
    text = (value or "").strip().lower()
    if text == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return [torch.device("cuda", n) for n in range(torch.cuda.device_count())]
        return [resolve_device("auto")]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DeviceUnavailableError("--devices needs a comma-separated list (cuda:0,cuda:1) or auto")
    devices = [resolve_device(n) for n in names]
    if len({str(d) for d in devices}) != len(devices):
        raise DeviceUnavailableError(f"--devices lists a device twice: {value}")
    return devices


def _measured(slot: int, device: torch.device) -> int:
    return available_memory_bytes(device)


@dataclass
class DevicePlacement:
    devices: list[torch.device]
    budget_per_device: Optional[int] = None  # None: half of the device's free memory at first use
    free_memory: FreeMemory = _measured
    budgets: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)

    def budget(self, slot: int) -> int:
        if slot not in self.budgets:
            self.budgets[slot] = (
                self.budget_per_device
                if self.budget_per_device is not None
                else self.free_memory(slot, self.devices[slot]) // 2
            )
        return self.budgets[slot]

    def room(self, slot: int) -> int:
        return self.budget(slot) - self.reserved.get(slot, 0)

    def choose(self, need: int) -> Optional[int]:
        """The slot for a session needing ``need`` bytes, or None when no device's budget has room."""
        fits = [s for s in range(len(self.devices)) if self.room(s) >= need]
        if not fits:
            return None
        return max(fits, key=lambda s: (self.free_memory(s, self.devices[s]), self.room(s), -s))

    def reserve(self, slot: int, need: int) -> None:
        self.reserved[slot] = self.reserved.get(slot, 0) + need

    def release(self, slot: int, need: int) -> None:
        self.reserved[slot] = self.reserved.get(slot, 0) - need

    @property
    def total_budget(self) -> int:
        return sum(self.budget(s) for s in range(len(self.devices)))

    @property
    def largest_budget(self) -> int:
        return max(self.budget(s) for s in range(len(self.devices)))
