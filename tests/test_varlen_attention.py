"""The variable-length Triton attention (interpreted on CPU) against native attention: steps
of many sequences, each bringing any number of new tokens over any cached prefix (prefill,
chunked prefill, mixed with decode tokens), for decoder, cross and encoder attention, GQA,
padding rows; the cache holds the same K/V afterwards."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime import attention
from runtime.forward_context import AttentionMetadata
from runtime.kernels import triton_kernels
from runtime.kv_cache import AttentionKind, AttentionSpec, allocate_kv_caches

pytestmark = pytest.mark.skipif(
    attention.varlen_attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                          torch.float32),
    reason="needs Triton (interpreted on CPU)")


def mixed_step(cached: list[int], new: list[int], encoder_lens: list[int], encoder_step: list[bool],
               device: str = "cpu") -> AttentionMetadata:
    """Sequence i has cached[i] tokens and brings new[i]; it owns slots from i * 80 on (and
    encoder slots from i * 80); encoder_step[i]: it brings its encoder tokens this step."""
    num = len(new)
    tables = (torch.arange(num)[:, None] * 80 + torch.arange(80)[None, :]).to(device)
    slots = torch.cat([tables[i, c:c + n] for i, (c, n) in enumerate(zip(cached, new))])
    encoder_counts = [n if step else 0 for n, step in zip(encoder_lens, encoder_step)]
    encoder_slots = torch.cat([tables[i, :n] for i, n in enumerate(encoder_counts)])
    return AttentionMetadata(
        query_start_loc=tuple(itertools.accumulate(new, initial=0)),
        seq_lens=tuple(c + n for c, n in zip(cached, new)), slot_mapping=slots,
        slot_tables=tables, encoder_query_start_loc=tuple(itertools.accumulate(encoder_counts,
                                                                                initial=0)),
        encoder_seq_lens=tuple(encoder_lens), encoder_slot_mapping=encoder_slots,
        encoder_slot_tables=tables)


def run_both(spec: AttentionSpec, meta: AttentionMetadata, rows: int, key_rows: int,
             seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
             ) -> list[tuple[torch.Tensor, ...]]:
    """(output, key cache, value cache) of native and triton attention on the same inputs and
    the same cache contents (a random history in every slot)."""
    generator = torch.Generator().manual_seed(seed)
    width, kv_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    query, key, value = randn(rows, width), randn(key_rows, kv_width), randn(key_rows, kv_width)
    history = randn(meta.slot_tables.numel(), spec.num_kv_heads, spec.head_size)
    results = []
    for impl in (attention.native_attention, attention.triton_attention):
        caches = allocate_kv_caches({"l": spec}, history.shape[0], history.shape[0], dtype, device)
        if caches["l"].key is not None:
            caches["l"].key.copy_(history)
            caches["l"].value.copy_(history.flip(0))
        output = torch.full_like(query, float("nan"))
        impl(query, key, value, output, caches["l"], meta)
        results.append((output, caches["l"].key, caches["l"].value))
    return results


@pytest.mark.slow
@given(heads=st.sampled_from([(4, 4), (4, 2), (6, 1), (2, 2)]),
       head_size=st.sampled_from([8, 16, 24]),
       sequences=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 70)), min_size=1,
                          max_size=3).map(lambda s: [(min(c, 79 - n), n) for c, n in s]),
       kind=st.sampled_from(list(AttentionKind)), padding=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_varlen_matches_native(heads: tuple[int, int], head_size: int,
                               sequences: list[tuple[int, int]], kind: AttentionKind,
                               padding: int, seed: int) -> None:
    """Each sequence: `cached` tokens in the cache (a chunked prefix; 0 for a plain prefill)
    and `new` query tokens (1: a decode token among the chunks)."""
    spec = AttentionSpec(*heads, head_size, head_size ** -0.5, kind)
    cached, new = [c for c, _ in sequences], [n for _, n in sequences]
    encoder_lens = [c + n for c, n in sequences]  # cross/encoder: any lengths will do
    encoder_step = [c == 0 for c in cached]       # the sequences that start now bring them
    meta = mixed_step(cached, new, encoder_lens, encoder_step)
    if kind is AttentionKind.ENCODER:
        rows = key_rows = meta.num_actual_encoder_tokens + padding
    else:
        rows = meta.num_actual_tokens + padding
        key_rows = (meta.num_actual_encoder_tokens if kind is AttentionKind.CROSS
                    else meta.num_actual_tokens) + padding
    (native, native_k, native_v), (triton, triton_k, triton_v) = run_both(
        spec, meta, rows, key_rows, seed)
    torch.testing.assert_close(triton, native, rtol=1e-4, atol=1e-5)
    assert torch.all(triton[rows - padding:] == 0)  # padding rows are zeros
    if native_k is not None:
        assert torch.equal(triton_k, native_k) and torch.equal(triton_v, native_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(AttentionKind))
def test_varlen_matches_native_on_cuda(dtype: torch.dtype, kind: AttentionKind) -> None:
    """Llama-1B's head layout (32 query heads, 8 KV heads, head size 64) at prefill lengths:
    a 1024-token prompt, a 300-token chunk over a 700-token prefix, short ones, decode tokens."""
    sequences = [(0, 1024), (700, 300), (0, 5), (40, 1), (0, 77)]
    spec = AttentionSpec(32, 8, 64, 0.125, kind)
    cached, new = [c for c, _ in sequences], [n for _, n in sequences]
    tables_width = 1100
    num = len(new)
    tables = torch.arange(num)[:, None] * tables_width + torch.arange(tables_width)[None, :]
    encoder_lens = [c + n for c, n in sequences]
    encoder_counts = [n if c == 0 else 0 for n, c in zip(encoder_lens, cached)]
    meta = AttentionMetadata(
        query_start_loc=tuple(itertools.accumulate(new, initial=0)),
        seq_lens=tuple(encoder_lens),
        slot_mapping=torch.cat([tables[i, c:c + n] for i, (c, n) in enumerate(sequences)]).cuda(),
        slot_tables=tables.cuda(),
        encoder_query_start_loc=tuple(itertools.accumulate(encoder_counts, initial=0)),
        encoder_seq_lens=tuple(encoder_lens),
        encoder_slot_mapping=torch.cat([tables[i, :n]
                                        for i, n in enumerate(encoder_counts)]).cuda(),
        encoder_slot_tables=tables.cuda())
    if kind is AttentionKind.ENCODER:
        rows = key_rows = meta.num_actual_encoder_tokens
    else:
        rows = meta.num_actual_tokens
        key_rows = meta.num_actual_encoder_tokens if kind is AttentionKind.CROSS else rows
    (native, *_), (triton, *_) = run_both(spec, meta, rows + 3, key_rows + 3, 0, dtype, "cuda")
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2,
                                                                                atol=2e-2)
    torch.testing.assert_close(triton.float(), native.float(), **tolerance)
