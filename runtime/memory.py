"""Device-agnostic memory measurement: how much memory a block of work kept.

CUDA: the drop in the device's free memory (what `cudaMemGetInfo` reports), which counts the
CUDA-graph pool, the graphs themselves and anything else the block allocated and kept. CPU: the
growth of the process's resident memory. Both are coarse (other work in the process counts too)
and never negative.
"""
from __future__ import annotations

import os
import resource
import sys
from types import TracebackType

import torch

_STATM = "/proc/self/statm"


def resident_memory_bytes() -> int:
    """The process's resident set size now (Linux); elsewhere its peak, the best available."""
    try:
        with open(_STATM) as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def used_memory_bytes(device: torch.device) -> int:
    """Memory in use on `device`: total minus free on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return resident_memory_bytes()


class DeviceMemoryProfiler:
    """Context manager: `consumed_bytes` is the memory the block added on `device`.

        with DeviceMemoryProfiler(device) as profiler:
            capture_graphs()
        profiler.consumed_bytes
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.before_bytes = 0
        self.after_bytes = 0

    @property
    def consumed_bytes(self) -> int:
        return max(0, self.after_bytes - self.before_bytes)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> DeviceMemoryProfiler:
        self._synchronize()
        self.before_bytes = used_memory_bytes(self.device)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._synchronize()
        self.after_bytes = used_memory_bytes(self.device)
