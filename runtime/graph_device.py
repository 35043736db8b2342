"""What a device gives the runners: graph capture, its properties and memory profiling.

The runners (`runtime/runner.py` for fxkiln's own models, `runtime/signature_runner.py` for
graphs from Dynamo) are device-agnostic; each holds one `GraphDevice`. The base class is the
plain CPU, which has no graphs (`uses_graphs` is False). A device subclass supplies
`capture_graph()`, `_read_properties()` and `memory_profiler()`, and says whether it sizes
KV caches by a profiling forward (`profiles_memory`: CUDA does); the other hooks (a guard
against host synchronization, a session around captures, padding and pre-replay hooks for the
replay simulator) default to doing nothing. `runtime/cuda_runner.py` holds the CUDA device,
`runtime/replay_simulator.py` the simulator.
"""
from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from runtime.memory import DeviceMemoryProfiler, MemoryProfile, profile_peak

CAPTURE_FAILURE_CHOICES = ("raise", "eager")


@dataclass(frozen=True)
class DeviceProperties:
    """Device facts read once when a runner starts."""

    name: str
    capability: tuple[int, int] | None    # CUDA compute capability; None elsewhere
    processors: int                       # CUDA streaming multiprocessors, or CPU cores
    total_memory_bytes: int


@dataclass(frozen=True)
class CaptureOptions:
    """How runners capture: warm-up runs, what a failed capture does, address checks."""

    warmup_runs: int = 1          # eager runs before a capture
    capture_failure: str = "raise"  # "raise" | "eager" (run what failed eagerly from then on)
    debug: bool = False           # check the addresses of static inputs at every replay

    def __post_init__(self) -> None:
        if self.capture_failure not in CAPTURE_FAILURE_CHOICES:
            raise ValueError(f"capture_failure: expected one of {CAPTURE_FAILURE_CHOICES}, "
                             f"found {self.capture_failure!r}")
        runs = self.warmup_runs
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
            raise ValueError(f"warmup_runs: expected an int >= 0, found {runs!r}")


class CapturedGraph(Protocol):
    """A device graph: `replay()` reruns its kernels and refreshes `outputs` in place."""

    outputs: Any

    def replay(self) -> None: ...


class GraphDevice:
    """The plain CPU: no graphs. Subclasses add capture (see the module docstring)."""

    uses_graphs: ClassVar[bool] = False
    # "auto" KV caches are sized by a profiling forward (`profile_forward`); else a fixed size
    profiles_memory: ClassVar[bool] = False

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.properties = self._read_properties()

    # -- what a device supplies ---------------------------------------------------------
    def _read_properties(self) -> DeviceProperties:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError, AttributeError):
            memory = 0
        return DeviceProperties(name=platform.processor() or platform.machine() or "cpu",
                                capability=None, processors=os.cpu_count() or 1,
                                total_memory_bytes=memory)

    def memory_profiler(self) -> DeviceMemoryProfiler:
        return DeviceMemoryProfiler(self.device)

    def profile_forward(self, run: Callable[[], object]) -> MemoryProfile:
        """Free memory before `run()` (a forward at the largest step) and its peak growth."""
        return profile_peak(run, self.device)

    def capture_graph(self, run: Callable[..., Any], args: Sequence[Any], *, key: Hashable,
                      keep_outputs: bool, host_scalars: frozenset[int] = frozenset(),
                      ) -> tuple[CapturedGraph, Any]:
        """Capture `run(*args)` as a graph stored under `key`; returns (graph, outputs).

        The outputs of the capture run feed whatever runs next and must hold real values
        (replay once if capture only records). `keep_outputs`: hold the outputs strongly (the
        last piece of a step, or a whole step); otherwise their memory may serve other keys'
        graphs between replays. `host_scalars`: data pointers of 0-dim inputs that live on the
        host in a device run (reading them is no synchronization).
        """
        raise NotImplementedError(f"{type(self).__name__} does not capture graphs")

    # -- hooks with defaults ------------------------------------------------------------
    def refuse_host_sync(self) -> AbstractContextManager[Any]:
        """A context in which a host synchronization raises (warm-up of what is captured)."""
        return nullcontext()

    def capture_session(self) -> AbstractContextManager[Any]:
        """Set-up around captures (CUDA: the shared memory pool and the side stream)."""
        return nullcontext()

    def fill_padding(self, padding: torch.Tensor) -> None:
        """Rows of a static token buffer past the real tokens, before a replay (default: stale)."""

    def before_replay(self, key: Hashable) -> None:
        """Called before each replayed step (the simulator clobbers other keys' memory)."""

    @contextmanager
    def capturing(self) -> Iterator[DeviceMemoryProfiler]:
        """Around a batch of captures: no grad, memory measured, heap frozen, the session."""
        profiler = self.memory_profiler()
        with torch.no_grad(), profiler, gc_frozen(), self.capture_session():
            yield profiler


@contextmanager
def gc_frozen() -> Iterator[None]:
    """Freeze the heap: collections during capture skip every object that existed before it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def graph_device_for(device: torch.device | str, simulate: bool = False) -> GraphDevice:
    """The replay simulator (CUDA-graph buffer semantics with eager kernels, any device) when
    `simulate`; else CUDA graphs on CUDA devices and no graphs on the CPU."""
    device = torch.device(device)
    if simulate:
        from runtime.replay_simulator import SimulatedGraphDevice
        return SimulatedGraphDevice(device)
    if device.type == "cuda":
        from runtime.cuda_runner import CUDAGraphDevice
        return CUDAGraphDevice(device)
    return GraphDevice(device)
