"""view_sizes: a view or reshape's inferred size (-1) becomes the static size it stands for."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import node_val

logger = logging.getLogger(__name__)

# What the pass matches: `x.view(...)`, `x.reshape(...)`, `torch.reshape(x, ...)` whose sizes hold
# a -1 where shape propagation found a static size. What it writes: the same call with that size.
SHAPE_METHODS = frozenset({"view", "reshape"})


class ViewSizesPass(GraphPass):
    """Spells out the -1 of views whose inferred size is static (a head count, say).

    A view with -1 cannot be taken of an empty tensor when another size is 0: torch cannot
    infer the -1 (`view(1, 0, -1, 64)` of 0 elements is ambiguous). Serving graphs of
    encoder-decoder models run decode steps with no encoder tokens, so Hugging Face's
    `k_proj(encoder_states).view(1, tokens, -1, head_dim)` fails there. Where shape
    propagation knows the inferred size is a constant, this pass writes it in.

    Before (the golden test's graph):
        view = embedding.view(1, getitem, -1, 8)
        ...
        reshape = transpose_1.reshape(-1, getitem_2)
    After (the second -1 is the symbolic token count: it stays):
        view = embedding.view(1, getitem, 4, 8)
        ...
        reshape = transpose_1.reshape(-1, getitem_2)
    """

    name = "view_sizes"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for node in gm.graph.nodes:
            sizes = self.applies(node)
            if sizes is None:
                continue
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
            logger.debug("view_sizes: %s", node.format_node())
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> list[Any] | None:
        """The node's sizes with the -1 written out, or None if it has none to write."""
        is_shape_call = (node.op == "call_method" and node.target in SHAPE_METHODS) or \
            (node.op == "call_function" and node.target is torch.reshape)
        if not is_shape_call or len(node.args) < 2:
            return None
        sizes = list(node.args[1]) if len(node.args) == 2 and \
            isinstance(node.args[1], (tuple, list)) else list(node.args[1:])
        out = node_val(node)
        if -1 not in sizes or not isinstance(out, torch.Tensor) or out.dim() != len(sizes):
            return None
        index = sizes.index(-1)
        inferred = out.shape[index]
        if not isinstance(inferred, int):
            return None  # a symbolic size: leave the -1
        sizes[index] = inferred
        return sizes
