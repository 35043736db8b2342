"""The Triton `fxkiln.norm_linear` / `add_norm_linear` (the decode GEMV with its norm prologue)
against the native twin (the norm op, then the projection): interpreted on CPU over tiny shapes,
row counts across the GEMV's limit, norms, residuals, biases and epilogues; on the GPU in
bfloat16 over the models' shapes, against native and against the unfused Triton pair."""
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
    from runtime.kernels import triton_linear, triton_norm_linear

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")
EPILOGUES = ("none", "gelu", "gelu_tanh", "silu_and_mul")


def _args(rows: int, out_features: int, in_features: int, norm: str, residual: bool,
          norm_bias: bool, bias: bool, activation: str, dtype: torch.dtype, device: str,
          carry: str = "sum") -> tuple:
    """(x, [residual,] norm weight, norm bias, eps, norm, weight, bias, activation[, carry]);
    x strided."""
    weight_rows = 2 * out_features if activation == "silu_and_mul" else out_features
    x = 2 * torch.randn(rows, in_features + 3, device=device)[:, :in_features] + 0.5
    residual_rows = torch.randn(rows, in_features, device=device)
    norm_weight = 1.0 + 0.1 * torch.randn(in_features, device=device)
    offset = 0.1 * torch.randn(in_features, device=device) if norm_bias else None
    weight = torch.randn(weight_rows, in_features, device=device) / math.sqrt(in_features)
    projection_bias = 0.1 * torch.randn(weight_rows, device=device) if bias else None
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    head = (cast(x), cast(residual_rows)) if residual else (cast(x),)
    tail = (carry,) if residual else ()
    return (*head, cast(norm_weight), cast(offset), 1e-5, norm, cast(weight),
            cast(projection_bias), activation, *tail)


def _run(args: tuple, constants: tuple[int, ...], twin: bool = False) -> tuple:
    """Both outputs of the call (the second None without a residual); the native twin's or
    the Triton implementation's with `constants`."""
    residual = len(args) == 10  # add_norm_linear's: x, residual, norm_linear's rest, carry
    if twin:
        out = native.add_norm_linear(*args) if residual else native.norm_linear(*args)
    elif residual:
        out = triton_norm_linear.add_norm_linear(*args, *constants)
    else:
        out = triton_norm_linear.norm_linear(*args, *constants)
    return out if residual else (out, None)


def _triton_pair(args: tuple, constants: tuple[int, ...]) -> tuple:
    """The unfused Triton pair: the norm kernel, then the GEMV (cuBLAS above max_rows)."""
    residual = len(args) == 10
    x, residual_rows = args[0], args[1] if residual else None
    norm_weight, norm_bias, eps, norm, weight, bias, activation = args[2 if residual else 1:][:7]
    normed, summed = triton_kernels._norm(x, residual_rows, norm_weight, norm_bias, eps,
                                          constants[5], constants[6], layer_norm=norm == "layer")
    out = triton_linear.linear(normed, weight, bias, activation, *constants[:5])
    return out, (summed if args[-1] == "sum" else normed) if residual else None


def _check(args: tuple, constants: tuple[int, ...],
           tolerances: dict[torch.dtype, tuple[float, float]], against_native: bool = True) -> None:
    """Both outputs against the native twin's (`against_native`) and the unfused Triton pair's."""
    actual = _run(args, constants)
    references = [_triton_pair(args, constants)]
    if against_native:
        references.append(_run(args, constants, twin=True))
    for expected in references:
        for value, reference in zip(actual, expected):
            if reference is None:
                assert value is None
                continue
            assert value.shape == reference.shape and value.dtype == reference.dtype
            rtol, atol = tolerances[reference.dtype]
            torch.testing.assert_close(value, reference, rtol=rtol, atol=atol)


@pytest.mark.slow
@needs_interpreter
@given(rows=st.integers(1, 10), out_features=st.integers(1, 40), in_features=st.integers(16, 96),
       norm=st.sampled_from(["rms", "layer"]), residual=st.booleans(), norm_bias=st.booleans(),
       bias=st.booleans(), activation=st.sampled_from(EPILOGUES),
       carry=st.sampled_from(["sum", "normed"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       block_n=st.sampled_from([1, 4, 16]), budget=st.sampled_from([256, 4096]),
       stages=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_norm_linear_matches_the_native_twin_interpreted(
        rows: int, out_features: int, in_features: int, norm: str, residual: bool,
        norm_bias: bool, bias: bool, activation: str, carry: str, dtype: torch.dtype,
        block_n: int, budget: int, stages: int, seed: int) -> None:
    """Rows up to 8 take the GEMV with its prologue (a budget of 256 makes several K tiles,
    so the statistics are gathered over more than one; one RMSNorm row carrying the sum takes
    the one pass); 9 and 10 the norm kernel and cuBLAS.

    bfloat16 is checked against the unfused Triton pair only: the interpreter rounds float32 to
    bfloat16 towards zero, and after the norm's, the projection's and the epilogue's roundings
    both calls stray from native alike (by up to 4%; the GPU test holds them to native)."""
    torch.manual_seed(seed)
    args = _args(rows, out_features, in_features, norm, residual, norm_bias and norm == "layer",
                 bias, activation, dtype, "cpu", carry)
    norm_constants = triton_kernels._norm_constants(args[0])
    _check(args, (8, block_n, budget, 2, stages, *norm_constants, 8), TOLERANCES,
           against_native=dtype != torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("carry", ["sum", "normed"])
def test_the_carried_rows_are_written_whole(carry: str) -> None:
    """Program 0 writes them, over many programs (block_n 1) and K tiles (budget 16): the sum
    exactly, the normalized rows as the norm computes them."""
    torch.manual_seed(0)
    args = _args(3, 24, 80, "layer", True, True, False, "none", torch.float32, "cpu", carry)
    _, carried = _run(args, (8, 1, 16, 2, 2, 128, 1, 8))
    assert carried.is_contiguous() and carried.shape == args[0].shape
    if carry == "sum":
        assert torch.equal(carried, args[0] + args[1])
    else:
        expected = native.layer_norm(args[0] + args[1], args[2], args[3], args[4])
        torch.testing.assert_close(carried, expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("carry", ["sum", "normed"])
def test_mixed_dtypes_round_where_the_norm_rounds(carry: str) -> None:
    """A float16 row with a float32 RMSNorm weight: the norm's output (what the projection
    reads, and the result) is float32, as `rms_norm` gives it. Carrying the normalized rows,
    the prologue sweeps the statistics first and rounds the normalized row to float16 where the
    norm does: native's result to float32 precision. The one pass (carrying the sum) does not
    round it: float16's precision, against native and against an unrounded float64 norm,
    which it matches to float32's."""
    torch.manual_seed(1)
    x, residual = torch.randn(1, 32).half(), torch.randn(1, 32).half()
    norm_weight, weight = 1.0 + 0.1 * torch.randn(32), torch.randn(8, 32)
    args = (x, residual, norm_weight, None, 1e-6, "rms", weight, None, "none", carry)
    constants = (*triton_norm_linear.add_norm_linear_constants(*args)[:-1], 1)  # the prologue
    (expected, expected_carried), (actual, carried) = _run(args, (), True), _run(args, constants)
    assert (actual.dtype, carried.dtype) == (torch.float32, expected_carried.dtype)
    if carry == "normed":
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(carried, expected_carried, rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(carried, expected_carried)
    torch.testing.assert_close(actual, expected, rtol=4e-3, atol=4e-3)
    summed = expected_carried.double()
    unrounded = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6)
    exact = (unrounded * norm_weight.double()) @ weight.double().T
    torch.testing.assert_close(actual.double(), exact, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_flop_counting_sees_the_projection() -> None:
    """Under a dispatch mode the call runs the native twin, which the mode sees."""
    args = _args(2, 16, 32, "layer", True, True, True, "silu_and_mul", torch.float32, "cpu",
                 "normed")
    constants = triton_norm_linear.add_norm_linear_constants(*args)
    counts = []
    for twin in (True, False):
        with FlopCounterMode(display=False) as counter:
            _run(args, constants, twin)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 32 * 32


def test_launch_constants_are_the_projections_then_the_norms() -> None:
    weight = torch.empty(16384, 2048, dtype=torch.bfloat16)  # Llama-1B's gate_up
    x = torch.empty(1, 2048, dtype=torch.bfloat16)
    constants = triton_norm_linear.norm_linear_constants(
        x, torch.empty(2048), None, 1e-5, "rms", weight, None, "silu_and_mul")
    projection = triton_linear.linear_constants(x, weight, None, "silu_and_mul")
    assert constants == (*projection, *triton_kernels._norm_constants(x), 1)  # tuned: 1 row
    layer = triton_norm_linear.norm_linear_constants(
        x, torch.empty(2048), None, 1e-5, "layer", weight, None, "silu_and_mul")
    assert layer[:-1] == constants[:-1] and layer[-1] == 0  # LayerNorm: never
    untuned = torch.empty(8192, 1536, dtype=torch.bfloat16)  # no tuning: the rule, no prologue
    assert triton_norm_linear.norm_linear_constants(
        x[:, :1536], torch.empty(1536), None, 1e-5, "rms", untuned, None, "silu_and_mul")[-1] == 0


@needs_interpreter
@pytest.mark.parametrize("rows", [1, 3])
def test_rows_past_the_prologue_run_the_norm_then_the_gemv(rows: int) -> None:
    """With the prologue's rows below the call's, the call is the unfused Triton pair, bit for
    bit: the norm kernel, then the GEMV (which still takes these rows)."""
    torch.manual_seed(rows)
    args = _args(rows, 24, 64, "rms", True, False, False, "silu_and_mul", torch.float32, "cpu")
    constants = (8, 4, 256, 2, 2, *triton_kernels._norm_constants(args[0]), rows - 1)
    for value, reference in zip(_run(args, constants), _triton_pair(args, constants)):
        assert torch.equal(value, reference)


# -- GPU ---------------------------------------------------------------------------------------
SHAPES = [  # (out features, in features, norm, activation, bias): the projections a norm feeds
    (3072, 1024, "layer", "none", True), (4096, 1024, "layer", "gelu", True),
    (1024, 1024, "layer", "none", True), (3072, 2048, "rms", "none", False),
    (8192, 2048, "rms", "silu_and_mul", False), (14336, 4096, "rms", "silu_and_mul", False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 9])
@pytest.mark.parametrize("carry", [None, "sum", "normed"])  # None: no residual
def test_norm_linear_matches_native_on_gpu(shape: tuple[int, int, str, str, bool], rows: int,
                                           carry: str | None) -> None:
    out_features, in_features, norm, activation, bias = shape
    torch.manual_seed(rows)
    residual = carry is not None
    for dtype in (torch.bfloat16, torch.float32):
        args = _args(rows, out_features, in_features, norm, residual, norm == "layer", bias,
                     activation, dtype, "cuda", carry or "sum")
        constants = (triton_norm_linear.add_norm_linear_constants(*args) if residual
                     else triton_norm_linear.norm_linear_constants(*args))
        _check(args, constants, GPU_TOLERANCES)
        forced = ((8, *constants[1:7], 8) if constants[0]
                  else (8, 16, 4096, 4, 3, *constants[5:7], 8))
        _check(args, forced, GPU_TOLERANCES)  # the GEMV with its prologue itself
