"""Cleanup: dead code, views, reshapes and slices that change nothing, repeated factory calls."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import (
    is_getitem,
    is_impure,
    is_view_like,
    known_equal,
    same_shape,
    tensor_meta,
)

logger = logging.getLogger(__name__)

# What the pass matches: (op kind, target) of nodes that may be no-ops.
NO_OP_CANDIDATES = (
    ("call_method", "view | reshape | flatten | contiguous"),
    ("call_function", "torch.reshape | torch.flatten | torch.narrow | operator.getitem(slices)"),
)
# What it writes: the node's users read its input instead; the node dies.
# Also matched: calls that make a tensor from their arguments alone, repeated with the same
# arguments (Hugging Face's StaticCache makes `torch.arange(1)` in every layer); the first
# is read instead of the others when nothing writes any of them.
SHAREABLE_FACTORIES = (torch.arange,)


class CleanupPass(GraphPass):
    """Removes dead code and views, reshapes, narrows and slices whose output equals their input.

    Passes before it leave such nodes behind (a split whose parts are all read, a reshape to the
    shape a tensor already has). Removing them keeps the graph small and the FLOP and op counts
    honest. A node is a no-op only when shape propagation proves its output shape equals its
    input shape (symbolic shapes included); contiguous() only when the input is contiguous.
    Repeated `torch.arange` calls with equal arguments whose results are only read (no writer,
    no view that could be written) are made once: one kernel instead of one per layer.

    Before (the golden test's graph):
        linear = torch._C._nn.linear(x, proj_weight, proj_bias)
        getattr_1 = x.shape
        getitem = getattr_1[0]
        view = linear.view(getitem, 8)
        getitem_1 = view[(slice(None, None, None), slice(0, 8, None))]
        relu = torch.relu(x)
        return getitem_1
    After:
        linear = torch._C._nn.linear(x, proj_weight, proj_bias)
        return linear
    """

    name = "cleanup"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for node in list(gm.graph.nodes):
            source = self.applies(node)
            if source is None:
                continue
            logger.debug("cleanup: %s is a no-op of %s", node.format_node(), source.name)
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            matches += 1
        matches += _share_factories(gm)
        removed = _eliminate_dead_code(gm)
        matches += removed
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> fx.Node | None:
        """The node's input if `node` provably returns it unchanged, else None."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        source = node.args[0]
        out, inp = tensor_meta(node), tensor_meta(source)
        if out is None or inp is None or not same_shape(out.shape, inp.shape):
            return None
        if out.dtype != inp.dtype or out.device != inp.device:
            return None
        if node.op == "call_method" and node.target == "contiguous":
            return source if inp.is_contiguous() else None
        if is_view_like(node):
            return source
        if node.op == "call_function" and node.target is torch.narrow:
            return source
        if is_getitem(node) and _is_full_slicing(node.args[1], inp.shape):
            return source
        return None


def _is_full_slicing(index: Any, shape: torch.Size) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    if not items or not all(isinstance(item, slice) for item in items) or len(items) > len(shape):
        return False
    return all(_is_full_slice(item, size) for item, size in zip(items, shape))


def _is_full_slice(item: slice, size: Any) -> bool:
    start_ok = item.start in (None, 0)
    step_ok = item.step in (None, 1)
    stop = item.stop
    stop_ok = stop is None or (not isinstance(stop, fx.Node) and
                               (known_equal(stop, size) or _known_at_least(stop, size)))
    return start_ok and step_ok and stop_ok


def _known_at_least(stop: Any, size: Any) -> bool:
    return isinstance(stop, int) and isinstance(size, int) and stop >= size


def _share_factories(gm: fx.GraphModule) -> int:
    """Point the readers of a repeated factory call at its first call; how many were shared."""
    first: dict[Any, fx.Node] = {}
    shared = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SHAREABLE_FACTORIES:
            continue
        if is_impure(node) or any(is_impure(u) or is_view_like(u) for u in node.users):
            continue
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        try:
            earlier = first.setdefault(key, node)
        except TypeError:  # an unhashable argument: not compared
            continue
        if earlier is not node:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
            shared += 1
    return shared


def _eliminate_dead_code(gm: fx.GraphModule) -> int:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    return before - len(gm.graph.nodes)

