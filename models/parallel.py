"""Tensor-parallel state and the collectives the parallel layers call.

A layer learns its TP size and rank when it is built: either from an explicit `tp=` argument or
from the `tensor_parallel(...)` block the model is built in (a ContextVar, so two models built
with different TP settings never share state). With TP size 1 there is no process group and the
layers emit no collective at all.

Collectives are the functional c10d ops (`torch.ops._c10d_functional.*` followed by
`wait_tensor`): they return new tensors, trace with `torch.fx.symbolic_trace` as plain
call_function nodes, have fake implementations for shape propagation, and run eagerly on gloo
(CPU) and NCCL (GPU).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group."""

    size: int = 1
    rank: int = 0
    group_name: str | None = None  # the c10d group's name; None only when size == 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel: expected 0 <= rank < size, found rank {self.rank} "
                             f"and size {self.size}")
        if self.size > 1 and self.group_name is None:
            raise ValueError(f"tensor parallel size {self.size} needs a process group, found none")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> TensorParallel:
        """The TP state of this process in `group` (default: the world group)."""
        if not dist.is_initialized():
            raise RuntimeError("tensor parallel size > 1 needs torch.distributed initialized "
                               "(init_process_group), found it uninitialized")
        group = group if group is not None else dist.group.WORLD
        assert group is not None
        return cls(size=dist.get_world_size(group), rank=dist.get_rank(group),
                   group_name=group.group_name)


_SINGLE = TensorParallel()
_ACTIVE_TP: ContextVar[TensorParallel] = ContextVar("fxkiln_tensor_parallel", default=_SINGLE)


def current_tp() -> TensorParallel:
    """The TP state layers built now will use (size 1 outside any `tensor_parallel` block)."""
    return _ACTIVE_TP.get()


@contextmanager
def tensor_parallel(tp: TensorParallel) -> Iterator[TensorParallel]:
    """Layers built within the block shard themselves for `tp`."""
    token = _ACTIVE_TP.set(tp)
    try:
        yield tp
    finally:
        _ACTIVE_TP.reset(token)


def divide(total: int, parts: int, what: str) -> int:
    """`total / parts`, or ValueError naming `what` when it does not divide."""
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor parallel size ({parts})")
    return total // parts


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum of `x` over the TP group (returns `x` itself, no node, when TP size is 1)."""
    if tp.size == 1:
        return x
    reduced = torch.ops._c10d_functional.all_reduce.default(x, "sum", tp.group_name)
    return torch.ops._c10d_functional.wait_tensor.default(reduced)


def all_gather_last_dim(x: torch.Tensor, local: int, tp: TensorParallel) -> torch.Tensor:
    """Concatenate every rank's `x` (tokens, local) along the last dim: (tokens, size * local)."""
    if tp.size == 1:
        return x
    gathered = torch.ops._c10d_functional.all_gather_into_tensor.default(
        x.contiguous(), tp.size, tp.group_name)                      # (size * tokens, n)
    gathered = torch.ops._c10d_functional.wait_tensor.default(gathered)
    by_rank = gathered.view(tp.size, -1, local)                      # (size, tokens, n)
    return by_rank.movedim(0, 1).reshape(-1, tp.size * local)       # (tokens, size * n)
