"""cache_attention's Triton kernel against its native twin (repeat_kv + SDPA): on CPU under
TRITON_INTERPRET=1, and in bfloat16 on the GPU."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import runtime.ops  # noqa: F401  (registers the ops and implementations)
from runtime.kernels import triton_kernels
from runtime.registry import choose_kernel, kernel_implementations
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")
MASKS = ("bool", "additive", "none")


def attention_args(batch: int, kv_heads: int, group: int, cache_len: int, head_dim: int,
                   mask: str, dtype: torch.dtype, device: str, seed: int, queries: int = 1,
                   per_head: bool = False, dead_row: bool = True) -> tuple[Any, ...]:
    """query as Hugging Face's transposed (batch, heads, queries, head_dim) view, caches, a mask
    over the cache (per query head or broadcast over heads): each row attends a prefix of the
    cache past some left padding; the last row the whole cache and, with `dead_row` and more
    than one row, row 0 nothing (a fully masked row: every block masked); and SDPA's scale."""
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    query = randn(batch, queries, heads, head_dim).transpose(1, 2)
    key_cache, value_cache = (randn(batch, kv_heads, cache_len, head_dim) for _ in range(2))
    filled = torch.randint(1, cache_len + 1, (batch, heads if per_head else 1, 1, 1),
                           generator=generator)
    padding = (torch.rand(filled.shape, generator=generator) * filled).long()
    positions = torch.arange(cache_len)
    keep = (positions >= padding) & (positions < filled)
    keep[0] = keep[0] & (not dead_row)
    keep[-1] = True
    keep = keep.expand(batch, keep.shape[1], queries, cache_len).to(device)
    masks = {"bool": keep, "none": None,
             "additive": torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(
                 ~keep, float("-inf"))}
    return query, key_cache, value_cache, masks[mask], head_dim ** -0.5


def both(args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    triton, native = (kernel_implementations("cache_attention")[name] for name in
                      ("triton", "native"))
    return triton.fn(*triton.call_args(args)), native.fn(*args)


def check(args: tuple[Any, ...], tolerances: dict[torch.dtype, tuple[float, float]]) -> None:
    actual, expected = both(args)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = tolerances[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- CPU, interpreted --------------------------------------------------------------------------
@needs_interpreter
@settings(max_examples=12)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       cache_len=st.integers(1, 150), head_dim=st.sampled_from([8, 16, 24]),
       mask=st.sampled_from(MASKS), per_head=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_kernel_matches_the_twin(batch: int, kv_heads: int, group: int, cache_len: int,
                                 head_dim: int, mask: str, per_head: bool, dtype: torch.dtype,
                                 seed: int) -> None:
    check(attention_args(batch, kv_heads, group, cache_len, head_dim, mask, dtype, "cpu", seed,
                         per_head=per_head), TOLERANCES)


@needs_interpreter
@settings(max_examples=8)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       cache_len=st.integers(1, 150), mask=st.sampled_from(MASKS), data=st.data(),
       seed=st.integers(0, 2**16))
def test_update_writes_the_step_then_reads_it_as_index_copy_and_the_twin_do(
        batch: int, kv_heads: int, group: int, cache_len: int, mask: str, data: st.DataObject,
        seed: int) -> None:
    query, key_cache, value_cache, mask_value, scale = attention_args(
        batch, kv_heads, group, cache_len, 8, mask, torch.float32, "cpu", seed)
    position = torch.tensor([data.draw(st.integers(0, cache_len - 1), label="position")])
    new_key, new_value = (torch.randn(batch, kv_heads, 1, 8) for _ in range(2))
    triton, native = (kernel_implementations("cache_update_attention")[name] for name in
                      ("triton", "native"))
    caches = {name: (key_cache.clone(), value_cache.clone()) for name in ("triton", "native")}
    versions = [cache._version for cache in caches["triton"]]
    args = {name: (query, new_key, new_value, position, *caches[name], mask_value, scale)
            for name in caches}
    actual = triton.fn(*triton.call_args(args["triton"]))
    expected = native.fn(*args["native"])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for written, reference in zip(caches["triton"], caches["native"]):
        assert torch.equal(written, reference)
    assert [cache._version for cache in caches["triton"]] == [v + 1 for v in versions]


@needs_interpreter
def test_splits_and_fully_masked_rows() -> None:
    """Several splits of 64 positions, reduced; row 0 attends nothing and gets zeros, as SDPA's
    safe softmax gives; every block of it is skipped."""
    args = attention_args(2, 1, 4, 200, 16, "bool", torch.float32, "cpu", seed=3)
    splits = kernel_implementations("cache_attention")["triton"].call_args(args)[5]
    assert splits > 1
    actual, expected = both(args)
    assert torch.equal(actual[0], torch.zeros_like(actual[0])) and torch.equal(
        expected[0], actual[0])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_more_than_one_query_and_fake_tensors_run_the_twin() -> None:
    args = attention_args(2, 1, 2, 9, 8, "bool", torch.float32, "cpu", seed=1, queries=3)
    actual, expected = both(args)
    assert torch.equal(actual, expected)  # the twin itself: a prefill over the cache
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = both(fakes)[0]
    assert out.shape == expected.shape and out.dtype == expected.dtype


def test_launch_constants_refuse_what_the_op_does_not_take() -> None:
    constants = kernel_implementations("cache_attention")["triton"].launch_constants
    assert constants is not None
    query, key, value, mask, scale = attention_args(1, 2, 2, 8, 8, "bool", torch.float32,
                                                    "cpu", seed=0)
    with pytest.raises(ValueError, match=r"mask broadcasting to \(1, 4, 1, 8\).*\(1, 1, 1, 4\)"):
        constants(query, key, value, mask[..., :4], scale)
    with pytest.raises(ValueError, match=r"a divisor of 4 heads.*\(1, 3, 8, 8\)"):
        constants(query, key.repeat(1, 2, 1, 1)[:, :3], value.repeat(1, 2, 1, 1)[:, :3], mask,
                  scale)
    with pytest.raises(ValueError, match=r"float32 mask.*torch.float16"):
        constants(query, key, value, mask.half(), scale)


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 4, 261, 64), (3, 8, 4, 1030, 64), (2, 16, 1, 261, 64),
                                   (1, 8, 4, 300, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS)
def test_kernel_matches_the_twin_in_bfloat16_on_gpu(shape: tuple[int, ...], mask: str) -> None:
    """Llama-1B's (8 KV heads of 4 query heads), BART-large's (16 heads, no repeat) and a
    head size of 128 over HF decode caches; masks with fully masked rows and blocks."""
    batch, kv_heads, group, cache_len, head_dim = shape
    for seed in range(3):
        args = attention_args(batch, kv_heads, group, cache_len, head_dim, mask,
                              torch.bfloat16, "cuda", seed, per_head=seed == 1, dead_row=False)
        check(args, GPU_TOLERANCES)  # (SDPA's CUDA kernels may give a fully masked row NaN)


@pytest.mark.gpu
@pytest.mark.parametrize("position", [0, 100, 260])
def test_update_matches_index_copy_and_the_twin_in_bfloat16_on_gpu(position: int) -> None:
    query, key_cache, value_cache, mask, scale = attention_args(
        2, 8, 4, 261, 64, "bool", torch.bfloat16, "cuda", seed=position, dead_row=False)
    new = [torch.randn(2, 8, 1, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    at = torch.tensor([position], device="cuda")
    triton, native = (kernel_implementations("cache_update_attention")[name] for name in
                      ("triton", "native"))
    caches = {name: (key_cache.clone(), value_cache.clone()) for name in ("triton", "native")}
    args = {name: (query, *new, at, *caches[name], mask, scale) for name in caches}
    actual = triton.fn(*triton.call_args(args["triton"]))
    expected = native.fn(*args["native"])
    rtol, atol = GPU_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    assert all(torch.equal(a, b) for a, b in zip(caches["triton"], caches["native"]))


@pytest.mark.gpu
def test_auto_prefers_triton_on_gpu() -> None:
    for op in ("cache_attention", "cache_update_attention"):
        assert choose_kernel(op, "auto", torch.device("cuda"), torch.bfloat16).name == "triton"
