"""Device-agnostic memory measurement: how much memory a block of work kept.

CUDA: the drop in the device's free memory (what `cudaMemGetInfo` reports), which counts the
CUDA-graph pool, the graphs themselves and anything else the block allocated and kept. CPU: the
growth of the process's resident memory. Both are coarse (other work in the process counts too)
and never negative.

Sizing the KV cache: a profiling forward at the largest step measures the peak memory
(`profile_peak`), and the cache takes what is left of a fraction of the device's memory
(`profiled_kv_cache_tokens`, vLLM's `gpu_memory_utilization`). `weight_memory_bytes` is what
loading the weights took.
"""
from __future__ import annotations

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
CPU_KV_CACHE_TOKENS = 16384   # CPU: a fixed size ("auto" does not profile there)
UNPROFILED_KV_CACHE_TOKENS = 16384  # CUDA "auto" before a profiling run has been measured


@dataclass(frozen=True)
class MemoryProfile:
    """What a profiling run measured on one device, in bytes.

    total: the device's memory. peak: the most in use during the profiling forward (at the
    largest step the runner will run), weights and everything else the process holds included,
    as total minus free at the start plus the allocator's peak growth. graphs: memory the
    captured graphs keep (0 if measured before capture or not captured).
    """

    total_bytes: int
    peak_bytes: int
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


def profiled_kv_cache_tokens(profile: MemoryProfile, bytes_per_token: int,
                             memory_utilization: float) -> int:
    """Slots of KV cache that fit in `memory_utilization` of the device's memory, less what the
    profiling run's peak and the graphs take. ValueError when not even one slot fits."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization: expected a fraction in (0, 1], found "
                         f"{memory_utilization!r}")
    if bytes_per_token < 1:
        raise ValueError(f"KV cache: expected bytes per token >= 1, found {bytes_per_token}")
    budget = int(profile.total_bytes * memory_utilization)
    free = budget - profile.peak_bytes - profile.graph_bytes
    tokens = free // bytes_per_token
    logger.info("KV cache: %.2f GiB of %.2f GiB (gpu_memory_utilization %.2f) after a %.2f GiB "
                "peak and %.2f GiB of graphs: %d tokens of %d bytes", max(free, 0) / 2**30,
                budget / 2**30, memory_utilization, profile.peak_bytes / 2**30,
                profile.graph_bytes / 2**30, max(tokens, 0), bytes_per_token)
    if tokens < 1:
        raise ValueError(
            f"KV cache: no room for one token: gpu_memory_utilization {memory_utilization} of "
            f"{profile.total_bytes / 2**30:.2f} GiB is {budget / 2**30:.2f} GiB, but the "
            f"profiling run peaked at {profile.peak_bytes / 2**30:.2f} GiB and the graphs keep "
            f"{profile.graph_bytes / 2**30:.2f} GiB; raise gpu_memory_utilization, lower the "
            f"largest capture size, or set kv_cache_tokens to a number")
    return tokens


def resolve_kv_cache_tokens(setting: int | str, device: torch.device,
                            profile: MemoryProfile | None, bytes_per_token: int,
                            memory_utilization: float) -> int:
    """The KV cache size for `CompileConfig.kv_cache_tokens`: a number as it is; "auto" on CPU
    the fixed CPU_KV_CACHE_TOKENS, on CUDA sized from `profile` (UNPROFILED_KV_CACHE_TOKENS
    while there is none)."""
    if setting != AUTO:
        assert isinstance(setting, int), setting
        return setting
    if device.type != "cuda":
        return CPU_KV_CACHE_TOKENS
    if profile is None:
        logger.info("KV cache: kv_cache_tokens='auto' without a profiling run; %d tokens",
                    UNPROFILED_KV_CACHE_TOKENS)
        return UNPROFILED_KV_CACHE_TOKENS
    return profiled_kv_cache_tokens(profile, bytes_per_token, memory_utilization)


def profile_peak(run: Callable[[], object], device: torch.device) -> MemoryProfile:
    """Run `run()` (a forward at the largest step) and measure the device's peak memory use."""
    if device.type != "cuda":
        before = resident_memory_bytes()
        run()
        peak = max(before, resident_memory_bytes())
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return MemoryProfile(total_bytes=total, peak_bytes=peak)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    growth = torch.cuda.max_memory_allocated(device) - allocated
    return MemoryProfile(total_bytes=total, peak_bytes=total - free + max(growth, 0))
