"""Device-agnostic memory measurement: how much memory a block of work kept.

CUDA: the drop in the device's free memory (what `cudaMemGetInfo` reports), which counts the
CUDA-graph pool, the graphs themselves and anything else the block allocated and kept. CPU: the
growth of the process's resident memory. Both are coarse (other work in the process counts too)
and never negative.

Sizing the KV cache: a profiling forward at the largest step measures free memory and the
forward's peak activations (`profile_peak`), and the cache takes a fraction of the device's
memory less what the model needs besides (`kv_cache_budget_bytes`, vLLM's
`gpu_memory_utilization`). `weight_memory_bytes` is what loading the weights took.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import resource
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import torch

from runtime.kv_cache import AttentionKind, AttentionSpec

logger = logging.getLogger(__name__)

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


# -- sizing the KV cache from a profiling run (vLLM's profile_run / gpu_memory_utilization) ---
AUTO = "auto"
CPU_KV_CACHE_TOKENS = 16384   # "auto" where the device does not profile (CPU, the simulator)


@dataclass(frozen=True)
class MemoryProfile:
    """What a profiling forward measured on one device, in bytes.

    total: the device's memory. free: what was free just before the forward (cached blocks
    returned first), so everything else the process and other processes hold is not. activation:
    the allocator's peak growth during the forward (the largest step's transient memory).
    weights, graphs: what this model's weights and its runner's captured graphs keep.
    """

    total_bytes: int
    free_bytes: int
    activation_bytes: int
    weight_bytes: int = 0
    graph_bytes: int = 0


def weight_memory_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        storage = tensor.untyped_storage()
        seen[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def kv_cache_bytes_per_token(specs: Mapping[str, AttentionSpec], dtype: torch.dtype) -> int:
    """Bytes one slot costs over all cached layers (K and V of each decoder and cross layer:
    a runner's encoder-decoder cache has as many encoder slots as decoder slots)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * spec.num_kv_heads * spec.head_size * itemsize for spec in specs.values()
               if spec.kind is not AttentionKind.ENCODER)


def kv_cache_budget_bytes(profile: MemoryProfile, memory_utilization: float) -> int:
    """Bytes the KV cache may take: `memory_utilization` of the device less what this model
    needs besides (weights, graphs, the largest step's activations), as vLLM sizes it; and at
    most that fraction of what is free once the activations have their room, so memory that
    other models and processes hold stays theirs (a second model in one process gets a share of
    what the first left, not an error). Negative when nothing is left."""
    own = profile.weight_bytes + profile.graph_bytes + profile.activation_bytes
    by_share = int(profile.total_bytes * memory_utilization) - own
    by_free = int((profile.free_bytes - profile.activation_bytes) * memory_utilization)
    return min(by_share, by_free)


def profiled_kv_cache_tokens(profile: MemoryProfile, bytes_per_token: int,
                             memory_utilization: float) -> int:
    """Slots of KV cache in `kv_cache_budget_bytes`, logged with the figures behind them;
    ValueError when not even one slot fits."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization: expected a fraction in (0, 1], found "
                         f"{memory_utilization!r}")
    if bytes_per_token < 1:
        raise ValueError(f"KV cache: expected bytes per token >= 1, found {bytes_per_token}")
    budget = kv_cache_budget_bytes(profile, memory_utilization)
    tokens = max(budget, 0) // bytes_per_token
    logger.info("KV cache: %.2f GiB, %d tokens of %d bytes (gpu_memory_utilization %.2f of "
                "%.2f GiB, %.2f GiB free; weights %.2f GiB, graphs %.2f GiB, activations of "
                "the largest step %.2f GiB)", max(budget, 0) / 2**30, tokens, bytes_per_token,
                memory_utilization, profile.total_bytes / 2**30, profile.free_bytes / 2**30,
                profile.weight_bytes / 2**30, profile.graph_bytes / 2**30,
                profile.activation_bytes / 2**30)
    if tokens < 1:
        raise ValueError(
            f"KV cache: no room for one token: gpu_memory_utilization {memory_utilization} of "
            f"{profile.total_bytes / 2**30:.2f} GiB ({profile.free_bytes / 2**30:.2f} GiB free) "
            f"less the weights ({profile.weight_bytes / 2**30:.2f} GiB), the graphs "
            f"({profile.graph_bytes / 2**30:.2f} GiB) and the largest step's activations "
            f"({profile.activation_bytes / 2**30:.2f} GiB) leaves {budget / 2**30:.2f} GiB; "
            f"raise gpu_memory_utilization, lower the largest capture size, or set "
            f"kv_cache_tokens to a number")
    return tokens


def profile_peak(run: Callable[[], object], device: torch.device) -> MemoryProfile:
    """Run `run()` (a forward at the largest step) and measure free memory before it and the
    allocator's peak growth during it (weights and graphs are the caller's to fill in)."""
    if device.type != "cuda":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        before = resident_memory_bytes()
        run()
        growth = max(0, resident_memory_bytes() - before)
        return MemoryProfile(total_bytes=total, free_bytes=max(total - before, 0),
                             activation_bytes=growth)
    gc.collect()  # runners hold reference cycles: a dropped model's caches go only now
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # cached blocks are free for the forward and for the cache alike
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    growth = torch.cuda.max_memory_allocated(device) - allocated
    return MemoryProfile(total_bytes=total, free_bytes=free, activation_bytes=max(growth, 0))
