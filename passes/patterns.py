"""Subgraph patterns for the lifting passes: an idiom is written as a small Python function,
traced into a pattern graph, found with torch.fx's SubgraphMatcher and rewritten match by match.

A pattern function's parameters are its wildcards. Each binds a graph node or a literal
argument of the matched nodes (an `eps`, a dtype, a split's sizes), so values that vary between
models stay out of the pattern while every other literal must be equal. SubgraphMatcher keeps
only self-contained matches: apart from what the pattern returns, no matched node is read from
outside the match. What the pattern returns is what a rewrite replaces.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from passes.base import GraphPass, PassResult
from passes.fx_utils import is_impure

logger = logging.getLogger(__name__)

# Python-level functionals that both front ends record as one call of the function itself
# (tracing into them would record what they call instead).
RECORDED_AS_CALLS = (F.silu,)


@dataclass(frozen=True)
class Pattern:
    """One spelling of an idiom, named for the models that spell it so (say "llama")."""

    name: str
    graph: fx.Graph
    built_with: Mapping[str, Any] = field(default_factory=dict)  # literals `fn` was made from

    @classmethod
    def of(cls, name: str, fn: Callable[..., Any], **built_with: Any) -> Pattern:
        """`fn` traced; parameters it does not use (variants of one family share a signature)
        are dropped, since SubgraphMatcher must bind every placeholder."""
        graph = fx.Tracer(autowrap_functions=RECORDED_AS_CALLS).trace(fn)
        for node in list(graph.nodes):
            if node.op == "placeholder" and not node.users:
                graph.erase_node(node)
        return cls(name, graph, built_with)


@dataclass(frozen=True)
class Match:
    """Where a pattern matched: its parameters' bindings and the graph nodes it returns."""

    pattern: str
    built_with: Mapping[str, Any]  # the literals the matched pattern was made from
    bindings: dict[str, Any]       # parameter name -> graph node or literal
    outputs: tuple[fx.Node, ...]   # what the pattern returns, in its order
    nodes: tuple[fx.Node, ...]     # every matched node that is not a binding


# A rewrite gets a match (bindings resolved through the rewrites before it) and returns the
# values that replace its outputs, in order, or None to leave the match alone. The driver
# sets the insertion point: new nodes go right before the output that comes last.
Rewrite = Callable[[Match], Sequence[fx.Node] | None]


def find_matches(graph: fx.Graph, pattern: Pattern) -> list[Match]:
    """Self-contained, non-overlapping matches of `pattern` in `graph`, in graph order."""
    matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False,
                              remove_overlapping_matches=True, ignore_literals=False)
    order = {node: index for index, node in enumerate(graph.nodes)}
    matches = [_match(pattern, found) for found in matcher.match(graph)]
    return sorted(matches, key=lambda m: max(order[node] for node in m.outputs))


def _match(pattern: Pattern, found: InternalMatch) -> Match:
    bindings = {str(p.target): found.nodes_map[p] for p in pattern.graph.nodes
                if p.op == "placeholder"}
    nodes = tuple(g for p, g in found.nodes_map.items() if p.op not in ("placeholder", "output"))
    return Match(pattern.name, pattern.built_with, bindings, tuple(found.returning_nodes), nodes)


def rewrite_matches(gm: fx.GraphModule, patterns: Iterable[Pattern], rewrite: Rewrite) -> int:
    """Rewrite every match of each pattern in turn; return how many were rewritten.

    Matches of a pattern are found once, after the rewrites of the patterns before it, so a
    binding may name a node that an earlier rewrite replaced; it is resolved to its
    replacement. New nodes take the meta of the outputs they replace (the same values), and
    matched nodes, bound nodes (not inputs) and new outputs that are left without readers are
    erased.
    """
    replaced: dict[fx.Node, fx.Node] = {}
    bound: list[fx.Node] = []  # erased at the end if left unread: later matches may bind them
    rewritten = 0
    for pattern in patterns:
        for found in find_matches(gm.graph, pattern):
            match = dataclasses.replace(
                found, bindings={k: _resolve(v, replaced) for k, v in found.bindings.items()})
            last = _last_output(gm.graph, match)
            if last is None:
                logger.debug("%s: an output is read before the match ends; left alone",
                             pattern.name)
                continue
            with gm.graph.inserting_before(last):
                new = rewrite(match)
            if new is None:
                continue
            for old, value in zip(match.outputs, new, strict=True):
                value.meta.update(old.meta)
                old.replace_all_uses_with(value)
                replaced[old] = value
            _erase_unread(gm.graph, match.nodes)
            _erase_unread(gm.graph, [v for v in new if not is_impure(v)])  # (a sum nobody read)
            bound += [v for v in match.bindings.values() if _erasable(v) and v not in bound]
            rewritten += 1
    _erase_unread(gm.graph, bound)
    return rewritten


class PatternPass(GraphPass):
    """A pass that rewrites the matches of its `patterns`: subclasses give the patterns and
    `_rewrite(gm, match)` (the new output nodes, or None to leave the match alone)."""

    patterns: tuple[Pattern, ...] = ()

    def patterns_for(self, gm: fx.GraphModule) -> Iterable[Pattern]:
        return self.patterns

    def _rewrite(self, gm: fx.GraphModule, match: Match) -> Sequence[fx.Node] | None:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = rewrite_matches(gm, self.patterns_for(gm),
                                  lambda match: self._rewrite(gm, match))
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)


def _resolve(value: Any, replaced: dict[fx.Node, fx.Node]) -> Any:
    while isinstance(value, fx.Node) and value in replaced:
        value = replaced[value]
    return value


def _last_output(graph: fx.Graph, match: Match) -> fx.Node | None:
    """The output last in graph order, where the replacement goes; None if an output is read
    from outside the match before that point (the replacement would come too late for it)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    last = max(match.outputs, key=order.__getitem__)
    matched = set(match.nodes)
    early = [user for node in match.outputs for user in node.users
             if user not in matched and order[user] < order[last]]
    return None if early else last


def _erasable(value: Any) -> bool:
    """A bound node the rewrite may leave unread that is no input and writes nothing
    (a weight's get_attr, a `x.dtype`)."""
    return isinstance(value, fx.Node) and value.op in ("get_attr", "call_function",
                                                       "call_method") and not is_impure(value)


def _erase_unread(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    """Erase those of `nodes` still in `graph` that nothing reads, readers first."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted((n for n in nodes if n in order), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
