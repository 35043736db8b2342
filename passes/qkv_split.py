"""qkv_split: a projection whose output is read only in part computes only the rows read."""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.node import map_arg

from passes.base import GraphPass, PassResult
from passes.feature_reads import (
    FeatureRead,
    Range,
    feature_read,
    keeps_features,
    resized_view_args,
    shifted_index,
)
from passes.fx_utils import (
    Projection,
    add_constant,
    call_arg,
    constant_name,
    live_nodes,
    projection_of,
)

logger = logging.getLogger(__name__)

# What the pass matches: a projection (`fx_utils.projection_of`: linear, x @ W, x @ W.t()) whose
# output reaches every reader through views that keep the feature (last) dimension whole, where
# every reader takes parts of the feature dimension and some features are never read.
# (the readers: feature_reads.FEATURE_READERS).
# What it writes: one projection per maximal range of features read, over a zero-copy view of
# those weight rows (and bias entries), with the views and readers replayed on it.


@dataclass
class SplitMatch:
    projection: Projection
    reads: list[FeatureRead]
    ranges: list[Range]           # maximal feature ranges read, in order
    owned: list[fx.Node]          # nodes between the projection and its readers, readers included


class QkvSplitPass(GraphPass):
    """Narrows projections whose output is partly thrown away to the weight rows that are read.

    Encoder-decoder models with one fused QKV projection for cross-attention run it on the
    decoder stream only to keep Q (2/3 of the GEMM wasted, every decode step) and on the encoder
    stream only to keep K and V (1/3 wasted). Found from the graph's structure alone, both calls
    become projections onto the rows they read: a Q projection and a KV projection. Row ranges
    come from the graph (the local shard under tensor parallelism); narrowed weights and biases
    are zero-copy views registered on the GraphModule.

    Before (the golden test's graph, a cross-attention block):
        linear = torch._C._nn.linear(x, qkv_proj_weight, qkv_proj_bias)
        split = linear.split([8, 8, 8], dim = -1)
        getitem = split[0]
        getitem_1 = split[1]
        getitem_2 = split[2]
        linear_1 = torch._C._nn.linear(encoder_out, qkv_proj_weight, qkv_proj_bias)
        split_1 = linear_1.split([8, 8, 8], dim = -1)
        getitem_3 = split_1[0]
        getitem_4 = split_1[1]
        getitem_5 = split_1[2]
        view = getitem.view(-1, 2, 4)
        view_1 = getitem_4.view(-1, 2, 4)
        view_2 = getitem_5.view(-1, 2, 4)
    After:
        qkv_proj_weight_out_0_8 = self.qkv_proj_weight_out_0_8
        qkv_proj_bias_out_0_8 = self.qkv_proj_bias_out_0_8
        linear_2 = torch._C._nn.linear(x, qkv_proj_weight_out_0_8, qkv_proj_bias_out_0_8)
        qkv_proj_weight_out_8_24 = self.qkv_proj_weight_out_8_24
        qkv_proj_bias_out_8_24 = self.qkv_proj_bias_out_8_24
        linear_3 = torch._C._nn.linear(encoder_out, qkv_proj_weight_out_8_24, qkv_proj_bias_out_8_24)
        split_2 = linear_3.split([8, 8], dim = -1)
        getitem_6 = split_2[0]
        getitem_7 = split_2[1]
        view = linear_2.view(-1, 2, 4)
        view_1 = getitem_6.view(-1, 2, 4)
        view_2 = getitem_7.view(-1, 2, 4)
    """

    name = "qkv_split"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        live = live_nodes(gm.graph)
        matches = 0
        for node in list(gm.graph.nodes):
            match = self.applies(gm, node, live)
            if match is None:
                continue
            logger.debug("qkv_split: %s reads features %s of %d", node.format_node(),
                         match.ranges, match.projection.out_features)
            _rewrite(gm, match)
            matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(gm: fx.GraphModule, node: fx.Node, live: set[fx.Node]) -> SplitMatch | None:
        """The match if `node` is a projection of which some output features are never read."""
        projection = projection_of(gm, node)
        if projection is None or projection.out_features == 0:
            return None
        reads: list[FeatureRead] = []
        owned: list[fx.Node] = []
        if not _collect_reads(node, (), projection.out_features, live, reads, owned):
            return None
        read_ranges = [read.parts[i] for read in reads for i in read.used]
        ranges = _merge(read_ranges)
        if not ranges or ranges == [(0, projection.out_features)]:
            return None  # nothing read (dead code: cleanup's job) or everything read
        return SplitMatch(projection, reads, ranges, owned)


def _collect_reads(node: fx.Node, views: tuple[fx.Node, ...], features: int, live: set[fx.Node],
                   reads: list[FeatureRead], owned: list[fx.Node]) -> bool:
    """Fill `reads` with the readers of `node`; False if some user reads all features."""
    for user in node.users:
        owned.append(user)
        if user not in live:
            owned.extend(_descendants(user))
            continue
        if keeps_features(user, node, features):
            if not _collect_reads(user, (*views, user), features, live, reads, owned):
                return False
            continue
        read = feature_read(user, views, features, live)
        if read is None:
            return False
        reads.append(read)
        for getitem in user.users if read.kind == "split" else ():
            owned.append(getitem)
            owned.extend(_descendants(getitem) if getitem not in live else ())
    return True


def _descendants(node: fx.Node) -> list[fx.Node]:
    found: dict[fx.Node, None] = {}
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user not in found:
            found[user] = None
            stack.extend(user.users)
    return list(found)


def _merge(ranges: list[Range]) -> list[Range]:
    merged: list[Range] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def _rewrite(gm: fx.GraphModule, match: SplitMatch) -> None:
    graph, projection = gm.graph, match.projection
    with graph.inserting_before(projection.node):
        narrowed = {r: _narrowed_projection(gm, projection, r) for r in match.ranges}
    replayed: dict[tuple[fx.Node, Range], fx.Node] = {}

    def base(read: FeatureRead, span: Range) -> fx.Node:
        source = narrowed[span]
        for view in read.views:
            if (view, span) not in replayed:
                args = resized_view_args(view, source, span[1] - span[0])
                with graph.inserting_after(view):
                    replayed[view, span] = graph.create_node(view.op, view.target, args,
                                                             dict(view.kwargs))
            source = replayed[view, span]
        return source

    for read in match.reads:
        for span in match.ranges:
            parts = {i: p for i, p in read.used_parts() if span[0] <= p[0] and p[1] <= span[1]}
            if parts:
                _replace_reader(graph, read, span, base(read, span), parts)
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted({projection.node, *match.owned}, key=position.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
    for constant in (projection.transpose, projection.weight, projection.bias):
        if constant is not None and not constant.users and constant.op == "get_attr":
            graph.erase_node(constant)


def _narrowed_projection(gm: fx.GraphModule, projection: Projection, span: Range) -> fx.Node:
    graph = gm.graph
    start, length = span[0], span[1] - span[0]
    with torch.no_grad():
        rows = projection.weight_value.detach().narrow(projection.rows_dim, start, length)
    weight_name = f"{constant_name(projection.weight)}_out_{span[0]}_{span[1]}"
    mapping = {projection.weight: graph.get_attr(add_constant(gm, weight_name, rows))}
    if projection.transpose is not None:
        mapping[projection.transpose] = graph.create_node(
            projection.transpose.op, projection.transpose.target,
            map_arg(projection.transpose.args, lambda a: mapping.get(a, a)),
            dict(projection.transpose.kwargs))
    if projection.bias is not None and projection.bias_value is not None:
        entries = projection.bias_value.detach().narrow(0, start, length)
        bias_name = f"{constant_name(projection.bias)}_out_{span[0]}_{span[1]}"
        mapping[projection.bias] = graph.get_attr(add_constant(gm, bias_name, entries))
    node = projection.node
    return graph.create_node(node.op, node.target, map_arg(node.args, lambda a: mapping.get(a, a)),
                             map_arg(node.kwargs, lambda a: mapping.get(a, a)))


def _replace_reader(graph: fx.Graph, read: FeatureRead, span: Range, base: fx.Node,
                    parts: dict[int, Range]) -> None:
    """Make the nodes standing for `parts` (all inside `span`) read from `base` instead."""
    reader = read.reader
    if read.kind == "split":
        pieces = [(max(a, span[0]), min(b, span[1])) for a, b in read.parts]
        pieces = [p for p in pieces if p[1] > p[0]]
        split = None
        if len(pieces) > 1:
            sizes = [b - a for a, b in pieces]
            with graph.inserting_after(reader):
                split = graph.call_method("split", (base, sizes),
                                          {"dim": call_arg(reader, 2, ("dim",), 0)})
        anchor = split
        for index, part in sorted(parts.items()):
            replacement = base
            if split is not None and anchor is not None:
                with graph.inserting_after(anchor):
                    replacement = anchor = graph.call_function(operator.getitem,
                                                               (split, pieces.index(part)))
            for getitem in read.used[index]:
                getitem.replace_all_uses_with(replacement)
        return
    ((start, stop),) = parts.values()
    replacement: fx.Node | None = None
    with graph.inserting_after(reader):
        if read.kind == "narrow" and (start, stop) != span:
            dim = call_arg(reader, 1, ("dim",))
            replacement = graph.create_node(reader.op, reader.target,
                                            (base, dim, start - span[0], stop - start))
        elif read.kind == "slice":
            index = shifted_index(reader.args[1], span, start, stop)
            if index is not None:
                replacement = graph.call_function(operator.getitem, (base, index))
    reader.replace_all_uses_with(replacement if replacement is not None else base)
