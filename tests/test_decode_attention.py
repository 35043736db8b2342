"""The Triton decode attention (interpreted on CPU) against the native SDPA implementation:
random head layouts (GQA), ragged contexts, padding rows and the static (graph) layout; the
grouped split kernel under explicit launch plans (splits, blocks, fused cache write)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime import attention
from runtime.forward_context import AttentionMetadata
from runtime.kernels import triton_kernels
from runtime.kv_cache import AttentionKind, AttentionSpec, LayerKVCache, allocate_kv_caches
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES

if attention.decode_attention is not None:
    from runtime.kernels.decode_attention import DecodePlan, DecodeTuning, decode_plan

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


def _caches(spec: AttentionSpec, history: torch.Tensor, dtype: torch.dtype,
            device: str) -> LayerKVCache:
    cache = allocate_kv_caches({"l": spec}, history.shape[0], 0, dtype, device)["l"]
    cache.key.copy_(history)
    cache.value.copy_(history.flip(0) * 0.5)
    return cache


def _against_native(spec: AttentionSpec, lengths: list[int], plan: object, dtype: torch.dtype,
                    device: str, tolerances: dict) -> None:
    """The split kernel with `plan` against native attention: outputs and written caches."""
    from runtime.kernels import decode_attention

    batch, max_len = len(lengths), max(lengths) + 5
    meta = decode_layout(lengths, max_len, 0)
    meta = AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.slot_mapping.to(device),
                             meta.slot_tables.to(device))
    width, kv_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    query = torch.randn(batch, width, device=device).to(dtype)
    qkv = torch.randn(batch, 2 * kv_width + 3, device=device).to(dtype)  # strided key, value
    key, value = qkv[:, :kv_width], qkv[:, kv_width:2 * kv_width]
    history = torch.randn(batch * max_len, spec.num_kv_heads, spec.head_size, device=device)
    expected_cache = _caches(spec, history.to(dtype), dtype, device)
    expected = torch.full_like(query, float("nan"))
    attention.native_attention(query, key, value, expected, expected_cache, meta)
    cache = _caches(spec, history.to(dtype), dtype, device)
    output = torch.full_like(query, float("nan"))
    slots = meta.slot_mapping
    if not plan.fuse_write:
        decode_attention.write_kv(cache, key, value, slots)
        slots = None
    decode_attention.launch_decode(query, key, value, output, cache, meta.slot_tables,
                                   meta.device_seq_lens(), slots, batch, plan)
    rtol, atol = tolerances[dtype]
    torch.testing.assert_close(output, expected, rtol=rtol, atol=atol)
    assert torch.equal(cache.key, expected_cache.key)
    assert torch.equal(cache.value, expected_cache.value)


@given(heads=st.sampled_from([(4, 4), (4, 1), (8, 2), (6, 3)]),
       head_size=st.sampled_from([8, 16, 24]),
       lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       splits=st.integers(1, 5), block_n=st.sampled_from([16, 32]), fuse=st.booleans(),
       narrow=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_split_grouped_kernel_matches_native(heads: tuple[int, int], head_size: int,
                                             lengths: list[int], splits: int, block_n: int,
                                             fuse: bool, narrow: bool, dtype: torch.dtype,
                                             seed: int) -> None:
    """Any number of splits (more than a short context needs, too), block size, group size
    (padded to 16 query rows or not), with the cache write in the kernel or before it: native's
    output and cache."""
    torch.manual_seed(seed)
    spec = AttentionSpec(heads[0], heads[1], head_size, head_size ** -0.5)
    block_g = triton_kernels._next_power_of_2(heads[0] // heads[1])
    block_g = block_g if narrow else max(16, block_g)
    block_d = max(16, triton_kernels._next_power_of_2(head_size))
    plan = DecodePlan(splits, block_n, 2, block_g, block_d, fuse)
    _against_native(spec, lengths, plan, dtype, "cpu", TOLERANCES)


def test_plan_splits_small_batches_over_the_device_and_is_fixed_per_shape() -> None:
    spec = AttentionSpec(32, 8, 64, 0.125)
    tuning = DecodeTuning(block_n=64, num_warps=4, programs_per_processor=2, max_splits=32)
    one = decode_plan(spec, 1, 132, tuning)
    assert one.splits == 32                                 # 264 programs wanted: capped
    assert decode_plan(spec, 8, 132, tuning).splits == 4    # 64 programs: 4 splits, 256 of 264
    assert decode_plan(spec, 64, 132, tuning).splits == 1   # 512 programs: no split, no reduce
    assert one.block_g == 16 and one.block_d == 64          # group 4 padded for tl.dot
    assert decode_plan(spec, 1, 132, tuning) is one         # one plan per launch shape
    bart = AttentionSpec(16, 16, 64, 0.125, AttentionKind.CROSS)
    assert decode_plan(bart, 1, 132, tuning).splits == 16   # 16 KV heads: 256 programs


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 8, 64), (32, 8, 128), (16, 16, 64)])  # 1B, 8B, BART
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_kernel_matches_native_on_gpu(shape: tuple[int, int, int], batch: int) -> None:
    heads, kv_heads, head_size = shape
    spec = AttentionSpec(heads, kv_heads, head_size, head_size ** -0.5)
    generator = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 2049, (batch,), generator=generator).tolist()
    for dtype in (torch.bfloat16, torch.float32):
        for processors in (132, 8):  # the plan of this batch, and one with fewer splits
            plan = decode_plan(spec, batch, processors)
            _against_native(spec, lengths, plan, dtype, "cuda", GPU_TOLERANCES)
