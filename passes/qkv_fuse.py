"""qkv_fuse: projections of one input that belong together become one GEMM plus a split."""
from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterator

import torch
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import (
    Projection,
    add_constant,
    constant_name,
    constant_tensor,
    holds_tensor,
    projection_of,
)
from passes.writes import written_args

logger = logging.getLogger(__name__)

# What the pass matches: `linear(x, W_i, b_i)` nodes with compile-time constant weights that
# read the same `x` and form one run: computed one after another, before any of their results
# meets a tensor that does not come from them (an attention's Q, a mask, a residual). That is
# what separates layer i's K and V from layer i+1's, which read the same encoder output. A write
# into anything else also ends a run (the fused GEMM runs where the first projection did).
MIN_FUSED, MAX_FUSED = 2, 3
# What it writes: linear(x, cat(W_i), cat(b_i)) with the weights concatenated once, at compile
# time, into new parameters of the GraphModule; then split(out_i, dim=-1); each old projection's
# users read their part (a `view` of a part becomes `reshape`: a part is a strided column slice).


class QkvFusePass(GraphPass):
    """Fuses two or three projections of the same input into one projection and a split.

    The converse of qkv_split: where a model computes K and V of cross-attention (or Q, K and V
    of self-attention) with separate GEMMs over the same input, one GEMM over the concatenated
    weights reads the input once and launches one kernel instead of two or three. Missing biases
    become zeros in the fused bias. The weights are concatenated once, here; the originals stay
    with the model.

    Before (the golden test's graph):
        k_proj_weight = self.k_proj.weight
        linear = torch._C._nn.linear(encoder_out, k_proj_weight, None)
        view = linear.view(-1, 2, 4)
        v_proj_weight = self.v_proj.weight
        v_proj_bias = self.v_proj.bias
        linear_1 = torch._C._nn.linear(encoder_out, v_proj_weight, v_proj_bias)
        view_1 = linear_1.view(-1, 2, 4)
        add = view + view_1
    After:
        k_v_proj_weight = self.k_v_proj_weight
        k_v_proj_bias = self.k_v_proj_bias
        linear_2 = torch._C._nn.linear(encoder_out, k_v_proj_weight, k_v_proj_bias)
        split = linear_2.split([8, 8], dim = -1)
        getitem = split[0]
        getitem_1 = split[1]
        view = getitem.reshape(-1, 2, 4)
        view_1 = getitem_1.reshape(-1, 2, 4)
        add = view + view_1
    """

    name = "qkv_fuse"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for group in list(_runs_of_projections(gm)):
            if not self.applies(group):
                logger.debug("qkv_fuse: %d projections of %s left alone", len(group),
                             group[0].input.name)
                continue
            _fuse(gm, group)
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(group: list[Projection]) -> bool:
        """Two or three linears of one input with weights of one dtype, device and width."""
        if not MIN_FUSED <= len(group) <= MAX_FUSED:
            return False
        first = group[0]
        return all(_compatible(first, p) for p in group)


def _compatible(a: Projection, b: Projection) -> bool:
    wa, wb = a.weight_value, b.weight_value
    return (a.is_linear and b.is_linear and a.input is b.input and wa.shape[1] == wb.shape[1]
            and wa.dtype == wb.dtype and wa.device == wb.device
            and all(p.bias_value is None or (p.bias_value.dtype == wa.dtype and
                                             p.bias_value.shape == (p.out_features,))
                    for p in (a, b)))


def _runs_of_projections(gm: fx.GraphModule) -> Iterator[list[Projection]]:
    by_input: dict[fx.Node, list[Projection]] = {}
    for node in gm.graph.nodes:
        projection = projection_of(gm, node)
        if projection is not None and projection.is_linear:
            by_input.setdefault(projection.input, []).append(projection)
    for projections in by_input.values():
        if len(projections) >= MIN_FUSED:
            yield from _runs(gm, projections)


def _runs(gm: fx.GraphModule, projections: list[Projection]) -> Iterator[list[Projection]]:
    """Split projections of one input (in graph order) where their results meet other data.

    Walking the graph from the first projection, `reached` holds the projections of the current
    run and every node computed from them; a node that combines a reached tensor with a tensor
    from elsewhere (not a constant) ends the run.
    """
    members = {p.node: p for p in projections}
    run: list[Projection] = []
    reached: set[fx.Node] = set()
    node: fx.Node | None = projections[0].node
    while node is not None:
        if node in members:
            if run and not _compatible(run[0], members[node]):
                yield run
                run, reached = [], set()
            run.append(members[node])
            reached.add(node)
        elif run and any(written not in reached for written in written_args(node)):
            yield run  # a later projection may read what this node writes: it cannot move up
            run, reached = [], set()
        elif run:
            tensors = [a for a in node.all_input_nodes if holds_tensor(a)]
            if any(a in reached for a in tensors):
                reached.add(node)
                if any(a not in reached and constant_tensor(gm, a) is None for a in tensors):
                    yield run
                    run, reached = [], set()
        if node is projections[-1].node:
            break  # the last projection ends the last run; what follows cannot split it
        node = node.next
    if run:
        yield run


def _fuse(gm: fx.GraphModule, group: list[Projection]) -> None:
    graph, first = gm.graph, group[0]
    weights = [p.weight_value.detach() for p in group]
    sizes = [p.out_features for p in group]
    with torch.no_grad():
        weight = torch.cat(weights, dim=0)  # (sum of out features, in features)
        bias = None
        if any(p.bias_value is not None for p in group):
            bias = torch.cat([p.bias_value.detach() if p.bias_value is not None else
                              weights[0].new_zeros(p.out_features) for p in group])
    name = _fused_name([constant_name(p.weight) for p in group])
    with graph.inserting_before(first.node):
        args: tuple[object, ...] = (first.input,
                                    graph.get_attr(add_constant(gm, name, weight, parameter=True)))
        if bias is not None:
            bias_name = ("bias".join(name.rsplit("weight", 1)) if "weight" in name
                         else f"{name}_bias")
            args = (*args, graph.get_attr(add_constant(gm, bias_name, bias, parameter=True)))
        fused = graph.call_function(first.node.target, args)
        split = graph.call_method("split", (fused, sizes), {"dim": -1})
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for projection, part in zip(group, parts):
        for user in projection.node.users:
            _view_to_reshape(user)
        projection.node.replace_all_uses_with(part)
        graph.erase_node(projection.node)
        for constant in (projection.weight, projection.bias):
            if constant is not None and constant.op == "get_attr" and not constant.users:
                graph.erase_node(constant)
    logger.debug("qkv_fuse: %d projections of %s fused into %s", len(group), first.input.name,
                 name)


def _view_to_reshape(node: fx.Node) -> None:
    """A part of the fused output is a strided column slice: `view` may not apply to it."""
    shape_args = node.args[1:]
    if any(isinstance(a, torch.dtype) for a in shape_args):
        return
    if node.op == "call_method" and node.target == "view":
        node.target = "reshape"
    elif node.op == "call_function" and node.target is torch.Tensor.view:
        node.target = torch.Tensor.reshape


def _fused_name(names: list[str]) -> str:
    """"a.k_proj.weight" and "a.v_proj.weight" give "a.k_v_proj.weight"."""
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middles = [n[len(prefix):len(n) - len(suffix)] for n in names]
    return prefix + "_".join(m for m in middles if m) + suffix
