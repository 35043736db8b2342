"""The Triton decode attention (interpreted on CPU) against the native SDPA implementation:
random head layouts (GQA), ragged contexts, padding rows and the static (graph) layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime import attention
from runtime.forward_context import AttentionMetadata
from runtime.kernels import triton_kernels
from runtime.kv_cache import AttentionKind, AttentionSpec, allocate_kv_caches

pytestmark = pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")


def decode_layout(lengths: list[int], max_len: int, padding: int) -> AttentionMetadata:
    """One decode token per sequence; sequence b owns slots b*max_len .. and is len lengths[b]."""
    batch = len(lengths)
    tables = torch.arange(batch * max_len).view(batch, max_len)
    return AttentionMetadata(
        query_start_loc=tuple(range(batch + 1)), seq_lens=tuple(lengths),
        slot_mapping=_strided(torch.tensor([b * max_len + n - 1 for b, n in enumerate(lengths)])),
        slot_tables=tables)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """`x` as a view with stride 2, as a column sliced from a slot table is."""
    return torch.stack([x, x], dim=1)[:, 0]


@given(heads=st.sampled_from([(4, 4), (4, 2), (8, 1), (2, 2)]),
       head_size=st.sampled_from([8, 16, 24]),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       padding=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_decode_matches_native(heads: tuple[int, int], head_size: int, lengths: list[int],
                               padding: int, seed: int) -> None:
    torch.manual_seed(seed)
    num_heads, num_kv_heads = heads
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, head_size ** -0.5)
    max_len = max(lengths) + 3
    meta = decode_layout(lengths, max_len, padding)
    rows = len(lengths) + padding
    query = torch.randn(rows, num_heads * head_size)
    key = torch.randn(rows, num_kv_heads * head_size)
    value = torch.randn(rows, num_kv_heads * head_size)
    outputs = []
    history = torch.randn(len(lengths) * max_len, num_kv_heads, head_size)
    for impl in (attention.native_attention, attention.triton_attention):
        caches = allocate_kv_caches({"l": spec}, len(lengths) * max_len, 0, torch.float32, "cpu")
        caches["l"].key.copy_(history)
        caches["l"].value.copy_(history.flip(0))
        output = torch.full_like(query, float("nan"))
        impl(query, key, value, output, caches["l"], meta)
        outputs.append((output, caches["l"].key.clone(), caches["l"].value.clone()))
    (native, native_k, native_v), (triton, triton_k, triton_v) = outputs
    torch.testing.assert_close(triton, native, rtol=1e-4, atol=1e-5)
    assert torch.equal(triton_k, native_k) and torch.equal(triton_v, native_v)
    assert torch.all(triton[len(lengths):] == 0)  # padding rows are zeros


@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3), padding=st.integers(0, 2),
       cross=st.booleans(), seed=st.integers(0, 2**16))
def test_static_layout_reads_tensors_only(lengths: list[int], padding: int, cross: bool,
                                          seed: int) -> None:
    """A static decode layout: the host tuples describe every row as a 1-token sequence; the
    tensors (slot -1, length 0 on padding rows) decide, as they do in a replayed graph."""
    torch.manual_seed(seed)
    kind = AttentionKind.CROSS if cross else AttentionKind.DECODER
    spec = AttentionSpec(4, 2, 8, 0.3, kind)
    batch, rows, max_len = len(lengths), len(lengths) + padding, 24
    real = decode_layout(lengths, max_len, 0)
    if cross:  # cross-attention: the encoder side of the layout, nothing written
        real = AttentionMetadata(
            real.query_start_loc, real.seq_lens, real.slot_mapping, real.slot_tables,
            encoder_query_start_loc=(0,) * (batch + 1), encoder_seq_lens=tuple(lengths),
            encoder_slot_mapping=torch.empty(0, dtype=torch.long),
            encoder_slot_tables=real.slot_tables)
    lengths_buffer = torch.zeros(rows, dtype=torch.int32)
    lengths_buffer[:batch] = torch.tensor(lengths)
    slots_buffer = torch.full((rows,), -1, dtype=torch.long)
    slots_buffer[:batch] = real.slot_mapping
    tables_buffer = torch.zeros(rows, max_len, dtype=torch.long)
    tables_buffer[:batch] = real.slot_tables
    static = AttentionMetadata(
        query_start_loc=tuple(range(rows + 1)), seq_lens=(1,) * rows, slot_mapping=slots_buffer,
        slot_tables=tables_buffer, seq_lens_tensor=lengths_buffer,
        encoder_query_start_loc=(0,) * (rows + 1) if cross else None,
        encoder_seq_lens=(1,) * rows if cross else None,
        encoder_slot_mapping=torch.empty(0, dtype=torch.long) if cross else None,
        encoder_slot_tables=tables_buffer if cross else None,
        encoder_seq_lens_tensor=lengths_buffer if cross else None, static_decode=True)
    query, key, value = (torch.randn(rows, n * 8) for n in (4, 2, 2))
    history = torch.randn(batch * max_len, 2, 8)
    results = []
    for meta in (real, static):
        caches = allocate_kv_caches({"l": spec}, batch * max_len, batch * max_len, torch.float32,
                                    "cpu")
        caches["l"].key.copy_(history)
        caches["l"].value.copy_(-history)
        output = torch.zeros_like(query)
        attention.triton_attention(query, key, value, output, caches["l"], meta)
        results.append((output, caches["l"].key))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1][1], results[0][1])  # padding rows wrote no slot


def test_native_refuses_a_static_layout() -> None:
    spec = AttentionSpec(2, 2, 4, 0.5)
    caches = allocate_kv_caches({"l": spec}, 4, 0, torch.float32, "cpu")
    meta = AttentionMetadata((0, 1), (1,), torch.tensor([0]), torch.arange(4).view(1, 4),
                             static_decode=True)
    x = torch.randn(1, 8)
    with pytest.raises(attention.GraphUnsafeAttentionError, match="choose 'triton'"):
        attention.native_attention(x, x, x, torch.empty_like(x), caches["l"], meta)
