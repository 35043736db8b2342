"""runtime.split: pieces at splitting ops, consecutive ones together, the graph's results kept."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

from runtime.split import DEFAULT_SPLITTING_OPS, op_key, split_graph
from tests.runner_models import (HIDDEN, SPLITTING_OPS, TEST_OP, attention_stack_graph,
                                 causal_attention)


def _top_level_calls(split_module: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in split_module.graph.nodes if n.op == "call_module"]


def _targets(piece_module: fx.GraphModule) -> list[object]:
    return [n.target for n in piece_module.graph.nodes if n.op in ("call_function", "call_method",
                                                                   "call_module")]


def test_golden_attention_stack_alternates_captured_and_eager_pieces() -> None:
    gm = attention_stack_graph(layers=1)
    split = split_graph(gm, SPLITTING_OPS)
    split.split_module.graph.lint()
    assert [(p.name, p.is_splitting) for p in split.pieces] == [
        ("submod_0", False), ("submod_1", True), ("submod_2", False), ("submod_3", True),
        ("submod_4", False)]
    assert _top_level_calls(split.split_module) == [p.name for p in split.pieces]
    attention_op = torch.ops.fxkiln_test.causal_attention.default
    assert _targets(split.piece("submod_1").graph_module) == [attention_op]
    assert _targets(split.piece("submod_3").graph_module) == [F.scaled_dot_product_attention]
    assert split.piece("submod_1").captured is False and split.piece("submod_0").captured
    # The output buffer is allocated in the piece before the attention op and read after it.
    assert split.piece("submod_0").node_names[-1] == "empty_like"
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(split.split_module(x, 3), gm(x, 3))


def test_consecutive_splitting_ops_share_one_piece() -> None:
    def two_attentions(x: torch.Tensor) -> torch.Tensor:
        first = torch.empty_like(x)
        second = torch.empty_like(x)
        causal_attention(x, x, x, first)
        causal_attention(x, x, x, second)
        heads = x.view(1, 1, -1, HIDDEN)
        mixed = F.scaled_dot_product_attention(heads, heads, heads)
        return first + second + mixed.view(-1, HIDDEN)

    gm = fx.symbolic_trace(two_attentions)
    split = split_graph(gm, SPLITTING_OPS)
    assert [p.is_splitting for p in split.pieces] == [False, True, False, True, False]
    assert split.pieces[1].node_names == ("causal_attention_default", "causal_attention_default_1")
    assert split.pieces[3].node_names == ("scaled_dot_product_attention",)  # after a view
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(split.split_module(x), gm(x))


def test_adjacent_attention_and_sdpa_are_one_eager_piece() -> None:
    def adjacent(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        causal_attention(x, x, x, out)
        mixed = F.scaled_dot_product_attention(heads, heads, heads)
        return out.sum() + mixed.sum()

    split = split_graph(fx.symbolic_trace(adjacent), SPLITTING_OPS)
    assert [p.is_splitting for p in split.pieces] == [False, True, False]
    assert len(split.pieces[1].node_names) == 2


def test_graph_without_splitting_ops_is_one_captured_piece() -> None:
    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    split = split_graph(gm, ("fxkiln::attention", "not_registered::op"))  # no error for absent ops
    assert len(split.pieces) == 1 and split.pieces[0].captured
    x = torch.randn(4)
    torch.testing.assert_close(split.split_module(x), gm(x))


def test_default_splitting_ops_split_sdpa() -> None:
    def sdpa_only(q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q) + 1

    split = split_graph(fx.symbolic_trace(sdpa_only))
    assert [p.is_splitting for p in split.pieces] == [True, False]
    assert "fxkiln::attention" in DEFAULT_SPLITTING_OPS


@pytest.mark.parametrize("spec", [TEST_OP, torch.ops.fxkiln_test.causal_attention,
                                  torch.ops.fxkiln_test.causal_attention.default,
                                  causal_attention])
def test_every_spelling_of_an_op_matches_overloads_and_packets(spec: object) -> None:
    def both_spellings(x: torch.Tensor) -> torch.Tensor:
        a, b = torch.empty_like(x), torch.empty_like(x)
        causal_attention(x, x, x, a)                            # traced as the OpOverload
        x = x + 1
        torch.ops.fxkiln_test.causal_attention(x, x, x, b)     # traced as the packet
        return a + b

    gm = fx.symbolic_trace(both_spellings)
    split = split_graph(gm, [spec])
    assert sum(p.is_splitting for p in split.pieces) == 2


def test_op_key_rejects_a_name_without_namespace() -> None:
    with pytest.raises(ValueError, match="'namespace::op'"):
        op_key("attention")


def test_split_leaves_the_original_graph_intact() -> None:
    gm = attention_stack_graph(layers=1)
    before = str(gm.graph)
    split_graph(gm, SPLITTING_OPS)
    assert str(gm.graph) == before


LAYER_KINDS = st.sampled_from(["linear", "attention", "sdpa", "relu"])


def _layered_graph(kinds: list[str]) -> fx.GraphModule:
    """A straight-line graph of the given layers over x (tokens, HIDDEN)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    weight = graph.placeholder("weight")
    h = x
    for kind in kinds:
        if kind == "linear":
            h = graph.call_function(torch.matmul, (h, weight))
        elif kind == "relu":
            h = graph.call_function(torch.relu, (h,))
        elif kind == "attention":
            out = graph.call_function(torch.empty_like, (h,))
            graph.call_function(torch.ops.fxkiln_test.causal_attention.default, (h, h, h, out))
            h = out
        else:
            view = graph.call_method("view", (h, 1, 1, -1, HIDDEN))
            sdpa = graph.call_function(F.scaled_dot_product_attention, (view, view, view))
            h = graph.call_method("view", (sdpa, -1, HIDDEN))
    graph.output((h, graph.call_function(operator.mul, (h, 2))))
    return fx.GraphModule(torch.nn.Module(), graph)


@given(kinds=st.lists(LAYER_KINDS, min_size=1, max_size=8), tokens=st.integers(1, 6))
def test_property_split_keeps_results_and_alternates_piece_kinds(kinds: list[str],
                                                                 tokens: int) -> None:
    gm = _layered_graph(kinds)
    split = split_graph(gm, SPLITTING_OPS)
    split.split_module.graph.lint()
    flags = [p.is_splitting for p in split.pieces]
    assert all(a != b for a, b in zip(flags, flags[1:])), flags  # neighbours differ in kind
    splitting_keys = {op_key(op) for op in SPLITTING_OPS}
    for piece in split.pieces:
        calls = [n for n in piece.graph_module.graph.nodes if n.op == "call_function"]
        assert all((op_key(n.target) in splitting_keys) == piece.is_splitting for n in calls)
    # Each attention op has its empty_like before it and each SDPA its views around it, so in
    # these graphs no two splitting ops are adjacent: one eager piece per attention layer.
    assert sum(flags) == sum(kind in ("attention", "sdpa") for kind in kinds)
    x, weight = torch.randn(tokens, HIDDEN), torch.randn(HIDDEN, HIDDEN)
    torch.testing.assert_close(split.split_module(x, weight), gm(x, weight))
