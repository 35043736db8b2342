"""lift_layer_norm: `F.layer_norm` over the last dim becomes `torch.ops.fxkiln.layer_norm`."""
from __future__ import annotations

import copy
import logging
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from passes.fx_utils import same_shape, tensor_meta
from passes.patterns import Match, Pattern, PatternPass
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)


# What the pass matches: the functional every `nn.LayerNorm` calls (BART, Whisper, GPT-2, ...),
# one call with the normalized shape as a literal; Dynamo records its arguments as passed
# (positional), symbolic_trace through `__torch_function__` (weight, bias and eps as keywords).
def _functional(x: Any, shape: Any, weight: Any, bias: Any, eps: Any) -> Any:
    return F.layer_norm(x, shape, weight, bias, eps)


def _positional(pattern: Pattern) -> Pattern:
    """`pattern` with the call's keyword arguments passed by position, in the signature's order."""
    graph = copy.deepcopy(pattern.graph)
    for node in graph.find_nodes(op="call_function", target=F.layer_norm):
        node.args = (*node.args, *(node.kwargs[k] for k in ("weight", "bias", "eps")))
        node.kwargs = {}
    return Pattern("dynamo", graph)


_TRACED = Pattern.of("symbolic_trace", _functional)
PATTERNS = (_positional(_TRACED), _TRACED)
# What it writes: layer_norm(x, weight, bias, eps), whose native kernel is that very call
# (`F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`): the same result, bit for bit.
LAYER_NORM = torch.ops.fxkiln.layer_norm.default


class LiftLayerNormPass(PatternPass):
    """Rewrites `F.layer_norm` over the last dimension into fxkiln's layer_norm.

    Hugging Face's encoder-decoder and GPT-style models normalize with `nn.LayerNorm`, which
    reaches the graph as `F.layer_norm`: as a dispatch op, kernel_choice gives it fxkiln's
    kernel, and lift_add_layer_norm can fuse the residual add before it into one kernel. Only
    norms over the last dimension with an affine weight of that width (a bias of that width or
    none) and a number for eps are lifted; the op has no other form.

    Before (the golden test's graph):
        layer_norm = torch.nn.functional.layer_norm(x, (8,), weight = weight, bias = bias, eps = 1e-05)
        return layer_norm
    After:
        layer_norm_default = torch.ops.fxkiln.layer_norm.default(x, weight, bias, 1e-05)
        return layer_norm_default
    """

    name = "lift_layer_norm"

    patterns = PATTERNS

    @staticmethod
    def applies(match: Match) -> bool:
        """Over the last dim of a floating tensor; weight (and any bias) of that width; eps a
        number."""
        x, shape, weight, bias, eps = (match.bindings[k]
                                       for k in ("x", "shape", "weight", "bias", "eps"))
        x_value, weight_value = tensor_meta(x), tensor_meta(weight)
        if x_value is None or weight_value is None or not x_value.dtype.is_floating_point:
            return False
        if x_value.dim() == 0 or not isinstance(eps, numbers.Real) or isinstance(eps, bool):
            return False
        width = tuple(x_value.shape[-1:])
        if not isinstance(shape, (tuple, list)) or not same_shape(tuple(shape), width):
            return False
        bias_value = None if bias is None else tensor_meta(bias)
        return same_shape(weight_value.shape, width) and (
            bias is None or (bias_value is not None and same_shape(bias_value.shape, width)))

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> tuple[fx.Node] | None:
        if not self.applies(match):
            logger.debug("lift_layer_norm: %s left alone", match.outputs[0].format_node())
            return None
        x, weight, bias, eps = (match.bindings[k] for k in ("x", "weight", "bias", "eps"))
        return (gm.graph.call_function(LAYER_NORM, (x, weight, bias, eps)),)
