"""lift_rms_norm: RMSNorm spelled out in torch ops becomes `torch.ops.fxkiln.rms_norm`."""
from __future__ import annotations

import logging
import numbers
import operator
from typing import Any

import torch
from torch import fx

from passes.fx_utils import (
    add_constant,
    constant_name,
    constant_tensor,
    static_dtype,
    tensor_meta,
)
from passes.patterns import Match, Pattern, PatternPass
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)


# What the pass matches: the two ways Hugging Face models write RMSNorm over the last dim.
def _llama(x: Any, weight: Any, eps: Any, out_dtype: Any) -> Any:
    """Llama, Mistral, Qwen2/3 (with Qwen3's per-head q/k norms), Phi3."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(out_dtype)


def _gemma(x: Any, weight: Any, eps: Any) -> Any:
    """Gemma: the weight is stored minus one, and multiplies in float32 before the cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


PATTERNS = (Pattern.of("llama", _llama), Pattern.of("gemma", _gemma))
# What it writes: rms_norm(x, weight, eps), which computes llama's form exactly:
# (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype) * weight. For gemma's form, whose
# product is taken in float32, it writes rms_norm(x.float(), 1 + weight.float(), eps).type_as(x)
# (no cast when x is float32): the norm of a float32 input rounds nothing before the weight.
# `1 + weight.float()` of a constant weight is folded into a new constant, computed once with
# the same float32 add the graph would run.
RMS_NORM = torch.ops.fxkiln.rms_norm.default


class LiftRmsNormPass(PatternPass):
    """Rewrites RMSNorm written in torch ops (Hugging Face's spellings) into fxkiln's rms_norm.

    Hugging Face models spell RMSNorm out in seven to nine ops per norm (cast, square, mean, add,
    rsqrt, two products, casts). As one dispatch op, kernel_choice can give it a fused kernel,
    and lift_add_rms_norm can fuse the residual add before it. The rewrite is exact: only the
    spellings above, with the statistics over the last dimension, a number for eps, a weight of
    the normalized width and the output cast back to the input's dtype, are lifted.

    Before (the golden test's graph):
        to = x.to(torch.float32)
        pow_1 = to.pow(2)
        mean = pow_1.mean(-1, keepdim = True)
        add = mean + 1e-06
        rsqrt = torch.rsqrt(add)
        mul = to * rsqrt
        to_1 = mul.to(torch.float32)
        mul_1 = weight * to_1
        return mul_1
    After:
        rms_norm_default = torch.ops.fxkiln.rms_norm.default(x, weight, 1e-06)
        return rms_norm_default
    """

    name = "lift_rms_norm"

    patterns = PATTERNS

    @staticmethod
    def applies(match: Match) -> bool:
        """Over the last dim of a floating tensor, eps a number, weight of that width, and for
        llama's form the result cast back to the input's dtype."""
        x, weight, eps = (match.bindings[k] for k in ("x", "weight", "eps"))
        x_value, weight_value = tensor_meta(x), tensor_meta(weight)
        if x_value is None or weight_value is None or not x_value.dtype.is_floating_point:
            return False
        if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or x_value.dim() == 0:
            return False
        if tuple(weight_value.shape) != tuple(x_value.shape[-1:]):
            return False
        out_dtype = match.bindings.get("out_dtype")
        return match.pattern == "gemma" or static_dtype(out_dtype) == x_value.dtype

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> tuple[fx.Node] | None:
        if not self.applies(match):
            logger.debug("lift_rms_norm: %s form at %s left alone", match.pattern,
                         match.outputs[0].format_node())
            return None
        x, weight, eps = (match.bindings[k] for k in ("x", "weight", "eps"))
        graph = gm.graph
        if match.pattern == "llama":
            return (graph.call_function(RMS_NORM, (x, weight, eps)),)
        x_dtype = tensor_meta(x).dtype
        source = x if x_dtype == torch.float32 else graph.call_method("float", (x,))
        normed = graph.call_function(RMS_NORM, (source, _one_plus(gm, weight), eps))
        return (normed if x_dtype == torch.float32 else graph.call_method("type_as", (normed, x)),)


def _one_plus(gm: fx.GraphModule, weight: fx.Node) -> fx.Node:
    """`1.0 + weight.float()`: a new constant when the weight is one, else the same two ops."""
    value = constant_tensor(gm, weight)
    if value is None:
        return gm.graph.call_function(operator.add, (1.0, gm.graph.call_method("float", (weight,))))
    with torch.no_grad():
        folded = 1.0 + value.detach().float()
    return gm.graph.get_attr(add_constant(gm, f"{constant_name(weight)}_plus_one", folded))
