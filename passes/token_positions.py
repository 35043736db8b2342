"""token_positions: positions a graph counts itself (`arange` over its tokens) read the input."""
from __future__ import annotations

import logging

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import call_arg, known_equal, node_val
from passes.token_streams import TokenStream, stream_of, token_streams

logger = logging.getLogger(__name__)

# What the pass matches: `torch.arange(n)` or `torch.arange(0, n)` (step 1) where n is the token
# count of one of the graph's token streams. What it writes: that stream's positions input
# (cast to the arange's dtype when it differs).


class TokenPositionsPass(GraphPass):
    """Makes the positions a captured graph computes for itself read the stream's positions.

    Hugging Face models called on one sequence without a cache count positions themselves:
    `torch.arange(num_tokens)` feeds the learned or sinusoidal position embeddings (BART's
    encoder and decoder, Marian, MBart). Over flattened tokens, where one call carries many
    sequences at any positions (a decode step: one token per sequence, each at its own
    position), those positions are the `positions` input. Run after `cached_attention`, whose
    masks (built from the same aranges) are gone by then; an arange that is still live counts
    positions.

    Before (the golden test's graph, positions counted as BART does):
        getattr_1 = input_ids.shape
        getitem = getattr_1[0]
        arange = torch.arange(0, getitem, dtype = torch.int64)
        embedding = torch.nn.functional.embedding(input_ids, embed_weight, ...)
        add = arange + 2
        embedding_1 = torch.nn.functional.embedding(add, table_weight, ...)
        add_1 = embedding + embedding_1
    After (the size nodes left dead go in cleanup):
        embedding = torch.nn.functional.embedding(input_ids, embed_weight, ...)
        add = positions + 2
        embedding_1 = torch.nn.functional.embedding(add, table_weight, ...)
        add_1 = embedding + embedding_1
    """

    name = "token_positions"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        streams = token_streams(gm)
        matches = 0
        for node in list(gm.graph.nodes):
            stream = self.applies(node, streams)
            if stream is None:
                continue
            replacement: fx.Node = stream.positions
            wanted = node_val(node).dtype
            if node_val(stream.positions).dtype != wanted:
                with gm.graph.inserting_before(node):
                    replacement = gm.graph.call_method("to", (stream.positions, wanted))
            logger.debug("token_positions: %s -> %s", node.format_node(), replacement.name)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node, streams: dict[str, TokenStream]) -> TokenStream | None:
        """The stream whose positions `node` counts, if it is `arange` over its tokens."""
        if node.op != "call_function" or node.target is not torch.arange or not node.users:
            return None
        args = [node_val(a) for a in node.args]
        if len(args) == 1:
            start, end, step = 0, args[0], 1
        elif len(args) in (2, 3):
            start, end, step = args[0], args[1], args[2] if len(args) == 3 else 1
        else:
            return None
        step = call_arg(node, 99, ("step",), step)
        if not known_equal(start, 0) or not known_equal(step, 1):
            return None
        value = node_val(node)
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            return None
        return stream_of(end, streams)
