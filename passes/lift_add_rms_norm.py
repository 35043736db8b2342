"""lift_add_rms_norm: a residual add whose sum an rms_norm reads becomes fused_add_rms_norm."""
from __future__ import annotations

import logging
import numbers
import operator
from typing import Any

import torch
from torch import fx

from passes.fx_utils import same_shape, tensor_meta
from passes.patterns import Match, Pattern, PatternPass
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)


# What the pass matches: rms_norm(a + b) where the sum is also read elsewhere (the next
# residual) or nowhere else; the norm as lift_rms_norm writes it or as a model calls it.
def _pattern(norm: Any) -> Any:
    def add_then_norm(a: Any, b: Any, weight: Any, eps: Any) -> Any:
        total = a + b
        return norm(total, weight, eps), total
    return add_then_norm


PATTERNS = tuple(Pattern.of(name, _pattern(norm)) for name, norm in (
    ("rms_norm", torch.ops.fxkiln.rms_norm.default), ("rms_norm", torch.ops.fxkiln.rms_norm)))
# What it writes: fused_add_rms_norm(a, b, weight, eps), whose two results replace the norm and
# the sum. The op adds as `a + b` does (commutative, the same promotion) and normalizes that sum.
FUSED = torch.ops.fxkiln.fused_add_rms_norm.default


class LiftAddRmsNormPass(PatternPass):
    """Fuses the residual add before an RMSNorm into fxkiln's fused_add_rms_norm.

    A pre-norm decoder adds each block's output to the residual stream and normalizes the sum
    for the next block; fused, the sum is read and written once (vLLM's fused_add_rms_norm).
    The op's second result is the sum, so every other reader of the add (the residual the next
    block adds to) reads it. Only adds of two tensors of the sum's shape are fused (no
    broadcasting: the kernel reads both row by row).

    Before (the golden test's graph):
        add = x + residual
        rms_norm = torch.ops.fxkiln.rms_norm(add, weight, 1e-06)
        mul = add * 2
        add_1 = rms_norm + mul
        return add_1
    After:
        fused_add_rms_norm_default = torch.ops.fxkiln.fused_add_rms_norm.default(x, residual, weight, 1e-06)
        getitem = fused_add_rms_norm_default[0]
        getitem_1 = fused_add_rms_norm_default[1]
        mul = getitem_1 * 2
        add_1 = getitem + mul
        return add_1
    """

    name = "lift_add_rms_norm"

    patterns = PATTERNS

    @staticmethod
    def applies(match: Match) -> bool:
        """Both addends are tensors of the sum's shape; eps is a number."""
        a, b, eps = (match.bindings[k] for k in ("a", "b", "eps"))
        total = tensor_meta(match.outputs[1])
        values = [tensor_meta(a), tensor_meta(b)]
        if total is None or any(v is None or not same_shape(v.shape, total.shape) for v in values):
            return False
        return isinstance(eps, numbers.Real) and not isinstance(eps, bool)

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> tuple[fx.Node, fx.Node] | None:
        if not self.applies(match):
            logger.debug("lift_add_rms_norm: %s left alone", match.outputs[1].format_node())
            return None
        a, b, weight, eps = (match.bindings[k] for k in ("a", "b", "weight", "eps"))
        fused = gm.graph.call_function(FUSED, (a, b, weight, eps))
        return (gm.graph.call_function(operator.getitem, (fused, 0)),
                gm.graph.call_function(operator.getitem, (fused, 1)))
