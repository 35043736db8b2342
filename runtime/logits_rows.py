"""`torch.ops.fxkiln.logits_rows(hidden) -> Tensor`: the rows whose logits the step reads.

A prefill step runs every prompt token through the layers (their K/V fill the cache), but
generation reads the logits of one row per sequence: its last token. For Llama-1B at 8 x 1024
prompt tokens the LM head over every row is ~4 TFLOP and 2 GB of bf16 logits, all thrown away
but 8 rows. The LM head (`models.layers.ParallelLMHead`) therefore projects only
`logits_rows(hidden)`: the rows `AttentionMetadata.logits_indices` names, in that order, or
every row when the step names none (decode steps, and any call outside a forward context).

Graphs: a graph captured for a step that names no rows holds the every-row form (a copy), so a
step that names rows must not replay it. The bucket runner splits the piece that holds the op
in two (`split_at_logits_rows`): such steps replay the part before the op and run the op and
the LM head after it eagerly, on the rows they read (`runtime.piece_runner`); a graph where
that split does not apply runs those steps eagerly (`selects_logits_rows`). The fake
implementation gives every row, the shape of steps that name none.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from runtime.forward_context import peek_forward_context
from runtime.split import op_key

OP_NAME = "fxkiln::logits_rows"


@torch.library.custom_op("fxkiln::logits_rows", mutates_args=())
def logits_rows(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (tokens, features) -> (rows read, features)."""
    indices = _indices()
    if indices is None:
        return hidden.clone()  # a custom op may not return its input
    return hidden.index_select(0, indices)


@logits_rows.register_fake
def _(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty(hidden.shape)


def _indices() -> torch.Tensor | None:
    context = peek_forward_context()
    return None if context is None else context.attn_metadata.logits_indices


def selects_logits_rows() -> bool:
    """Whether the active step reads the logits of some rows only (so it must run eagerly)."""
    return _indices() is not None


def is_logits_rows(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    try:
        return op_key(node.target) == OP_NAME
    except TypeError:  # an unhashable target is not the op
        return False


def split_at_logits_rows(gm: fx.GraphModule) -> fx.GraphModule | None:
    """`gm` (holding one logits_rows node) as `submod_0`, every node before the op, and
    `submod_1`, the op and every node after it; None when nothing comes before the op."""
    nodes = list(gm.graph.nodes)
    (cut,) = [index for index, node in enumerate(nodes) if is_logits_rows(node)]
    if all(node.op in ("placeholder", "get_attr") for node in nodes[:cut]):
        return None
    position = {node: index for index, node in enumerate(nodes)}
    return split_module(gm, gm, lambda node: 0 if position[node] < cut else 1,
                        keep_original_order=True)
