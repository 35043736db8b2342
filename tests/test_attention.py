"""The attention op against dense attention computed by hand, its cache and padding contract,
and how it looks in a traced graph."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.layers import Attention
from runtime.forward_context import AttentionMetadata, set_forward_context
from runtime.kv_cache import AttentionKind, AttentionSpec, LayerKVCache, allocate_kv_caches
from tests.fx_helpers import attention_nodes, output_value, trace

LAYER = "layer"


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal: bool) -> torch.Tensor:
    """q (new, heads, d) over k, v (context, kv_heads, d), the new tokens being the last ones."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # (heads, new, context)
    if causal:
        new, context = q.shape[0], k.shape[0]
        allowed = torch.arange(context)[None, :] <= torch.arange(new)[:, None] + context - new
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()  # (new, heads, d)


def metadata(query_lens: list[int], seq_lens: list[int], max_len: int,
             encoder_lens: list[int] | None = None, encoder_step: bool = False) -> AttentionMetadata:
    """Sequence i keeps position p in slot i * max_len + p (encoder: i * max_len + p too)."""
    tables = torch.arange(len(seq_lens) * max_len).view(len(seq_lens), max_len)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    slots = torch.cat([tables[i, s - n:s] for i, (n, s) in enumerate(zip(query_lens, seq_lens))])
    extra = {}
    if encoder_lens is not None:
        enc_starts = [0]
        for n in encoder_lens:
            enc_starts.append(enc_starts[-1] + (n if encoder_step else 0))
        enc_slots = torch.cat([tables[i, :n] for i, n in enumerate(encoder_lens)]) \
            if encoder_step else torch.empty(0, dtype=torch.long)
        extra = dict(encoder_query_start_loc=tuple(enc_starts), encoder_seq_lens=tuple(encoder_lens),
                     encoder_slot_mapping=enc_slots, encoder_slot_tables=tables)
    return AttentionMetadata(query_start_loc=tuple(starts), seq_lens=tuple(seq_lens),
                             slot_mapping=slots, slot_tables=tables, **extra)


def run_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
           meta: AttentionMetadata) -> torch.Tensor:
    output = torch.full_like(q, float("nan"))
    with set_forward_context(meta, {LAYER: cache}):
        torch.ops.fxkiln.attention(q, k, v, output, LAYER)
    return output


@given(prompt_lens=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]),
       head_size=st.sampled_from([4, 8]), pad=st.integers(0, 3))
def test_decoder_prefill_then_decode_equals_dense_causal_attention(
        prompt_lens: list[int], kv_heads: int, group: int, head_size: int, pad: int) -> None:
    heads, max_len = kv_heads * group, max(prompt_lens) + 1
    spec = AttentionSpec(heads, kv_heads, head_size, scale=head_size ** -0.5)
    cache = allocate_kv_caches({LAYER: spec}, len(prompt_lens) * max_len, 0, torch.float32, "cpu")[LAYER]
    full_lens = [n + 1 for n in prompt_lens]  # each sequence: its prompt, then one decode token
    qs = [torch.randn(n, heads, head_size) for n in full_lens]
    ks = [torch.randn(n, kv_heads, head_size) for n in full_lens]
    vs = [torch.randn(n, kv_heads, head_size) for n in full_lens]

    def flat(parts: list[torch.Tensor], rows: slice, width: int) -> torch.Tensor:
        real = torch.cat([p[rows] for p in parts]).reshape(-1, width)
        return torch.cat([real, torch.randn(pad, width)])  # padding rows a runner may add

    prefill, decode = slice(0, -1), slice(-1, None)
    q_width, kv_width = heads * head_size, kv_heads * head_size
    out = run_op(flat(qs, prefill, q_width), flat(ks, prefill, kv_width), flat(vs, prefill, kv_width),
                 cache, metadata(prompt_lens, prompt_lens, max_len))
    expected = torch.cat([dense_attention(q[:-1], k[:-1], v[:-1], spec.scale, causal=True)
                          for q, k, v in zip(qs, ks, vs)]).reshape(-1, q_width)
    torch.testing.assert_close(out[:sum(prompt_lens)], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[sum(prompt_lens):], torch.zeros(pad, q_width))

    out = run_op(flat(qs, decode, q_width), flat(ks, decode, kv_width), flat(vs, decode, kv_width),
                 cache, metadata([1] * len(full_lens), full_lens, max_len))
    expected = torch.cat([dense_attention(q[-1:], k, v, spec.scale, causal=True)
                          for q, k, v in zip(qs, ks, vs)]).reshape(-1, q_width)
    torch.testing.assert_close(out[:len(full_lens)], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[len(full_lens):], torch.zeros(pad, q_width))


def test_padding_tokens_write_no_cache_slot() -> None:
    spec = AttentionSpec(2, 2, 4, scale=0.5)
    cache = allocate_kv_caches({LAYER: spec}, 8, 0, torch.float32, "cpu")[LAYER]
    assert cache.key is not None
    before = cache.key.clone()
    q, k, v = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)  # 3 real tokens, 2 padding
    run_op(q, k, v, cache, metadata([3], [3], max_len=8))
    written = (cache.key != before).any(dim=(1, 2))
    assert written.tolist() == [True, True, True] + [False] * 5
    torch.testing.assert_close(cache.key[:3], k[:3].view(3, 2, 4))


def test_cross_attention_caches_encoder_kv_once_then_reads_it_with_no_encoder_rows() -> None:
    spec = AttentionSpec(4, 2, 4, scale=0.3, kind=AttentionKind.CROSS)
    encoder_lens, max_len = [3, 5], 6
    cache = allocate_kv_caches({LAYER: spec}, 0, 2 * max_len, torch.float32, "cpu")[LAYER]
    ks = [torch.randn(n, 2, 4) for n in encoder_lens]
    vs = [torch.randn(n, 2, 4) for n in encoder_lens]
    pad = torch.randn(2, 8)
    key = torch.cat([torch.cat(ks).view(-1, 8), pad])
    value = torch.cat([torch.cat(vs).view(-1, 8), pad])
    q_first = torch.randn(2, 4, 4)
    out = run_op(q_first.view(2, 16), key, value, cache,
                 metadata([1, 1], [1, 1], max_len, encoder_lens, encoder_step=True))
    expected = torch.cat([dense_attention(q_first[i:i + 1], ks[i], vs[i], 0.3, causal=False)
                          for i in range(2)])
    torch.testing.assert_close(out, expected.view(2, 16), atol=1e-5, rtol=1e-5)

    q_next = torch.randn(2, 4, 4)
    empty = torch.empty(0, 8)
    out = run_op(q_next.view(2, 16), empty, empty, cache,
                 metadata([1, 1], [2, 2], max_len, encoder_lens, encoder_step=False))
    expected = torch.cat([dense_attention(q_next[i:i + 1], ks[i], vs[i], 0.3, causal=False)
                          for i in range(2)])
    torch.testing.assert_close(out, expected.view(2, 16), atol=1e-5, rtol=1e-5)


def test_encoder_attention_is_bidirectional_within_each_sequence() -> None:
    spec = AttentionSpec(2, 2, 4, scale=0.5, kind=AttentionKind.ENCODER)
    cache = allocate_kv_caches({LAYER: spec}, 0, 0, torch.float32, "cpu")[LAYER]
    assert cache.key is None
    lens = [2, 3]
    q, k, v = (torch.randn(5, 2, 4) for _ in range(3))
    padded = [torch.cat([t.view(5, 8), torch.randn(1, 8)]) for t in (q, k, v)]
    out = run_op(*padded, cache, metadata([1, 1], [1, 1], 4, lens, encoder_step=True))
    expected = torch.cat([dense_attention(q[s], k[s], v[s], 0.5, causal=False)
                          for s in (slice(0, 2), slice(2, 5))]).view(5, 8)
    torch.testing.assert_close(out[:5], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[5:], torch.zeros(1, 8))


def test_op_outside_a_forward_context_or_for_an_unknown_layer_raises() -> None:
    x = torch.randn(1, 8)
    with pytest.raises(RuntimeError, match="outside set_forward_context"):
        torch.ops.fxkiln.attention(x, x, x, torch.empty_like(x), LAYER)
    with set_forward_context(metadata([1], [1], 2), {}):
        with pytest.raises(LookupError, match="'nope'"):
            torch.ops.fxkiln.attention(x, x, x, torch.empty_like(x), "nope")


def test_metadata_with_inconsistent_lengths_is_refused() -> None:
    tables = torch.arange(8).view(2, 4)
    with pytest.raises(ValueError, match="slot_mapping"):
        AttentionMetadata((0, 2, 3), (2, 1), torch.arange(2), tables)
    with pytest.raises(ValueError, match="sequence 1"):
        AttentionMetadata((0, 1, 4), (1, 2), torch.arange(4), tables)


def test_attention_layer_traces_to_one_op_node_that_survives_dead_code_elimination() -> None:
    layer = Attention(4, 8, 0.1, 2, layer_name="blocks.0.attn")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = layer

        def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return self.attn(q, kv, kv) * 2

    gm = trace(Block(), (torch.randn(3, 32), torch.randn(3, 16)))
    gm.graph.eliminate_dead_code()
    (node,) = attention_nodes(gm)
    assert node.args[4] == "blocks.0.attn"
    assert node.args[3].target is torch.empty_like  # the output buffer is allocated before the op
    assert output_value(gm).shape[1] == 32
