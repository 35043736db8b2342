"""view_sizes: a view's -1 standing for a static size is written out, so empty inputs work."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compiler.report import count_flops
from passes import PassContext
from passes.view_sizes import ViewSizesPass
from tests.fx_helpers import graph_body
from tests.serving_graphs import example_inputs, serving_graph


class HeadsView(nn.Module):
    """HF's `k_proj(x).view(1, tokens, -1, head_size)`, and a flatten whose -1 is the tokens."""

    def __init__(self, heads: int = 4, head_size: int = 8) -> None:
        super().__init__()
        self.head_size = head_size
        self.embed = nn.Embedding(11, heads * head_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[0]
        x = self.embed(input_ids[None])                                   # (1, T, hidden)
        heads = x.view(1, tokens, -1, self.head_size).transpose(1, 2)     # (1, heads, T, hd)
        return heads.transpose(1, 2).reshape(-1, x.shape[-1])             # (T, hidden)


def rewrite(module: nn.Module):
    gm = serving_graph(module, example_inputs(5, vocab=11))
    return gm, ViewSizesPass(PassContext())(gm)


def test_golden() -> None:
    gm, result = rewrite(HeadsView())
    gm.graph.lint()
    assert result.matches == 1
    assert graph_body(gm) == """\
getattr_1 = input_ids.shape
getitem = getattr_1[0]
getitem_1 = input_ids[None]
embed_weight = self.embed.weight
embedding = torch.nn.functional.embedding(getitem_1, embed_weight, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False)
view = embedding.view(1, getitem, 4, 8)
transpose = view.transpose(1, 2)
transpose_1 = transpose.transpose(1, 2)
getattr_2 = embedding.shape
getitem_2 = getattr_2[-1]
reshape = transpose_1.reshape(-1, getitem_2)
return reshape"""


def test_op_counts() -> None:
    """One -1 is static (the heads) and written out; the other is the token count and stays."""
    gm, result = rewrite(HeadsView())
    minus_ones = [node for node in gm.graph.nodes
                  if node.target in ("view", "reshape") and -1 in node.args[1:]]
    assert result.matches == 1 and [node.target for node in minus_ones] == ["reshape"]


def test_symbolic_inferred_size_is_kept() -> None:
    """Must not rewrite: `reshape(-1, hidden)` whose -1 is the (symbolic) token count."""

    class Flatten(nn.Module):
        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return input_ids[None].reshape(-1, 1)

    gm, result = rewrite(Flatten())
    assert (result.matches, result.modified) == (0, False)


@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 4), head_size=st.sampled_from([2, 8]), tokens=st.integers(0, 7))
def test_written_out_views_equal_eager_and_take_empty_inputs(heads: int, head_size: int,
                                                             tokens: int) -> None:
    """Equal to the module at any token count, zero included (where the module's own -1 view
    fails); idempotent; FLOPs unchanged."""
    module = HeadsView(heads, head_size)
    gm, _ = rewrite(module)
    inputs = (torch.randint(0, 11, (tokens,)), torch.arange(tokens))
    out = gm(*inputs)
    assert out.shape == (tokens, heads * head_size)
    if tokens:
        torch.testing.assert_close(out, module(*inputs))
        assert count_flops(gm, inputs) == count_flops(module, inputs)
    assert ViewSizesPass(PassContext())(gm).matches == 0
