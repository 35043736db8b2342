"""Kernel choice: every dispatch op becomes a direct call of the implementation chosen for it."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import constant_tensor, node_val
import runtime.attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
from runtime.ops import DISPATCH_OPS
from runtime.registry import AUTO, KernelImpl, choose_kernel

logger = logging.getLogger(__name__)

# What the pass matches: calls of the dispatch ops, as an overload or as the overload packet.
MATCHED_TARGETS: dict[Any, str] = {
    target: op
    for op in DISPATCH_OPS
    for target in (getattr(torch.ops.fxkiln, op), getattr(torch.ops.fxkiln, op).default)
}
# The attention op keeps its node (it is the splitting op); the pass writes the implementation
# it chose into the node's `implementation` argument.
ATTENTION_TARGETS = frozenset({torch.ops.fxkiln.attention, torch.ops.fxkiln.attention.default})
# What it writes: call_function(impl.fn, (*op args, *impl launch constants)), same users and meta.
KERNELS_META_KEY = "fxkiln_kernels"  # gm.meta[KEY]: op name -> chosen implementation name


class KernelChoicePass(GraphPass):
    """Rewrites each `torch.ops.fxkiln.*` dispatch op into a call of the chosen implementation.

    A dispatch op's eager implementation looks up the active kernel settings on every call: about
    a microsecond each, hundreds of times per token. This pass makes that choice once, from the
    context (`kernels[op]`, else "auto": the highest-priority implementation that supports the
    device and the node's dtype), and writes a call of that implementation with its launch
    constants (block sizes, warps; eps stays the constant it was) into the graph. The rewritten
    graph holds no dispatch op and reads no settings at run time. The attention op is the one
    exception to the rewrite: it must stay in the graph (the runtime splits there), so the pass
    writes the chosen implementation's name into its `implementation` argument instead, e.g.
        torch.ops.fxkiln.attention(q, k, v, out, 'layers.0.attn', 'triton')
    Choices are recorded in
    `gm.meta["fxkiln_kernels"]` (op name -> implementation name) for the report.

    Before (the golden test's graph):
        weight = self.weight
        rms_norm = torch.ops.fxkiln.rms_norm(x, weight, 1e-06);  x = weight = None
        silu_and_mul_default = torch.ops.fxkiln.silu_and_mul.default(rms_norm);  rms_norm = None
        return silu_and_mul_default
    After, with kernels={"rms_norm": "triton"} on CPU (block 64, 1 warp; silu_and_mul "auto"):
        weight = self.weight
        rms_norm_1 = runtime_kernels_triton_kernels_rms_norm(x, weight, 1e-06, 64, 1);  x = weight = None
        silu_and_mul = runtime_kernels_native_silu_and_mul(rms_norm_1);  rms_norm_1 = None
        return silu_and_mul
    """

    name = "kernel_choice"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chosen: dict[str, set[str]] = {}
        matches = 0
        for node in list(gm.graph.nodes):
            op = self.applies(node)
            if op is None:
                continue
            if op == "attention":  # the splitting op stays; the choice becomes its argument
                impl = self._choose(node.args[0].meta["val"] if isinstance(node.args[0], fx.Node)
                                    else None, node, op)
                args = _positional_args(node, op)  # a folded rotary (positions on) stays
                node.args = (*args[:5], impl.name, *(args[6:] if args[6] is not None else ()))
                node.kwargs = {}
                chosen.setdefault(op, set()).add(impl.name)
                matches += 1
                continue
            impl = self._choose(node_val(node), node, op)
            args = _positional_args(node, op)
            constants = _launch_constants(gm, node, impl, args)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(impl.fn, (*args, *constants))
            call.meta.update(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            logger.debug("kernel_choice: %s -> %s %s", op, impl.name, call.format_node())
            chosen.setdefault(op, set()).add(impl.name)
            matches += 1
        if matches:
            gm.recompile()
        recorded = dict(gm.meta.get(KERNELS_META_KEY, {}))
        recorded.update({op: ",".join(sorted(names)) for op, names in chosen.items()})
        gm.meta[KERNELS_META_KEY] = recorded
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> str | None:
        """The dispatch op's name if `node` calls one, else None."""
        if node.op != "call_function":
            return None
        try:
            if node.target in ATTENTION_TARGETS:
                return "attention"
            return MATCHED_TARGETS.get(node.target)
        except TypeError:  # an unhashable target is no dispatch op
            return None

    def _choose(self, value: Any, node: fx.Node, op: str) -> KernelImpl:
        example = value[0] if isinstance(value, (tuple, list)) and value else value
        if not isinstance(example, torch.Tensor):
            raise ValueError(f"kernel_choice: expected node.meta['val'] to hold the output tensor "
                             f"(run shape propagation first), found {type(value).__name__} on "
                             f"node {node.format_node()}")
        requested = self.context.kernels.get(op, AUTO)
        try:
            return choose_kernel(op, requested, self.context.device, example.dtype)
        except ValueError as error:
            raise ValueError(f"kernel_choice: {error} (config kernels[{op!r}] = {requested!r}, "
                             f"at node {node.format_node()})") from None


def _positional_args(node: fx.Node, op: str) -> tuple[Any, ...]:
    """The node's arguments in schema order, keyword arguments and defaults filled in."""
    overload = getattr(torch.ops.fxkiln, op).default
    args = list(node.args)
    for argument in overload._schema.arguments[len(args):]:
        if argument.name in node.kwargs:
            args.append(node.kwargs[argument.name])
        elif argument.has_default_value():
            args.append(argument.default_value)
        else:
            raise ValueError(f"kernel_choice: expected argument {argument.name!r} of "
                             f"{overload}, found none at node {node.format_node()}")
    return tuple(args)


def _launch_constants(gm: fx.GraphModule, node: fx.Node, impl: KernelImpl,
                      args: tuple[Any, ...]) -> tuple[Any, ...]:
    if impl.launch_constants is None:
        return ()
    examples = tuple(_example(gm, node, arg) for arg in args)
    try:
        return tuple(impl.launch_constants(*examples))
    except ValueError as error:
        raise ValueError(f"kernel_choice: {error} (implementation {impl.name!r}, "
                         f"at node {node.format_node()})") from None


def _example(gm: fx.GraphModule, node: fx.Node, arg: Any) -> Any:
    """The value shape propagation saw for `arg` (a FakeTensor for a tensor node)."""
    if not isinstance(arg, fx.Node):
        return arg
    value = node_val(arg)
    if value is None:
        value = constant_tensor(gm, arg)
    if value is None:
        raise ValueError(f"kernel_choice: expected meta['val'] on argument {arg.name} "
                         f"(run shape propagation first), found none; at node {node.format_node()}")
    return value


def chosen_kernels(gm: fx.GraphModule) -> Mapping[str, str]:
    """What the pass chose for `gm`: op name -> implementation name."""
    return dict(gm.meta.get(KERNELS_META_KEY, {}))
