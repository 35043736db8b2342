"""cached_attention: HF-style attention over flattened tokens becomes fxkiln's cached op, masks
proven causal or full; what the op cannot express is refused, naming the node."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compiler.report import count_flops
from passes import PassContext
from passes.attention_match import UnsupportedAttentionError
from passes.cached_attention import SPECS_KEY, CachedAttentionPass
from runtime.kv_cache import AttentionKind, AttentionSpec
from tests.fx_helpers import graph_body, op_counts
from tests.serving_graphs import HFStyleDecoder, example_inputs, one_sequence, serving_graph


class OneAttention(nn.Module):
    """The golden graph: one GQA layer (2 heads over 1 KV head of 4) with HF's arange mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.kv_proj = nn.Linear(8, 4, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[0]
        x = self.embed(input_ids[None])                                  # (1, T, 8)
        q = self.q_proj(x).view(1, tokens, 2, 4).transpose(1, 2)         # (1, 2, T, 4)
        k = self.kv_proj(x).view(1, tokens, 1, 4).transpose(1, 2)        # (1, 1, T, 4)
        k = k[:, :, None, :, :].expand(1, 1, 2, tokens, 4).reshape(1, 2, tokens, 4)
        allowed = torch.arange(tokens)[None, :] <= torch.arange(tokens)[:, None]
        out = F.scaled_dot_product_attention(q, k, k, attn_mask=allowed[None, None], scale=0.5)
        return out.transpose(1, 2).reshape(tokens, 8)


def rewrite(module: nn.Module, tokens: int = 5, max_positions: int | None = 64):
    inputs = example_inputs(tokens, vocab=11)
    gm = serving_graph(module, inputs, max_positions)
    return gm, CachedAttentionPass(PassContext())(gm), inputs


def test_golden() -> None:
    torch.manual_seed(0)
    gm, result, _ = rewrite(OneAttention())
    gm.graph.lint()
    assert result.matches == 1
    assert graph_body(gm) == GOLDEN
    assert gm.meta[SPECS_KEY] == {"attention_0": AttentionSpec(2, 1, 4, 0.5,
                                                                AttentionKind.DECODER)}


GOLDEN = """\
getattr_1 = input_ids.shape
getitem = getattr_1[0]
getitem_1 = input_ids[None]
embed_weight = self.embed.weight
embedding = torch.nn.functional.embedding(getitem_1, embed_weight, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False)
q_proj_weight = self.q_proj.weight
linear = torch._C._nn.linear(embedding, q_proj_weight, None)
view = linear.view(1, getitem, 2, 4)
transpose = view.transpose(1, 2)
kv_proj_weight = self.kv_proj.weight
linear_1 = torch._C._nn.linear(embedding, kv_proj_weight, None)
view_1 = linear_1.view(1, getitem, 1, 4)
transpose_1 = view_1.transpose(1, 2)
transpose_3 = transpose.transpose(1, 2)
reshape_2 = transpose_3.reshape(-1, 8)
transpose_4 = transpose_1.transpose(1, 2)
reshape_3 = transpose_4.reshape(-1, 4)
empty_like = torch.empty_like(reshape_2)
attention_default = torch.ops.fxkiln.attention.default(reshape_2, reshape_3, reshape_3, empty_like, 'attention_0')
view_as = empty_like.view_as(transpose_3)
transpose_5 = view_as.transpose(1, 2)
transpose_2 = transpose_5.transpose(1, 2)
reshape_1 = transpose_2.reshape(getitem, 8)
return reshape_1"""


def test_op_counts() -> None:
    """Three layers sharing one mask: every SDPA and GQA repeat goes, one cached op per layer,
    and the mask subgraph (aranges, comparison, HF's `&` of mask terms) dies with them."""
    torch.manual_seed(0)
    module = HFStyleDecoder(layers=3)
    gm, result, _ = rewrite(module)
    before = op_counts(serving_graph(module, example_inputs(5)))
    after = op_counts(gm)
    assert result.matches == 3
    assert (before["scaled_dot_product_attention"], before["expand"], before["arange"]) == (3, 6, 2)
    assert after["scaled_dot_product_attention"] == after["expand"] == after["arange"] == 0
    assert before["and_"] == 1 and after["and_"] == after["le"] == 0  # `&` is no write
    assert after["attention.default"] == 3
    assert [spec.num_kv_heads for spec in gm.meta[SPECS_KEY].values()] == [2, 2, 2]


def test_router_softmax_is_not_attention() -> None:
    """Must not rewrite: a softmax over expert logits (a MoE router) that no value matrix
    multiplies is left alone, and a graph without attention is not modified."""

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.gate = nn.Linear(8, 4)

        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            weights = torch.softmax(self.gate(x), dim=-1)  # (tokens, experts)
            return weights.topk(2, dim=-1).values

    gm, result, _ = rewrite(Router())
    assert (result.matches, result.modified) == (0, False)
    assert op_counts(gm)["softmax"] == 1 and SPECS_KEY not in gm.meta


@pytest.mark.parametrize(("options", "reason"), [
    (dict(mask="sliding", window=4), "query 4 does not see key 0"),
    (dict(mask="bias"), "floating-point constant bias"),
    (dict(mask="ids_padding"), "reads the token ids"),
    (dict(mask="full"), "full attention of decoder queries over decoder keys"),
    (dict(form="softcap"), "call_function tanh on the scores"),
    (dict(form="eager", mask="bias"), "floating-point constant bias"),
])
def test_what_the_cached_op_cannot_express_is_refused(options: dict, reason: str) -> None:
    torch.manual_seed(0)
    module = HFStyleDecoder(**options)
    gm = serving_graph(module, example_inputs(5))
    before = graph_body(gm)
    with pytest.raises(UnsupportedAttentionError, match=reason) as error:
        CachedAttentionPass(PassContext())(gm)
    assert "cannot serve the attention at node %" in str(error.value)
    assert graph_body(gm) == before  # refused before anything was rewritten


def test_a_window_as_long_as_the_positions_served_is_causal() -> None:
    """A sliding window no shorter than the positions the model serves never masks anything;
    the same window with more positions served is refused."""
    torch.manual_seed(0)
    gm, result, _ = rewrite(HFStyleDecoder(mask="sliding", window=24), max_positions=24)
    assert result.matches == 1
    with pytest.raises(UnsupportedAttentionError, match="query 24 does not see key 0"):
        rewrite(HFStyleDecoder(mask="sliding", window=24), max_positions=64)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(kv_heads=st.integers(1, 3), groups=st.integers(1, 3), head_size=st.sampled_from([4, 8]),
       tokens=st.integers(1, 12), layers=st.integers(1, 2),
       variant=st.sampled_from([("sdpa", "repeat_kv", "causal"), ("sdpa", "enable_gqa", "causal"),
                                ("sdpa", "interleave", "is_causal"),
                                ("sdpa", "repeat_kv", "causal_additive"),
                                ("eager", "repeat_kv", "causal"),
                                ("eager", "interleave", "causal_additive")]),
       seed=st.integers(0, 99))
def test_rewritten_graph_over_a_fresh_cache_equals_eager(kv_heads: int, groups: int,
                                                         head_size: int, tokens: int, layers: int,
                                                         variant: tuple[str, str, str],
                                                         seed: int) -> None:
    """Any head counts, GQA groups, head sizes and token counts: one sequence through the
    rewritten graph (a prefill over fresh caches) equals the module; idempotent; FLOPs never
    go up (the cached op is not counted, the score matmuls go)."""
    form, gqa, mask = variant
    torch.manual_seed(seed)
    module = HFStyleDecoder(kv_heads * groups, kv_heads, head_size, form=form, gqa=gqa,
                            mask=mask, layers=layers).eval()
    gm = serving_graph(module, example_inputs(5))  # traced at 5 tokens, run at any count
    inputs = example_inputs(tokens, seed=seed)
    flops_before = count_flops(gm, inputs)
    result = CachedAttentionPass(PassContext())(gm)
    specs = gm.meta[SPECS_KEY]
    assert result.matches == layers and len(specs) == layers
    assert all(spec.num_kv_heads == kv_heads for spec in specs.values())
    with torch.no_grad(), one_sequence(specs, tokens):
        torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=1e-4, atol=1e-5)
        assert count_flops(gm, inputs) <= flops_before
    assert CachedAttentionPass(PassContext())(gm).matches == 0
