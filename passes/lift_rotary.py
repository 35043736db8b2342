"""lift_rotary: `x * cos + rotate_half(x) * sin` becomes `torch.ops.fxkiln.rotary_cos_sin`."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from passes.fx_utils import tensor_meta
from passes.patterns import Match, Pattern, PatternPass
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)


# What the pass matches: Hugging Face's rotary embedding in its rotate_half (neox) form,
# rotate_half(x) = cat(-x[..., h:], x[..., :h]) with h half of x's last dim. Both front ends
# record the halves as literal slices, so there is one pattern per half width in the graph.
def _pattern(half: int) -> Any:
    def rotary(x: Any, cos: Any, sin: Any) -> Any:
        x1 = x[..., :half]
        x2 = x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotary


def patterns_for(gm: fx.GraphModule) -> tuple[Pattern, ...]:
    """A pattern for each half width a rotate_half in `gm` could have: half the last dim of
    every concatenation of even width."""
    halves = set()
    for node in gm.graph.nodes:
        value = tensor_meta(node) if node.op == "call_function" and node.target is torch.cat \
            else None
        if value is not None and value.dim() > 0 and isinstance(value.shape[-1], int) \
                and value.shape[-1] % 2 == 0 and value.shape[-1] > 0:
            halves.add(value.shape[-1] // 2)
    return tuple(Pattern.of(f"rotate_half/{half}", _pattern(half), half=half)
                 for half in sorted(halves))


# What it writes: rotary_cos_sin(x, cos, sin), which computes the same three products and sum.
# Partial rotary (Phi3's partial_rotary_factor) is this form applied to x[..., :rotary_dim]
# with cos/sin of that width; the slice and the concatenation with the rest stay as they are.
ROTARY = torch.ops.fxkiln.rotary_cos_sin.default
MAX_DIMS = 4  # what the Triton kernel indexes


class LiftRotaryPass(PatternPass):
    """Rewrites the rotate_half rotary embedding into fxkiln's rotary_cos_sin op.

    Hugging Face models apply rotary embeddings in eight ops per tensor (two slices, a
    negation, a concatenation, two products, a sum), twice per layer. The op takes the cos and
    sin the model computed (broadcast over heads, as (batch, 1, seq, dim) against
    (batch, heads, seq, dim)), not positions and a table: any frequency scaling a model
    applies stays in its graph, computed once per forward, and the rewrite stays exact. Only
    floating x of at most four dimensions, whose shape is the result's (cos and sin broadcast
    to x, not x to them), with cos and sin of one dtype are rewritten.

    Before (the golden test's graph):
        mul = x * cos
        getitem = x[(Ellipsis, slice(None, 4, None))]
        getitem_1 = x[(Ellipsis, slice(4, None, None))]
        neg = -getitem_1
        cat = torch.cat((neg, getitem), dim = -1)
        mul_1 = cat * sin
        add = mul + mul_1
        return add
    After:
        rotary_cos_sin_default = torch.ops.fxkiln.rotary_cos_sin.default(x, cos, sin)
        return rotary_cos_sin_default
    """

    name = "lift_rotary"

    def patterns_for(self, gm: fx.GraphModule) -> Iterable[Pattern]:
        return patterns_for(gm)

    @staticmethod
    def applies(match: Match) -> bool:
        """x floating, of at most four dims, cut in equal halves, the result's shape; cos and
        sin of one dtype."""
        x, cos, sin = (tensor_meta(match.bindings[k]) for k in ("x", "cos", "sin"))
        out = tensor_meta(match.outputs[0])
        if x is None or cos is None or sin is None or out is None:
            return False
        if not x.dtype.is_floating_point or cos.dtype != sin.dtype or not 1 <= x.dim() <= MAX_DIMS:
            return False
        if x.shape[-1] != 2 * match.built_with["half"]:  # the slices cut x in two equal halves
            return False
        return tuple(out.shape) == tuple(x.shape) and out.dtype == torch.promote_types(
            x.dtype, cos.dtype)

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> tuple[fx.Node] | None:
        if not self.applies(match):
            logger.debug("lift_rotary: %s at %s left alone", match.pattern,
                         match.outputs[0].format_node())
            return None
        x, cos, sin = (match.bindings[k] for k in ("x", "cos", "sin"))
        return (gm.graph.call_function(ROTARY, (x, cos, sin)),)
