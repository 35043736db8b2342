"""Triton implementations against native: on CPU under TRITON_INTERPRET=1, and on the GPU."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import runtime.ops  # noqa: F401  (registers the ops and implementations)
from runtime import registry
from runtime.kernels import triton_kernels
from runtime.registry import choose_kernel, kernel_implementations
from runtime.settings import kernel_settings
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES, cos_sin_cache

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
CPU = torch.device("cpu")

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor,
                  tolerances: dict[torch.dtype, tuple[float, float]]) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = tolerances[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _run(op: str, args: tuple, impl: str) -> tuple[torch.Tensor, ...]:
    kernel = kernel_implementations(op)[impl]
    out = kernel.fn(*kernel.call_args(args))
    return out if isinstance(out, tuple) else (out,)


def _check(op: str, args: tuple, tolerances: dict[torch.dtype, tuple[float, float]]) -> None:
    for actual, expected in zip(_run(op, args, "triton"), _run(op, args, "native"), strict=True):
        _assert_close(actual, expected, tolerances)


def _norm_args(tokens: int, hidden: int, dtype: torch.dtype, device: str,
               leading: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(*leading, tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn(*leading, tokens, hidden, dtype=dtype, device=device)
    weight = (1.0 + 0.2 * torch.randn(hidden, device=device)).to(dtype)
    return x, residual, weight


def _rotary_args(tokens: int, heads: int, kv_heads: int, head_size: int, rotary_dim: int,
                 is_neox: bool, dtype: torch.dtype, device: str) -> tuple:
    positions = torch.randint(0, 32, (tokens,), device=device)
    # query and key as the column slices of one qkv projection: row stride > width
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, dtype=dtype, device=device)
    query, key, _ = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    cache = cos_sin_cache(32, rotary_dim).to(device)
    return positions, query, key, cache, head_size, is_neox


# -- CPU, interpreted --------------------------------------------------------------------------
@needs_interpreter
@given(tokens=st.integers(1, 9), hidden=st.integers(1, 80), dtype=DTYPES,
       fused=st.booleans(), batched=st.booleans())
def test_norms_match_native_interpreted(tokens: int, hidden: int, dtype: torch.dtype,
                                        fused: bool, batched: bool) -> None:
    x, residual, weight = _norm_args(tokens, hidden, dtype, "cpu", leading=(2,) if batched else ())
    if fused:
        _check("fused_add_rms_norm", (x, residual, weight, 1e-6), TOLERANCES)
    else:
        _check("rms_norm", (x, weight, 1e-5), TOLERANCES)


@needs_interpreter
@given(tokens=st.integers(1, 9), hidden=st.integers(1, 80), dtype=DTYPES, fused=st.booleans(),
       bias=st.booleans(), shifted=st.booleans())
def test_layer_norms_match_native_interpreted(tokens: int, hidden: int, dtype: torch.dtype,
                                              fused: bool, bias: bool, shifted: bool) -> None:
    """LayerNorm and add + LayerNorm, with or without a bias, on rows far from zero mean (a
    kernel that skipped centering would miss there)."""
    x, residual, weight = _norm_args(tokens, hidden, dtype, "cpu")
    if shifted:
        x = x + 3.0
    offset = (0.1 * torch.randn(hidden)).to(dtype) if bias else None
    if fused:
        _check("fused_add_layer_norm", (x, residual, weight, offset, 1e-5), TOLERANCES)
    else:
        _check("layer_norm", (x, weight, offset, 1e-5), TOLERANCES)


@needs_interpreter
@given(tokens=st.integers(1, 9), half=st.integers(1, 1100), dtype=DTYPES)
def test_silu_and_mul_matches_native_interpreted(tokens: int, half: int, dtype: torch.dtype) -> None:
    x = torch.randn(tokens, 2 * half, dtype=dtype)
    _check("silu_and_mul", (x,), TOLERANCES)


@needs_interpreter
@given(tokens=st.integers(1, 7), kv_heads=st.integers(1, 3), group=st.integers(1, 3),
       head_size=st.sampled_from([4, 8, 12, 16]), partial=st.booleans(), is_neox=st.booleans(),
       dtype=DTYPES)
def test_rotary_matches_native_interpreted(tokens: int, kv_heads: int, group: int,
                                           head_size: int, partial: bool, is_neox: bool,
                                           dtype: torch.dtype) -> None:
    rotary_dim = head_size // 2 if partial and head_size % 4 == 0 else head_size
    args = _rotary_args(tokens, kv_heads * group, kv_heads, head_size, rotary_dim, is_neox,
                        dtype, "cpu")
    _check("rotary_embedding", args, TOLERANCES)


@needs_interpreter
def test_empty_batch_launches_nothing() -> None:
    x, residual, weight = _norm_args(0, 16, torch.float32, "cpu")
    out, new_residual = _run("fused_add_rms_norm", (x, residual, weight, 1e-6), "triton")
    assert out.shape == new_residual.shape == (0, 16)


@needs_interpreter
def test_supports_cpu_only_interpreted_and_auto_prefers_native_there() -> None:
    triton = kernel_implementations("rms_norm")["triton"]
    assert triton.supports(CPU, torch.float16)
    assert not triton.supports(CPU, torch.float64)
    assert not triton.supports(torch.device("cuda"), torch.float16)  # interpreter: no CUDA launches
    assert choose_kernel("rms_norm", "auto", CPU, torch.float32).name == "native"
    assert choose_kernel("rms_norm", "triton", CPU, torch.float32).name == "triton"


@needs_interpreter
def test_eager_dispatch_follows_active_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    implementations = registry._IMPLEMENTATIONS["silu_and_mul"]  # swapped back by monkeypatch
    for name in ("native", "triton"):
        impl = implementations[name]
        monkeypatch.setitem(implementations, name,
                            dataclasses.replace(impl, fn=_recording(impl.fn, name, calls)))
    x = torch.randn(3, 8)
    torch.ops.fxkiln.silu_and_mul(x)
    with kernel_settings({"silu_and_mul": "triton"}):
        torch.ops.fxkiln.silu_and_mul(x)
    torch.ops.fxkiln.silu_and_mul(x)
    assert calls == ["native", "triton", "native"]


def _recording(fn: Callable[..., Any], name: str, calls: list[str]) -> Callable[..., Any]:
    def recorded(*args: Any) -> Any:
        calls.append(name)
        return fn(*args)
    return recorded


def test_launch_constants_come_from_static_shapes() -> None:
    x = torch.empty(5, 2000)
    block, warps = triton_kernels.rms_norm_constants(x, torch.empty(2000), 1e-6)
    assert block == 2048 and block >= x.shape[-1] > block // 2 and warps >= 1
    assert triton_kernels.silu_and_mul_constants(torch.empty(3, 2 * 5000))[0] == \
        triton_kernels.SILU_BLOCK
    q, k = torch.empty(2, 12 * 64), torch.empty(2, 3 * 64)
    constants = triton_kernels.rotary_embedding_constants(
        torch.zeros(2, dtype=torch.long), q, k, torch.empty(8, 32), 64, True)
    assert constants[:4] == (16, 4, 16, 32)  # heads 12 -> 16, 3 -> 4, rot/2 16, pass-through 32


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_kernels_match_native_on_gpu(dtype: torch.dtype, tokens: int) -> None:
    x, residual, weight = _norm_args(tokens, 2048, dtype, "cuda")
    _check("rms_norm", (x, weight, 1e-6), GPU_TOLERANCES)
    _check("fused_add_rms_norm", (x, residual, weight, 1e-6), GPU_TOLERANCES)
    bias = (0.1 * torch.randn(2048, device="cuda")).to(dtype)
    _check("layer_norm", (x + 2.0, weight, bias, 1e-5), GPU_TOLERANCES)
    _check("fused_add_layer_norm", (x, residual, weight, bias, 1e-5), GPU_TOLERANCES)
    _check("silu_and_mul", (torch.randn(tokens, 2 * 8192, dtype=dtype, device="cuda"),),
           GPU_TOLERANCES)
    for is_neox, rotary_dim in ((True, 64), (False, 64), (True, 32)):
        _check("rotary_embedding", _rotary_args(tokens, 32, 8, 64, rotary_dim, is_neox, dtype,
                                                "cuda"), GPU_TOLERANCES)


@pytest.mark.gpu
def test_auto_prefers_triton_on_gpu() -> None:
    cuda = torch.device("cuda")
    for op in ("rms_norm", "fused_add_rms_norm", "layer_norm", "fused_add_layer_norm",
               "silu_and_mul", "rotary_embedding"):
        assert choose_kernel(op, "auto", cuda, torch.bfloat16).name == "triton"
    assert choose_kernel("rms_norm", "auto", cuda, torch.float64).name == "native"
