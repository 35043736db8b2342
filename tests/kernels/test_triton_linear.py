"""The Triton `fxkiln.linear` (decode GEMV with a fused epilogue) against native: interpreted on
CPU over row counts across the GEMV's limit, shapes, epilogues and launch parameters; on the GPU
over the models' real projection shapes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import runtime.ops  # noqa: F401  (registers the ops and implementations)
from runtime.kernels import native, triton_kernels
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES

if triton_kernels.triton_jit is not None:
    from runtime.kernels import triton_linear

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")
EPILOGUES = ("none", "gelu", "gelu_tanh", "silu_and_mul")


def _args(rows: int, out_features: int, in_features: int, bias: bool, activation: str,
          dtype: torch.dtype, device: str, leading: tuple[int, ...] = ()) -> tuple:
    weight_rows = 2 * out_features if activation == "silu_and_mul" else out_features
    x = torch.randn(*leading, rows, in_features + 3, device=device)[..., :in_features]  # strided
    weight = torch.randn(weight_rows, in_features, device=device) / math.sqrt(in_features)
    offset = 0.1 * torch.randn(weight_rows, device=device) if bias else None
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return cast(x), cast(weight), cast(offset), activation


def _check(args: tuple, constants: tuple[int, ...],
           tolerances: dict[torch.dtype, tuple[float, float]]) -> None:
    expected = native.linear(*args)
    actual = triton_linear.linear(*args, *constants)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    rtol, atol = tolerances[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@needs_interpreter
@given(rows=st.integers(1, 10), out_features=st.integers(1, 40), in_features=st.integers(1, 70),
       bias=st.booleans(), activation=st.sampled_from(EPILOGUES),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       block_n=st.sampled_from([1, 4, 16]), budget=st.sampled_from([256, 4096]),
       stages=st.sampled_from([1, 3]), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_native_interpreted(rows: int, out_features: int, in_features: int,
                                           bias: bool, activation: str, dtype: torch.dtype,
                                           block_n: int, budget: int, stages: int, batched: bool,
                                           seed: int) -> None:
    """Rows up to 8 take the GEMV, 9 and 10 the cuBLAS path; strided and batched inputs."""
    torch.manual_seed(seed)
    args = _args(rows, out_features, in_features, bias, activation, dtype, "cpu",
                 leading=(1,) if batched else ())
    _check(args, (8, block_n, budget, 2, stages), TOLERANCES)


@needs_interpreter
def test_flop_counting_sees_the_projection() -> None:
    """Triton kernels are invisible to dispatch modes: under one the call runs native ops."""
    args = _args(2, 16, 32, True, "silu_and_mul", torch.float32, "cpu")
    counts = []
    for run in (native.linear, lambda *a: triton_linear.linear(*a, 8, 4, 4096, 2, 3)):
        with FlopCounterMode(display=False) as counter:
            run(*args)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 32 * 32


def test_tuning_leaves_large_weights_to_cublas_and_fills_the_device() -> None:
    """The rule for shapes the measured table does not list (these are not in it)."""
    assert not {(1000, 1024), (50000, 1024), (4000, 1024)} & {k[:2] for k in
                                                             triton_linear.GEMV_TUNING}
    small = triton_linear.gemv_tuning(1000, 1024, False, 2 * 2**20, processors=132)
    assert small.max_rows == triton_linear.MAX_GEMV_ROWS
    assert small.block_n == 4  # 250 programs: within 4 per SM already at the smallest block
    head = triton_linear.gemv_tuning(50000, 1024, False, 100 * 2**20, processors=132)
    assert head.max_rows == 0  # an LM head: left to cuBLAS unless measured otherwise
    wide = triton_linear.gemv_tuning(4000, 1024, False, 8 * 2**20, processors=132)
    assert wide.block_n == 8  # 500 programs


def test_measured_tuning_overrides_the_rule() -> None:
    measured = triton_linear.GEMV_TUNING[(50265, 1024, False)]  # BART-large's LM head
    assert triton_linear.gemv_tuning(50265, 1024, False, 103 * 2**20, processors=132) == measured
    assert measured.max_rows > 0  # the sweep found the GEMV twice as fast as cuBLAS there
    assert triton_linear.gemv_blocks(3, 1024, 8, 4096) == (4, 512)  # an 8 x 512 weight tile
    assert triton_linear.gemv_blocks(1, 40, 4, 4096) == (1, 64)  # never past the row


def test_measured_tuning_wins_over_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = triton_linear.GemvTuning(max_rows=2, block_n=32, budget=8192, num_warps=8,
                                        num_stages=2)
    monkeypatch.setitem(triton_linear.GEMV_TUNING, (1024, 4096, False), measured)
    weight = torch.empty(1024, 4096, dtype=torch.bfloat16)
    constants = triton_linear.linear_constants(torch.empty(1, 4096), weight, None, "none")
    assert constants == (2, 32, 8192, 8, 2)


# -- GPU ---------------------------------------------------------------------------------------
SHAPES = [  # (out features, in features, activation, bias): the models' decode projections
    (3072, 1024, "none", True), (1024, 1024, "none", True), (4096, 1024, "gelu", True),
    (1024, 4096, "none", True), (3072, 2048, "none", False), (2048, 2048, "none", False),
    (8192, 2048, "silu_and_mul", False), (2048, 8192, "none", False),
    (6144, 4096, "none", False), (14336, 4096, "silu_and_mul", False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
def test_linear_matches_native_on_gpu(shape: tuple[int, int, str, bool], rows: int) -> None:
    out_features, in_features, activation, bias = shape
    for dtype in (torch.bfloat16, torch.float32):
        args = _args(rows, out_features, in_features, bias, activation, dtype, "cuda")
        constants = triton_linear.linear_constants(*args)
        _check(args, constants, GPU_TOLERANCES)
        forced = (8, *constants[1:]) if constants[0] else (8, 16, 4096, 4, 3)  # the GEMV itself
        _check(args, forced, GPU_TOLERANCES)
