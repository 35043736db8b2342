"""A CPU (any device) replay simulator with the buffer semantics of CUDA graphs.

A CUDA graph replays the kernels it recorded on the addresses it recorded: it reads the tensors
its inputs were at capture, and writes its outputs into the same memory every replay. Code that
forgets to copy new inputs into the static buffers, or holds an output across a replay, is wrong
on the GPU only. The simulator reproduces those semantics with eager kernels so that such bugs
fail CPU tests too:

- a simulated graph keeps the argument tensors it was captured with, and each replay runs the
  piece on *those* tensors (never on what the caller passes), then copies the results into the
  output tensors of the capture run, which every replay returns;
- a replay runs in the forward context the graph was captured in (when there was one), not
  the caller's: a captured attention op reads the layout buffers it was captured with, so a
  step that forgets to load them into those buffers reads stale ones, as on the GPU;
- capture runs the piece under a guard that rejects host synchronization (`.item()`,
  `nonzero`, ...), which a CUDA graph cannot record;
- memory that a CUDA graph pool may hand to other keys (buckets, signatures) is clobbered before
  each forward of a different key (outputs of every piece but the last that do not alias the
  piece's inputs);
- padding rows of float token inputs get fresh random values before each replay (where a CUDA
  runner leaves stale data), so padding that leaks into real outputs changes them.

Not simulated: Python-level decisions inside a captured piece are made again at each replay
(a CUDA graph freezes them), and kernels are not checked for the same launch configuration.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.forward_context import ForwardContext, peek_forward_context, set_forward_context
from runtime.graph_device import CapturedGraph, GraphDevice

aten = torch.ops.aten

# Ops that read device memory on the host (or size outputs by data): they cannot be captured.
HOST_SYNC_OPS = frozenset({
    aten._local_scalar_dense.default,  # .item(), int(t), bool(t), tolist()
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
})


class HostSyncGuard(TorchDispatchMode):
    """Raises on ops that synchronize with the host, as stream capture does on CUDA.

    `host_scalars`: data pointers of tensors that live on the host even in a CUDA run (Dynamo
    passes unspecialized Python scalars as 0-dim CPU tensors); reading them is allowed.
    """

    def __init__(self, host_scalars: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.host_scalars = host_scalars

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in HOST_SYNC_OPS and not (
                func is aten._local_scalar_dense.default
                and args[0].data_ptr() in self.host_scalars):
            raise RuntimeError(f"{func} reads device memory on the host; operation not "
                               f"permitted when stream is capturing")
        return func(*args, **(kwargs or {}))


def clobber(tensor: torch.Tensor) -> None:
    """Overwrite `tensor` with values that differ from whatever it held (NaN for floats)."""
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype == torch.bool:
        tensor.logical_not_()
    else:
        tensor.bitwise_not_()


class SimulatedGraph:
    """One piece captured for one bucket: replays on its capture arguments, into its outputs."""

    def __init__(self, replay_fn: Callable[..., Any], args: Sequence[Any],
                 outputs: Any, context: ForwardContext | None = None) -> None:
        self._replay_fn = replay_fn
        self._args = tuple(args)
        self.outputs = outputs
        self._context = context

    def replay(self) -> None:
        context = self._context
        # a device graph records no autograd, and reads the buffers it was captured with
        with torch.no_grad(), (nullcontext() if context is None else
                               set_forward_context(context.attn_metadata, context.kv_caches)):
            fresh = pytree.tree_leaves(self._replay_fn(*self._args))
            kept = pytree.tree_leaves(self.outputs)
            assert len(fresh) == len(kept), "a piece's outputs changed structure between runs"
            for old, new in zip(kept, fresh):
                if isinstance(old, torch.Tensor) and old is not new:
                    _overwrite(old, new)


def _overwrite(old: torch.Tensor, new: torch.Tensor) -> None:
    """`old.copy_(new)`, also for a broadcast `old` (stride 0: one element, many places)."""
    for dim, stride in enumerate(old.stride()):
        if stride == 0 and old.shape[dim] > 1:
            old, new = old.narrow(dim, 0, 1), new.narrow(dim, 0, 1)
    old.copy_(new)


def _storages(values: Sequence[Any]) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor)}


class SimulatedGraphDevice(GraphDevice):
    """Simulated graphs on any device; see the module docstring."""

    uses_graphs = True

    def __init__(self, device: torch.device | str) -> None:
        self._pool: list[tuple[Hashable, torch.Tensor]] = []  # (key, reusable output tensor)
        super().__init__(device)

    def capture_graph(self, run: Callable[..., Any], args: Sequence[Any], *, key: Hashable,
                      keep_outputs: bool, host_scalars: frozenset[int] = frozenset(),
                      ) -> tuple[CapturedGraph, Any]:
        with HostSyncGuard(host_scalars):
            outputs = run(*args)
        if not keep_outputs:
            inputs = _storages(args)
            self._pool.extend(
                (key, leaf) for leaf in pytree.tree_leaves(outputs)
                if isinstance(leaf, torch.Tensor)
                and leaf.untyped_storage().data_ptr() not in inputs)
        return SimulatedGraph(run, args, outputs, peek_forward_context()), outputs

    def fill_padding(self, padding: torch.Tensor) -> None:
        if padding.is_floating_point() or padding.is_complex():
            padding.normal_()  # finite, as stale data is: masked reads (0 * pad) stay exact

    def before_replay(self, key: Hashable) -> None:
        for owner, tensor in self._pool:
            if owner != key:
                clobber(tensor)
