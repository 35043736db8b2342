"""fold_rotary: a rotary embedding read only by one attention becomes part of that attention."""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

import runtime.attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.rotary_embedding)
from passes.base import GraphPass, PassResult
from passes.fx_utils import call_arg

logger = logging.getLogger(__name__)

# What the pass matches: `fxkiln.rotary_embedding(positions, q, k, table, head_size, neox)`
# whose rotated query is read by one `fxkiln.attention` as its query (and otherwise only by
# `torch.empty_like`, the output buffer the attention layer allocates) and whose rotated key
# is read by that attention as its key and by nothing else. What it writes: the attention over
# the unrotated q and k with the rotary's inputs as its own arguments (the attention op rotates
# them: inside the decode kernel where it can), the buffers allocated like the unrotated query.
ROTARY = torch.ops.fxkiln.rotary_embedding.default
ATTENTION = (torch.ops.fxkiln.attention.default, torch.ops.fxkiln.attention)
ATTENTION_ARGS = ("query", "key", "value", "output", "layer_name", "implementation")


@dataclass(frozen=True)
class Fold:
    rotary: fx.Node
    query: fx.Node          # the rotary's outputs, getitem 0 and 1
    key: fx.Node
    attention: fx.Node
    buffers: tuple[fx.Node, ...]  # empty_like(rotated query) nodes


class FoldRotaryPass(GraphPass):
    """Folds each rotary embedding that only feeds an attention into the attention op.

    A Llama layer rotates query and key (one rotary launch per layer) and hands them to the
    attention, which writes the key to the KV cache and attends. The decode attention kernel
    loads the query group and the new key anyway: rotating them there saves the rotary launch
    and its round trip through memory (16 launches a Llama-1B step). The attention op takes the
    rotary's positions, cos/sin table, head size and layout; its other paths (prefill, native
    attention) run the rotary first, so the graph stays valid for every step.

    Before (the golden test's graph):
        rotary_embedding_default = torch.ops.fxkiln.rotary_embedding.default(positions, q, k, table, 8, True);  q = k = table = None
        getitem = rotary_embedding_default[0]
        getitem_1 = rotary_embedding_default[1];  rotary_embedding_default = None
        empty_like = torch.empty_like(getitem)
        attention_default = torch.ops.fxkiln.attention.default(getitem, getitem_1, v, empty_like, 'layers.0.attn');  getitem = getitem_1 = v = attention_default = None
        return empty_like
    After:
        empty_like = torch.empty_like(q, memory_format = torch.contiguous_format)
        attention_default = torch.ops.fxkiln.attention.default(q, k, v, empty_like, 'layers.0.attn', 'auto', positions, table, 8, True);  q = k = v = positions = table = attention_default = None
        return empty_like
    """

    name = "fold_rotary"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for node in list(gm.graph.nodes):
            fold = self.applies(node)
            if fold is None:
                continue
            _rewrite(gm.graph, fold)
            matches += 1
            logger.debug("fold_rotary: %s into %s", node.name, fold.attention.format_node())
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> Fold | None:
        """The fold of rotary `node`, or None: each of its outputs must be read once by one
        attention (query as its query, key as its key) that has no rotary yet, the query
        besides only by `torch.empty_like`."""
        if node.op != "call_function" or node.target is not ROTARY:
            return None
        outputs = {user.args[1]: user for user in node.users
                   if user.op == "call_function" and user.target is operator.getitem}
        if len(outputs) != len(node.users) or set(outputs) != {0, 1}:
            return None
        query, key = outputs[0], outputs[1]
        if len(key.users) != 1:
            return None
        attention = next(iter(key.users))
        if attention.op != "call_function" or attention.target not in ATTENTION:
            return None
        others = (call_arg(attention, 2, ("value",)), call_arg(attention, 3, ("output",)))
        if call_arg(attention, 0, ("query",)) is not query or \
                call_arg(attention, 1, ("key",)) is not key or query in others or \
                call_arg(attention, 6, ("positions",)) is not None:
            return None
        buffers = tuple(user for user in query.users if user is not attention)
        if len(query.users) != len(buffers) + 1 or not all(
                user.op == "call_function" and user.target is torch.empty_like
                and user.args == (query,) and not user.kwargs for user in buffers):
            return None
        return Fold(node, query, key, attention, buffers)


def _rewrite(graph: fx.Graph, fold: Fold) -> None:
    """The attention over the rotary's inputs, with its rotary arguments; the buffers allocated
    like the unrotated query, in the rotary's (contiguous) layout."""
    positions, query, key, table, head_size, is_neox = (
        call_arg(fold.rotary, index, (name,)) for index, name in enumerate(
            ("positions", "query", "key", "cos_sin_cache", "head_size", "is_neox")))
    for buffer in fold.buffers:
        buffer.args = (query,)
        buffer.kwargs = {"memory_format": torch.contiguous_format}
    attention = fold.attention
    args = [call_arg(attention, index, (name,), "auto" if name == "implementation" else None)
            for index, name in enumerate(ATTENTION_ARGS)]
    attention.args = (query, key, *args[2:], positions, table, head_size, is_neox)
    attention.kwargs = {}
    graph.erase_node(fold.query)
    graph.erase_node(fold.key)
    graph.erase_node(fold.rotary)
