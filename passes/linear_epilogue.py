"""Linear epilogue: projections become `fxkiln.linear` dispatch ops, carrying their activation."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import LINEAR_FUNCTIONS, call_arg, node_val
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.linear)
from runtime.registry import kernel_implementations

logger = logging.getLogger(__name__)

# What the pass matches: a projection, F.linear(x, W, b), and the activation that is its only
# reader, if any (by target; GELU by its `approximate` argument too).
GELU_TARGETS = (F.gelu, torch._C._nn.gelu)
GELU_EPILOGUES = {"none": "gelu", "tanh": "gelu_tanh"}
SILU_AND_MUL_TARGETS = (torch.ops.fxkiln.silu_and_mul, torch.ops.fxkiln.silu_and_mul.default,
                        *(impl.fn for impl in kernel_implementations("silu_and_mul").values()))
# What it writes: torch.ops.fxkiln.linear.default(x, W, b, epilogue) in place of the activation
# (or of the projection, when nothing is folded), with the replaced node's users and meta.
LINEAR_OP = torch.ops.fxkiln.linear.default


class LinearEpiloguePass(GraphPass):
    """Rewrites each projection into the `fxkiln.linear` dispatch op, folding in the activation
    that is its only reader (GELU, exact or tanh; SiLU-and-mul).

    A decode step multiplies a handful of rows by each weight: cuBLAS's GEMM tiles leave most
    of the device idle on such shapes, and the activation after each projection is one more
    launch and one more round trip of its output. As a dispatch op the projection gets a kernel
    chosen at compile time like every other op (the Triton one: a GEMV for up to a few rows, the
    bias and the activation in its epilogue, cuBLAS for more), so the pass runs after the passes
    that rewrite projections (qkv_split, qkv_fuse) and before kernel_choice.

    Before (the golden test's graph):
        linear = torch._C._nn.linear(x, fc1_weight, fc1_bias)
        gelu = torch._C._nn.gelu(linear)
        linear_1 = torch._C._nn.linear(gelu, fc2_weight, None)
        return linear_1
    After:
        linear_default = torch.ops.fxkiln.linear.default(x, fc1_weight, fc1_bias, 'gelu')
        linear_default_1 = torch.ops.fxkiln.linear.default(linear_default, fc2_weight, None, 'none')
        return linear_default_1
    """

    name = "linear_epilogue"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for node in list(gm.graph.nodes):
            match = self.applies(node)
            if match is None:
                continue
            x, weight, bias = match
            activation, epilogue = _folded_activation(node)
            replaced = activation if activation is not None else node
            with gm.graph.inserting_before(replaced):
                fused = gm.graph.call_function(LINEAR_OP, (x, weight, bias, epilogue))
            fused.meta.update(replaced.meta)
            replaced.replace_all_uses_with(fused)
            if activation is not None:
                gm.graph.erase_node(activation)
            gm.graph.erase_node(node)
            logger.debug("linear_epilogue: %s", fused.format_node())
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> tuple[Any, Any, Any] | None:
        """(input, weight, bias) if `node` is a projection of a tensor by a 2-D weight."""
        if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
            return None
        x, weight = call_arg(node, 0, ("input",)), call_arg(node, 1, ("weight",))
        bias = call_arg(node, 2, ("bias",))
        values = [node_val(arg) for arg in (x, weight)]
        if not all(isinstance(value, torch.Tensor) for value in values) or values[1].dim() != 2:
            return None
        return x, weight, bias


def _folded_activation(node: fx.Node) -> tuple[fx.Node | None, str]:
    """The projection's only reader and its epilogue name, if it is a foldable activation."""
    if len(node.users) != 1:
        return None, "none"
    (user,) = node.users
    if user.op != "call_function" or not user.args or user.args[0] is not node:
        return None, "none"
    if user.target in GELU_TARGETS and len(user.args) <= 2:
        epilogue = GELU_EPILOGUES.get(call_arg(user, 1, ("approximate",), "none"))
        return (user, epilogue) if epilogue is not None else (None, "none")
    if user.target in SILU_AND_MUL_TARGETS:
        return user, "silu_and_mul"
    return None, "none"
