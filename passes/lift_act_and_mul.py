"""lift_act_and_mul: `act(gate) * up` over the two halves of one tensor becomes one op."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.nn.functional import gelu, silu

from passes.fx_utils import tensor_meta
from passes.patterns import Match, Pattern, PatternPass
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)

# What the pass matches: a gated MLP's `act(gate) * up` (either order), where gate and up are
# the halves of one projection: split by qkv_fuse, which runs first and fuses gate_proj and
# up_proj, or chunked by the model (Phi3's gate_up_proj). Activations as both front ends
# record them: F.silu with or without `inplace=False`, F.gelu exact or with `approximate`.
ACTIVATIONS: dict[str, Callable[..., Any]] = {
    "silu": lambda a, approximate: silu(a),
    "silu_module": lambda a, approximate: silu(a, inplace=False),
    "gelu": lambda a, approximate: gelu(a),
    "gelu_approximate": lambda a, approximate: gelu(a, approximate=approximate),
}
HALVES: dict[str, Callable[..., Any]] = {
    "split": lambda y, sizes: y.split(sizes, dim=-1),
    "chunk": lambda y, sizes: y.chunk(2, dim=-1),
}


def _pattern(halves: Callable[..., Any], act: Callable[..., Any], gate_first: bool) -> Any:
    def gated(y: Any, sizes: Any, approximate: Any) -> Any:
        parts = halves(y, sizes)
        activated = act(parts[0], approximate)
        return activated * parts[1] if gate_first else parts[1] * activated
    return gated


PATTERNS = tuple(
    Pattern.of(f"{act}/{halves}", _pattern(HALVES[halves], ACTIVATIONS[act], gate_first))
    for halves, act, gate_first in itertools.product(HALVES, ACTIVATIONS, (True, False)))
# What it writes: silu_and_mul(y) or gelu_and_mul(y, approximate), which read the gate from
# the first half of y's last dimension and up from the second, as the split does.
SILU_AND_MUL = torch.ops.fxkiln.silu_and_mul.default
GELU_AND_MUL = torch.ops.fxkiln.gelu_and_mul.default
GELU_APPROXIMATIONS = ("none", "tanh")


class LiftActAndMulPass(PatternPass):
    """Rewrites a gated MLP's activation and product into silu_and_mul or gelu_and_mul.

    Llama-family MLPs compute `act(gate_proj(x)) * up_proj(x)`: after qkv_fuse has joined the
    two projections, the activation, the product and the split are three kernels reading the
    projection's output; fxkiln's act-and-mul ops read it once. Only products of the two equal
    halves of one tensor's last dimension are rewritten; a product of two separate tensors is
    not a gate this op can compute without a copy, and is left alone.

    Before (the golden test's graph):
        gate_up_weight = self.gate_up.weight
        linear = torch._C._nn.linear(x, gate_up_weight, None)
        split = linear.split([16, 16], dim = -1)
        getitem = split[0]
        getitem_1 = split[1]
        silu = torch.nn.functional.silu(getitem, inplace = False)
        mul = silu * getitem_1
        return mul
    After:
        gate_up_weight = self.gate_up.weight
        linear = torch._C._nn.linear(x, gate_up_weight, None)
        silu_and_mul_default = torch.ops.fxkiln.silu_and_mul.default(linear)
        return silu_and_mul_default
    """

    name = "lift_act_and_mul"

    patterns = PATTERNS

    @staticmethod
    def applies(match: Match) -> bool:
        """y is a floating tensor whose last dim the split cuts into two equal halves, and a
        gelu's approximation is one the op knows."""
        y = tensor_meta(match.bindings["y"])
        if y is None or y.dim() == 0 or not y.dtype.is_floating_point:
            return False
        width = y.shape[-1]
        if not isinstance(width, int) or width % 2:
            return False
        if "sizes" in match.bindings and not _halves(match.bindings["sizes"], width):
            return False
        return match.bindings.get("approximate", "none") in GELU_APPROXIMATIONS

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> tuple[fx.Node] | None:
        if not self.applies(match):
            logger.debug("lift_act_and_mul: %s at %s left alone", match.pattern,
                         match.outputs[0].format_node())
            return None
        y = match.bindings["y"]
        if match.pattern.startswith("silu"):
            return (gm.graph.call_function(SILU_AND_MUL, (y,)),)
        approximate = match.bindings.get("approximate", "none")
        return (gm.graph.call_function(GELU_AND_MUL, (y, approximate)),)


def _halves(sizes: Any, width: int) -> bool:
    """`sizes` (a split's) are two literal halves of `width`."""
    return isinstance(sizes, (list, tuple)) and list(sizes) == [width // 2, width // 2]
