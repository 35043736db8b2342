"""Triton implementations of the lifted ops (gelu_and_mul, rotary_cos_sin) against native: on
CPU under TRITON_INTERPRET=1, and on the GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.ops  # noqa: F401  (registers the ops and implementations)
from runtime.kernels import triton_kernels, triton_lifted
from runtime.registry import choose_kernel, kernel_implementations
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LIFTED_OPS = ("gelu_and_mul", "rotary_cos_sin")

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


def _check(op: str, args: tuple, tolerances: dict[torch.dtype, tuple[float, float]]) -> None:
    outputs = []
    for name in ("triton", "native"):
        kernel = kernel_implementations(op)[name]
        outputs.append(kernel.fn(*kernel.call_args(args)))
    actual, expected = outputs
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = tolerances[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _rotary_args(shape: tuple[int, ...], cos_shape: tuple[int, ...], dtype: torch.dtype,
                 device: str, transposed: bool) -> tuple[torch.Tensor, ...]:
    """x, possibly as Hugging Face's transposed (batch, heads, seq, dim) view; cos and sin of
    `cos_shape`, broadcast against it."""
    if transposed and len(shape) == 4:
        x = torch.randn(shape[0], shape[2], shape[1], shape[3], dtype=dtype,
                        device=device).transpose(1, 2)
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
    angles = torch.rand(cos_shape, device=device) * 6.3
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


@st.composite
def rotary_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """x's shape (1 to 4 dims, last even) and a cos shape that broadcasts to it."""
    ndim = draw(st.integers(1, 4))
    leading = [draw(st.integers(1, 4)) for _ in range(ndim - 1)]
    shape = (*leading, 2 * draw(st.integers(1, 20)))
    cos_shape = tuple(size if draw(st.booleans()) else 1 for size in shape[:-1])
    cut = draw(st.integers(0, len(cos_shape)))  # fewer leading dims broadcast too
    return shape, (*cos_shape[cut:], shape[-1])


# -- CPU, interpreted --------------------------------------------------------------------------
@needs_interpreter
@settings(max_examples=10)
@given(tokens=st.integers(1, 9), half=st.integers(1, 1100), dtype=DTYPES,
       approximate=st.sampled_from(["none", "tanh"]))
def test_gelu_and_mul_matches_native_interpreted(tokens: int, half: int, dtype: torch.dtype,
                                                 approximate: str) -> None:
    _check("gelu_and_mul", (torch.randn(tokens, 2 * half, dtype=dtype) * 3, approximate),
           TOLERANCES)


@needs_interpreter
@settings(max_examples=10)
@given(shapes=rotary_shapes(), dtype=DTYPES, transposed=st.booleans())
def test_rotary_cos_sin_matches_native_interpreted(
        shapes: tuple[tuple[int, ...], tuple[int, ...]], dtype: torch.dtype,
        transposed: bool) -> None:
    shape, cos_shape = shapes
    _check("rotary_cos_sin", _rotary_args(shape, cos_shape, dtype, "cpu", transposed),
           TOLERANCES)


@needs_interpreter
def test_rotary_cos_sin_float32_is_exact_and_promotes_like_torch() -> None:
    x, cos, sin = _rotary_args((2, 4, 3, 8), (2, 1, 3, 8), torch.bfloat16, "cpu", True)
    cos, sin = cos.float(), sin.float()  # a bfloat16 x rotated by float32 cos/sin: float32 out
    triton = kernel_implementations("rotary_cos_sin")["triton"]
    actual = triton.fn(*triton.call_args((x, cos, sin)))
    expected = kernel_implementations("rotary_cos_sin")["native"].fn(x, cos, sin)
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)


def test_launch_constants_come_from_static_shapes() -> None:
    x = torch.empty(2, 32, 5, 128)
    rows, half_block, warps = triton_lifted.rotary_cos_sin_constants(x, x, x)
    assert half_block == 64 and rows * half_block == triton_lifted.ROTARY_TILE and warps >= 1
    assert triton_lifted.rotary_cos_sin_constants(torch.empty(3, 10), x, x)[1] == 8
    with pytest.raises(ValueError, match="at most 4 dimensions"):
        triton_lifted.rotary_cos_sin_constants(torch.empty(1, 1, 1, 1, 8), x, x)
    with pytest.raises(ValueError, match="even last dimension, found 7"):
        triton_lifted.rotary_cos_sin_constants(torch.empty(2, 7), x, x)
    with pytest.raises(ValueError, match="approximate.*'tan'"):
        triton_lifted.gelu_and_mul_constants(torch.empty(2, 8), "tan")


@needs_interpreter
def test_auto_prefers_native_on_cpu() -> None:
    for op in LIFTED_OPS:
        assert choose_kernel(op, "auto", torch.device("cpu"), torch.float32).name == "native"
        assert choose_kernel(op, "triton", torch.device("cpu"), torch.float32).name == "triton"


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_lifted_kernels_match_native_on_gpu(dtype: torch.dtype, tokens: int) -> None:
    for approximate in ("none", "tanh"):
        x = torch.randn(tokens, 2 * 8192, dtype=dtype, device="cuda")
        _check("gelu_and_mul", (x, approximate), GPU_TOLERANCES)
    for head_dim, transposed in ((64, True), (128, True), (96, False)):
        # Hugging Face's (batch, heads, seq, head_dim) against (batch, 1, seq, head_dim)
        _check("rotary_cos_sin", _rotary_args((2, 32, tokens, head_dim), (2, 1, tokens, head_dim),
                                              dtype, "cuda", transposed), GPU_TOLERANCES)


@pytest.mark.gpu
def test_auto_prefers_triton_on_gpu() -> None:
    cuda = torch.device("cuda")
    for op in LIFTED_OPS:
        assert choose_kernel(op, "auto", cuda, torch.bfloat16).name == "triton"
