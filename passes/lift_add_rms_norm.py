"""lift_add_rms_norm: a residual add whose sum an rms_norm reads becomes fused_add_rms_norm.

`AddNormPass` is the fusion itself, for any norm with a fused-add form; lift_add_layer_norm
is the same fusion for layer_norm."""
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
def add_norm_patterns(name: str, norm: Any, with_bias: bool = False) -> tuple[Pattern, ...]:
    """`norm(a + b, weight[, bias], eps), a + b` for the op packet `norm` and its default."""
    def add_then_norm(a: Any, b: Any, weight: Any, eps: Any) -> Any:
        total = a + b
        return norm_op(total, weight, eps), total

    def add_then_biased_norm(a: Any, b: Any, weight: Any, bias: Any, eps: Any) -> Any:
        total = a + b
        return norm_op(total, weight, bias, eps), total

    patterns = []
    for norm_op in (norm.default, norm):
        patterns.append(Pattern.of(name, add_then_biased_norm if with_bias else add_then_norm))
    return tuple(patterns)


PATTERNS = add_norm_patterns("rms_norm", torch.ops.fxkiln.rms_norm)
# What it writes: fused_add_rms_norm(a, b, weight, eps), whose two results replace the norm and
# the sum. The op adds as `a + b` does (commutative, the same promotion) and normalizes that sum.
FUSED = torch.ops.fxkiln.fused_add_rms_norm.default


class AddNormPass(PatternPass):
    """Fuses `a + b` into the norm that reads the sum: subclasses give `patterns` (from
    `add_norm_patterns`) and the fused op, `fused(a, b, *norm arguments)` -> (norm, sum)."""

    fused: Any = None
    norm_arguments: tuple[str, ...] = ("weight", "eps")

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
            logger.debug("%s: %s left alone", self.name, match.outputs[1].format_node())
            return None
        arguments = tuple(match.bindings[k] for k in ("a", "b", *self.norm_arguments))
        fused = gm.graph.call_function(self.fused, arguments)
        return (gm.graph.call_function(operator.getitem, (fused, 0)),
                gm.graph.call_function(operator.getitem, (fused, 1)))


class LiftAddRmsNormPass(AddNormPass):
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
    fused = FUSED
