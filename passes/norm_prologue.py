"""Norm prologue: a norm read by one projection becomes that projection's prologue."""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import call_arg, node_val
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.norm_linear and add_norm_linear)
from runtime.registry import AUTO

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NormSpec:
    """A norm dispatch op: its name, the prologue it becomes, its arguments' names in order."""

    op: str
    norm: str                    # "rms" | "layer": fxkiln.norm_linear's `norm`
    arguments: tuple[str, ...]

    @property
    def has_residual(self) -> bool:
        return "residual" in self.arguments


# What the pass matches: a norm (either overload spelling) and the one fxkiln.linear reading
# its normalized output as x; with a residual, the output the graph reads on besides (the sum,
# or the normalized rows themselves, which a post-norm layer carries on as its residual).
NORM_SPECS = (
    NormSpec("rms_norm", "rms", ("x", "weight", "eps")),
    NormSpec("fused_add_rms_norm", "rms", ("x", "residual", "weight", "eps")),
    NormSpec("layer_norm", "layer", ("x", "weight", "bias", "eps")),
    NormSpec("fused_add_layer_norm", "layer", ("x", "residual", "weight", "bias", "eps")),
)
NORM_TARGETS: dict[Any, NormSpec] = {
    target: spec for spec in NORM_SPECS
    for target in (getattr(torch.ops.fxkiln, spec.op), getattr(torch.ops.fxkiln, spec.op).default)}
LINEAR_TARGETS = (torch.ops.fxkiln.linear, torch.ops.fxkiln.linear.default)
# What it writes: norm_linear(x, norm weight, norm bias, eps, norm, W, b, activation) in place of
# the projection, or add_norm_linear(x, residual, ..., activation, carry) and its two getitems.
NORM_LINEAR_OP = torch.ops.fxkiln.norm_linear.default
ADD_NORM_LINEAR_OP = torch.ops.fxkiln.add_norm_linear.default


@dataclass(frozen=True)
class Match:
    norm: fx.Node
    spec: NormSpec
    linear: fx.Node
    carry: str                   # "sum" | "normed": the rows the graph reads on
    carried: tuple[fx.Node, ...]  # getitems of the norm whose readers read them


class NormProloguePass(GraphPass):
    """Folds each norm (RMSNorm, LayerNorm; with the residual add before it or not) whose
    normalized output one `fxkiln.linear` reads into that projection, as its prologue.

    Every norm of a decoder layer feeds one projection: the fused QKV, the gate/up with its
    SiLU-and-mul, BART's cross-attention Q and fc1. At decode a norm is a launch of its own and
    a round trip of its output for a few KB of rows; the GEMV that reads it can normalize the
    rows itself (`runtime.kernels.triton_norm_linear`). A residual norm's other output stays in
    the graph: the sum x + residual for pre-norm layers (Llama), or, where the normalized rows
    are read again (post-norm layers such as BART's carry them on as the next residual), those
    rows. The fused ops' native twin is the norm op then the projection, so on devices where
    kernel choice picks native nothing changes. Left alone: a norm read by two projections or
    only by other ops, a norm whose output is returned, a norm both of whose outputs are read on,
    readers of the carried rows placed before the projection, and pairs whose parts
    `config.kernels` pins to an implementation while it leaves the fused op to "auto" (the
    choice asked for is kept). Runs after linear_epilogue, before kernel_choice.

    Before (the golden test's graph):
        fused_add_rms_norm_default = torch.ops.fxkiln.fused_add_rms_norm.default(x, residual, norm_weight, 1e-06)
        getitem = fused_add_rms_norm_default[0]
        getitem_1 = fused_add_rms_norm_default[1]
        linear = torch.ops.fxkiln.linear(getitem, gate_up, None, 'silu_and_mul')
        add = linear + getitem_1
        return add
    After:
        add_norm_linear_default = torch.ops.fxkiln.add_norm_linear.default(x, residual, norm_weight, None, 1e-06, 'rms', gate_up, None, 'silu_and_mul', 'sum')
        getitem_2 = add_norm_linear_default[0]
        getitem_3 = add_norm_linear_default[1]
        add = getitem_2 + getitem_3
        return add
    """

    name = "norm_prologue"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        order = {node: index for index, node in enumerate(gm.graph.nodes)}
        matches = 0
        for node in list(gm.graph.nodes):
            match = self.applies(node, order)
            if match is None:
                continue
            fused = _rewrite(gm.graph, match)
            logger.debug("norm_prologue: %s", fused.format_node())
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    def applies(self, node: fx.Node, order: dict[fx.Node, int]) -> Match | None:
        """The match if `node` is a norm whose normalized output one projection reads as x."""
        spec = _norm_spec(node)
        if spec is None or self._pinned_apart(spec):
            return None
        if not spec.has_residual:
            linear = _only_projection(node, node.users)
            return None if linear is None else Match(node, spec, linear, "sum", ())
        items = {0: [], 1: []}
        for user in node.users:
            index = user.args[1] if user.target is operator.getitem else None
            if index not in items:
                return None
            items[index].append(user)
        readers = [reader for item in items[0] for reader in item.users]
        linear = _only_projection(None, readers)
        if linear is None:
            return None
        normed_read_on = [reader for reader in readers if reader is not linear]
        summed_read_on = [reader for item in items[1] for reader in item.users]
        if normed_read_on and summed_read_on:
            return None
        carry = "normed" if normed_read_on else "sum"
        carried_readers = normed_read_on or summed_read_on
        if any(reader.op == "output" or order.get(reader, -1) <= order[linear]
               for reader in carried_readers):
            return None
        return Match(node, spec, linear, carry, tuple(items[0 if normed_read_on else 1]))

    def _pinned_apart(self, spec: NormSpec) -> bool:
        """`config.kernels` pins the norm's or the projection's kernel but not the fused op's."""
        kernels = self.context.kernels
        fused = "add_norm_linear" if spec.has_residual else "norm_linear"
        pinned = [kernels.get(op, AUTO) != AUTO for op in (spec.op, "linear")]
        return any(pinned) and kernels.get(fused, AUTO) == AUTO


def _norm_spec(node: fx.Node) -> NormSpec | None:
    if node.op != "call_function":
        return None
    try:
        return NORM_TARGETS.get(node.target)
    except TypeError:  # an unhashable target is no norm
        return None


def _only_projection(normed: fx.Node | None, readers: Any) -> fx.Node | None:
    """The projection among `readers` if it is the only one, reading the normalized rows as x
    and nothing else of them (`normed`: the node holding them; None: any getitem of them)."""
    readers = list(readers)
    projections = [reader for reader in readers if reader.op == "call_function"
                   and reader.target in LINEAR_TARGETS]
    if len(projections) != 1 or (normed is not None and len(readers) != 1):
        return None
    (linear,) = projections
    x = call_arg(linear, 0, ("x",))
    others = [call_arg(linear, index, (name,)) for index, name in ((1, "weight"), (2, "bias"))]
    if not isinstance(x, fx.Node) or x in others or (normed is not None and x is not normed):
        return None
    if normed is None and not (x.target is operator.getitem and x.args[1] == 0):
        return None
    return linear


def _rewrite(graph: fx.Graph, match: Match) -> fx.Node:
    """Write the fused op before the projection; return it."""
    norm, linear, spec = match.norm, match.linear, match.spec
    values = {name: call_arg(norm, index, (name,)) for index, name in enumerate(spec.arguments)}
    projection = tuple(call_arg(linear, index, (name,), default) for index, name, default in
                       ((1, "weight", None), (2, "bias", None), (3, "activation", "none")))
    prologue = (values["weight"], values.get("bias"), values["eps"], spec.norm, *projection)
    with graph.inserting_before(linear):
        if not spec.has_residual:
            fused = graph.call_function(NORM_LINEAR_OP, (values["x"], *prologue))
            out = fused
        else:
            fused = graph.call_function(ADD_NORM_LINEAR_OP,
                                        (values["x"], values["residual"], *prologue, match.carry))
            out = graph.call_function(operator.getitem, (fused, 0))
            carried_value = None
            if match.carried:  # the getitem of the carried rows, if the graph reads them
                carried = graph.call_function(operator.getitem, (fused, 1))
                carried.meta.update(match.carried[0].meta)
                carried_value = node_val(carried)
                for item in match.carried:
                    item.replace_all_uses_with(carried)
            fused.meta["val"] = (node_val(linear), carried_value)
    out.meta.update(linear.meta)
    linear.replace_all_uses_with(out)
    graph.erase_node(linear)
    for item in list(norm.users):
        graph.erase_node(item)
    graph.erase_node(norm)
    return fused
