"""`torch.ops.fxkiln.logits_rows(hidden) -> Tensor`: the rows whose logits the step reads.

A prefill step runs every prompt token through the layers (their K/V fill the cache), but
generation reads the logits of one row per sequence: its last token. For Llama-1B at 8 x 1024
prompt tokens the LM head over every row is ~4 TFLOP and 2 GB of bf16 logits, all thrown away
but 8 rows. The LM head (`models.layers.ParallelLMHead`) therefore projects only
`logits_rows(hidden)`: the rows `AttentionMetadata.logits_indices` names, in that order, or
every row when the step names none (decode steps, and any call outside a forward context).

Graphs: a runner captures steps that name no rows, so a captured graph holds the every-row
form (a copy); a step that names rows must not replay it, and runners run such steps eagerly
(`selects_logits_rows`). The fake implementation gives every row, the shape of those steps.
"""
from __future__ import annotations

import torch

from runtime.forward_context import peek_forward_context


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
