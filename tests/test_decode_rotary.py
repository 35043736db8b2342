"""RoPE inside the decode attention kernel (`launch_decode(..., rotary)`): the query group
rotated on load, the new key rotated before it is used and written to the cache. Against the
native rotary followed by native attention, neox and interleaved layouts, partial rotary
dimensions, GQA groups, split counts and both combine forms."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import attention
from runtime.forward_context import AttentionMetadata, Rotary
from runtime.kernels import native, triton_kernels
from runtime.kv_cache import AttentionSpec, allocate_kv_caches
from tests.kernels.helpers import TOLERANCES, cos_sin_cache

if attention.decode_attention is not None:
    from runtime.kernels import decode_attention
    from runtime.kernels.decode_attention import DecodePlan

pytestmark = pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")


def _layout(lengths: list[int], max_len: int) -> AttentionMetadata:
    batch = len(lengths)
    return AttentionMetadata(tuple(range(batch + 1)), tuple(lengths),
                             torch.tensor([b * max_len + n - 1 for b, n in enumerate(lengths)]),
                             torch.arange(batch * max_len).view(batch, max_len))


@settings(max_examples=10)
@given(group=st.sampled_from([1, 2, 4]), head_size=st.sampled_from([16, 24]),
       rotary_fraction=st.sampled_from([1.0, 0.5]), is_neox=st.booleans(),
       lengths=st.lists(st.integers(1, 30), min_size=1, max_size=2),
       splits=st.integers(1, 3), fuse_reduce=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_rotary_in_the_kernel_matches_native_rotary_then_attention(
        group: int, head_size: int, rotary_fraction: float, is_neox: bool, lengths: list[int],
        splits: int, fuse_reduce: bool, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    spec = AttentionSpec(2 * group, 2, head_size, head_size ** -0.5)
    batch, max_len = len(lengths), max(lengths) + 2
    meta = _layout(lengths, max_len)
    rotary_dim = int(head_size * rotary_fraction) // 2 * 2
    table = cos_sin_cache(64, rotary_dim)
    positions = torch.tensor([n - 1 + 3 * b for b, n in enumerate(lengths)])  # any positions
    query = torch.randn(batch, spec.num_heads * head_size).to(dtype)
    key, value = (torch.randn(batch, 2 * head_size).to(dtype) for _ in range(2))
    history = torch.randn(batch * max_len, 2, head_size).to(dtype)
    caches = []
    for _ in range(2):
        cache = allocate_kv_caches({"l": spec}, batch * max_len, 0, dtype, "cpu")["l"]
        cache.key.copy_(history)
        cache.value.copy_(-history)
        caches.append(cache)
    expected = torch.empty_like(query)
    rotated_query, rotated_key = native.rotary_embedding(positions, query, key, table,
                                                         head_size, is_neox)
    attention.native_attention(rotated_query, rotated_key, value, expected, caches[0], meta)
    output = torch.full_like(query, float("nan"))
    plan = DecodePlan(splits, 8, 2, max(16, triton_kernels._next_power_of_2(group)),
                      max(16, triton_kernels._next_power_of_2(head_size)), True, fuse_reduce)
    decode_attention.launch_decode(query, key, value, output, caches[1], meta.slot_tables,
                                   meta.device_seq_lens(), meta.slot_mapping, batch, plan,
                                   Rotary(positions, table, is_neox))
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(output, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(caches[1].key, caches[0].key, rtol=rtol, atol=atol)
    assert torch.equal(caches[1].value, caches[0].value)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [64, 128])  # Llama-1B, Llama-8B
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_in_the_kernel_on_gpu(head_size: int, batch: int, is_neox: bool) -> None:
    """The device's own plan (split, combined in-kernel) in bfloat16 against the rotary kernel
    followed by the same attention launch without rotary."""
    from tests.kernels.helpers import GPU_TOLERANCES

    spec = AttentionSpec(32, 8, head_size, head_size ** -0.5)
    generator = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 2049, (batch,), generator=generator).tolist()
    max_len = max(lengths) + 2
    meta = _layout(lengths, max_len)
    tables, slots = meta.slot_tables.cuda(), meta.slot_mapping.cuda()
    seq_lens = meta.device_seq_lens().cuda()
    table = cos_sin_cache(4096, head_size).cuda()
    positions = (torch.tensor(lengths) - 1).cuda()
    dtype = torch.bfloat16
    query = torch.randn(batch, 32 * head_size, device="cuda", dtype=dtype)
    key, value = (torch.randn(batch, 8 * head_size, device="cuda", dtype=dtype)
                  for _ in range(2))
    history = torch.randn(batch * max_len, 8, head_size, device="cuda", dtype=dtype)
    plan = decode_attention.decode_plan(spec, batch, triton_kernels.device_processors(
        torch.device("cuda")))
    outputs, caches = [], []
    for fold in (False, True):
        cache = allocate_kv_caches({"l": spec}, batch * max_len, 0, dtype, "cuda")["l"]
        cache.key.copy_(history)
        cache.value.copy_(-history)
        rotary = Rotary(positions, table, is_neox)
        q, k = (query, key) if fold else decode_attention.rotate(query, key, rotary, head_size)
        output = torch.full_like(query, float("nan"))
        decode_attention.launch_decode(q, k, value, output, cache, tables, seq_lens, slots,
                                       batch, plan, rotary if fold else None)
        outputs.append(output)
        caches.append(cache)
    rtol, atol = GPU_TOLERANCES[dtype]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(caches[1].key, caches[0].key, rtol=rtol, atol=atol)
