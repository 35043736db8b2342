"""Split a rewritten graph into pieces at its splitting ops (attention, by default).

A piece between two attention ops depends only on tensors whose addresses can be fixed, so it can
be captured as a CUDA graph per token-count bucket. An attention op reads per-step metadata
(positions, sequence lengths, cache slots) that changes every step, so it runs eagerly, in a
piece of its own. Consecutive splitting ops share one eager piece.

Before (a graph with one attention op):
    q = torch._C._nn.linear(x, wq)
    output = torch.empty_like(q)
    attention = torch.ops.fxkiln.attention(q, k, v, output, 'layers.0')
    o = torch._C._nn.linear(output, wo)
    return o
After (split_module: submod_0 and submod_2 are captured, submod_1 runs eagerly):
    submod_0 = self.submod_0(x, wq)            # q, output
    getitem, getitem_1 = submod_0[0], submod_0[1]
    submod_1 = self.submod_1(getitem, k, v, getitem_1)
    submod_2 = self.submod_2(getitem_1, wo)
    return submod_2
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.split_module import split_module

logger = logging.getLogger(__name__)

# Splitting ops, as callables or as "namespace::op" names. A name matches every overload of the
# op and need not be registered yet (the attention op lives in runtime/attention.py).
DEFAULT_SPLITTING_OPS: tuple[str | Callable[..., Any], ...] = (
    "fxkiln::attention",
    "aten::scaled_dot_product_attention",
    F.scaled_dot_product_attention,
)


@dataclass(frozen=True)
class Piece:
    """One submodule of the split graph.

    `is_splitting`: the piece holds splitting ops only and runs eagerly; every other piece is
    captured (`captured` is its negation). `node_names`: the original graph's nodes it holds.
    """

    name: str
    graph_module: fx.GraphModule
    is_splitting: bool
    node_names: tuple[str, ...]

    @property
    def captured(self) -> bool:
        return not self.is_splitting


@dataclass(frozen=True)
class SplitGraph:
    """The top-level module (calling `submod_i` in the original order) and its pieces."""

    split_module: fx.GraphModule
    pieces: tuple[Piece, ...]

    def piece(self, name: str) -> Piece:
        for piece in self.pieces:
            if piece.name == name:
                return piece
        raise KeyError(f"no piece named {name!r}; pieces are {[p.name for p in self.pieces]}")


def op_key(target: Any) -> Any:
    """What a splitting op is matched by: the "namespace::op" name of an op, else the callable.

    OpOverloads (Dynamo and make_fx graphs) and OpOverloadPackets (symbolic_trace graphs) of the
    same op share a key, so one entry matches the op however it was traced.
    """
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, str):
        if "::" not in target:
            raise ValueError(f"splitting_ops: expected an op callable or a 'namespace::op' name, "
                             f"found the string {target!r}")
        return target.split(".")[0]
    custom_op = getattr(target, "_opoverload", None)  # a torch.library.custom_op object
    if isinstance(custom_op, torch._ops.OpOverload):
        return custom_op._schema.name
    return target


def is_splitting_node(node: fx.Node, keys: Collection[Any]) -> bool:
    if node.op != "call_function":
        return False
    try:
        return op_key(node.target) in keys
    except TypeError:  # an unhashable target is no splitting op
        return False


# Ops that read per-step metadata on the host (the forward context): no graph may hold them.
HOST_METADATA_OPS: tuple[str, ...] = ("fxkiln::attention",)


def reads_host_metadata(gm: fx.GraphModule) -> bool:
    """Whether `gm` holds an op that reads per-step metadata on the host (fxkiln's attention)."""
    keys = {op_key(op) for op in HOST_METADATA_OPS}
    return any(is_splitting_node(node, keys) for node in gm.graph.nodes)


def split_graph(gm: fx.GraphModule,
                splitting_ops: Collection[str | Callable[..., Any]] = DEFAULT_SPLITTING_OPS,
                ) -> SplitGraph:
    """Split `gm` at `splitting_ops`; consecutive splitting ops stay in one piece.

    A graph without any splitting op becomes one captured piece. `gm` is not modified.
    """
    keys = {op_key(op) for op in splitting_ops}
    partition_of: dict[fx.Node, int] = {}
    partition, previous_splits = -1, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        splits = is_splitting_node(node, keys)
        if splits != previous_splits:
            partition, previous_splits = partition + 1, splits
        partition_of[node] = partition
    splitting_partitions = {partition_of[n] for n in partition_of if is_splitting_node(n, keys)}

    top = split_module(gm, gm, lambda node: partition_of[node], keep_original_order=True)
    names: dict[int, list[str]] = {}
    for node, index in partition_of.items():
        names.setdefault(index, []).append(node.name)
    pieces = tuple(
        Piece(name=f"submod_{index}", graph_module=getattr(top, f"submod_{index}"),
              is_splitting=index in splitting_partitions, node_names=tuple(names[index]))
        for index in sorted(names)
    )
    logger.debug("split %d nodes into %d pieces (%d eager)", len(partition_of), len(pieces),
                 len(splitting_partitions))
    return SplitGraph(split_module=top, pieces=pieces)
