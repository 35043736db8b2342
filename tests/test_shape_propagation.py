"""Shape propagation keeps the token count symbolic through the composite ops models project,
contract and attend with (matmul, linear): under torch 2.11 their C++ implementations read
concrete sizes and, unless propagated as Dynamo propagates (Python dispatcher), guard the
count to the example's, so that every pass after them sees one count."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compiler.capture import symbolic_propagator
from tests.fx_helpers import output_value, trace

IDIOMS = ("rotary", "projection", "scores")


class _TokenIdioms(nn.Module):
    """Over one sequence of `tokens` ids (batch 1, as HF serving graphs run):
    rotary's `inv_freq @ positions` (contracts a dim of size 1), a projection of
    (1, tokens, hidden), and attention scores `q @ k.T` of (1, heads, tokens, head_size)."""

    def __init__(self, idiom: str, heads: int, head_size: int) -> None:
        super().__init__()
        self.idiom, self.heads, self.head_size = idiom, heads, head_size
        hidden = heads * head_size
        self.inv_freq = nn.Parameter(torch.rand(head_size), requires_grad=False)
        self.embed = nn.Embedding(16, hidden)
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.idiom == "rotary":  # (1, head_size, 1) @ (1, 1, tokens)
            return self.inv_freq[None, :, None] @ ids[None, None, :].float()
        hidden = self.embed(ids)[None]  # (1, tokens, hidden)
        if self.idiom == "projection":
            return self.proj(hidden)
        q = self.proj(hidden).view(1, -1, self.heads, self.head_size).transpose(1, 2)
        return q @ q.transpose(2, 3)  # (1, heads, tokens, tokens)


@pytest.mark.parametrize("idiom", IDIOMS)
@settings(max_examples=4, deadline=None)
@given(tokens=st.integers(2, 12), other=st.integers(1, 12), heads=st.integers(1, 3),
       head_size=st.sampled_from([2, 4]))
def test_token_count_stays_a_symbol_through_matmul_and_linear(
        idiom: str, tokens: int, other: int, heads: int, head_size: int) -> None:
    """The output's token dims are the input's symbol, no guard fixed that symbol to a number,
    and the symbolic shape, read at another count, is the shape eager gives at that count."""
    module = _TokenIdioms(idiom, heads, head_size).eval()
    ids = torch.arange(tokens) % 16
    propagate = symbolic_propagator((ids,))
    gm = trace(module)
    propagate(gm)
    (symbol,) = gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0].node.expr \
        .free_symbols
    shape_env = propagate.fake_mode.shape_env
    assert symbol not in shape_env.replacements
    shape = output_value(gm).shape
    token_dims = [size for size in shape if isinstance(size, torch.SymInt)]
    assert token_dims and all(size.node.expr == symbol for size in token_dims)
    at_other = tuple(int(size.node.expr.xreplace({symbol: other}))
                     if isinstance(size, torch.SymInt) else size for size in shape)
    with torch.no_grad():
        assert at_other == tuple(module(torch.arange(other) % 16).shape)
