"""The CUDA graph device: each captured piece (or whole step) becomes one CUDA graph per key.

All graphs of one runner share one memory pool; the bucket runner captures largest bucket first,
so a smaller bucket's graphs reuse the memory of the larger ones. Memory is kept small the way a graph pool allows:
the runner holds only weak references to the outputs of every piece but the last (their memory
is free in the pool's eyes once the next piece of the capture forward has read them; at replay
each piece rewrites it before the next reads it). The last piece's outputs stay strongly held.

Captures run on a side stream with the garbage collector frozen; each graph is replayed once
right after capture so that the eager pieces that follow during the capture forward see real
values (stream capture records kernels without running them).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from runtime.graph_device import CapturedGraph, DeviceProperties, GraphDevice

logger = logging.getLogger(__name__)


def weak_ref_tensor(value: Any) -> Any:
    """A tensor viewing `value`'s memory without keeping it alive; other values unchanged.

    The memory stays in the graph pool (which the captured graphs keep); only the caching
    allocator's claim on it ends when the strong tensors die, so later captures may reuse it.
    """
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage()
    borrowed = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), value.device, storage.nbytes())
    return torch.empty((0,), dtype=value.dtype, device=value.device).set_(
        borrowed, value.storage_offset(), value.size(), value.stride())


class CUDAPieceGraph:
    """A torch.cuda.CUDAGraph and the output tensors each replay writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any) -> None:
        self.graph = graph
        self.outputs = outputs

    def replay(self) -> None:
        self.graph.replay()


class CUDAGraphDevice(GraphDevice):
    """Real CUDA graphs; see the module docstring."""

    uses_graphs = True
    profiles_memory = True

    def __init__(self, device: torch.device | str) -> None:
        self._pool: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._anchor: torch.cuda.CUDAGraph | None = None
        super().__init__(device)

    def _read_properties(self) -> DeviceProperties:
        properties = torch.cuda.get_device_properties(self.device)
        return DeviceProperties(name=properties.name,
                                capability=(properties.major, properties.minor),
                                processors=properties.multi_processor_count,
                                total_memory_bytes=properties.total_memory)

    @contextmanager
    def capture_session(self) -> Iterator[None]:
        """All warm-ups, eager pieces and captures run on one side stream (capture cannot use
        the default stream; one stream keeps the caching allocator free of cross-stream use)."""
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream(self.device)
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                if self._anchor is None:
                    self._anchor = _anchor_graph(self._pool, self.device)
                yield
            caller.wait_stream(self._stream)
            torch.cuda.synchronize(self.device)

    @contextmanager
    def refuse_host_sync(self) -> Iterator[None]:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def capture_graph(self, run: Callable[..., Any], args: Sequence[Any], *, key: Hashable,
                      keep_outputs: bool, host_scalars: frozenset[int] = frozenset(),
                      ) -> tuple[CapturedGraph, Any]:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool)
        try:
            outputs = run(*args)
        except BaseException:
            _end_failed_capture(graph)
            raise
        graph.capture_end()
        graph.replay()
        kept = outputs if keep_outputs else pytree.tree_map(weak_ref_tensor, outputs)
        return CUDAPieceGraph(graph, kept), outputs


def _end_failed_capture(graph: torch.cuda.CUDAGraph) -> None:
    """End a capture whose recording raised; the capture's own error is the one to report."""
    try:
        graph.capture_end()
    except RuntimeError as error:  # an invalidated capture fails to end; nothing to keep
        logger.debug("ending the failed capture raised too: %s", error)


def _anchor_graph(pool: Any, device: torch.device) -> torch.cuda.CUDAGraph:
    """A one-kernel graph in `pool`, kept for the device's lifetime and never replayed.

    The caching allocators (device and pinned host) count a pool's graphs and free the pool
    when the count reaches zero; a later capture into the same handle then fails their
    assert ("use_count > 0"). That happens when a signature's only graph is dropped (a new
    Hugging Face StaticCache per `generate`). The anchor keeps the count above zero."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool)
    torch.zeros(1, device=device)
    graph.capture_end()
    return graph
