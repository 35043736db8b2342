"""Triton implementation of `fxkiln.linear`, registered as "triton": a GEMV for decode-sized
row counts with the bias and the activation fused, cuBLAS (`F.linear`) above.

The launch constants (`linear_constants`: the largest row count that takes the GEMV, the
features per program, the weight-tile budget, warps, pipelining depth) depend only on the
weight's static shape and the device, so the kernel_choice pass bakes them into the graph.
Whether a call takes the GEMV is a Python branch on its row count, a static shape: each captured
bucket freezes it. Past `max_rows`, or for weights the tuning leaves to cuBLAS, the call is
`F.linear` followed by the activation's own kernel (Triton SiLU-and-mul, `F.gelu`), as before
the fusion.

Triton kernels are invisible to dispatch modes (FLOP counting, fake tensors): under one, the
call runs the unfused native ops, which the mode sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.kernels import linear_jit, triton_kernels
from runtime.kernels.native import LINEAR_ACTIVATIONS
from runtime.kernels.triton_kernels import (_next_power_of_2, _rows, _static, device_processors,
                                            observed)
from runtime.registry import register_kernel

ACTIVATION_CODES = {name: code.value for name, code in (
    ("none", linear_jit.NONE), ("gelu", linear_jit.GELU), ("gelu_tanh", linear_jit.GELU_TANH),
    ("silu_and_mul", linear_jit.SILU_AND_MUL))}
assert set(ACTIVATION_CODES) == set(LINEAR_ACTIVATIONS), "every activation needs an epilogue"


@dataclass(frozen=True)
class GemvTuning:
    """How projections of one weight shape run."""

    max_rows: int    # the GEMV serves 1..max_rows rows; cuBLAS above (0: never the GEMV)
    block_n: int     # output features per program
    budget: int      # weight-tile elements per loop iteration: block_n * block_k
    num_warps: int
    num_stages: int = 2  # software-pipelining depth of the weight loads (3 spilled once, sm_90)
    prologue_rows: int = 0  # rows up to which an RMSNorm feeding it runs in its one-pass prologue


MAX_GEMV_ROWS = 8
# Provisional, from first principles: cuBLAS runs BART-large's 2-8 MB GEMVs at ~0.9 TB/s of the
# H200's ~4.2 (too few thread blocks for one row) but large weights near bandwidth; grids of
# about four programs per SM, a 4096-element weight tile (8 KB) per iteration for 4 warps.
GEMV_MAX_WEIGHT_BYTES = 16 * 2**20
PROGRAMS_PER_PROCESSOR = 4
DEFAULT_BUDGET = 4096
# Measured choices by (out_features, in_features, gated), from the sweep of
# benchmarks/kernels.py on an H200 (2026-12-01, results/kernels-cuda.json): the fastest of the
# sweep at 1 and 8 rows, cuBLAS (max_rows 1 or 0) where it won at 8; shapes not listed follow
# `gemv_tuning`'s rule. Keys: BART-large, Llama-3.2-1B and Llama-3-8B decode projections.
# prologue_rows 1 where the one-pass RMSNorm prologue made the decode step faster (Llama-1B's
# qkv and gate_up, decode_ab.py --switch norm_prologue: 0.952-0.956 against 1.011-1.081 ms);
# Llama-3-8B's projections with it made its batch-1 step slower (decode.py, 4.728 against
# 4.368 ms the session before, the GEMVs' share): 0 there, and for shapes not measured.
GEMV_TUNING: dict[tuple[int, int, bool], GemvTuning] = {
    (1024, 1024, False): GemvTuning(max_rows=8, block_n=8, budget=8192, num_warps=8, num_stages=3),
    (1024, 4096, False): GemvTuning(max_rows=1, block_n=4, budget=8192, num_warps=8, num_stages=3),
    (2048, 2048, False): GemvTuning(max_rows=1, block_n=4, budget=8192, num_warps=8, num_stages=3),
    (2048, 8192, False): GemvTuning(max_rows=1, block_n=4, budget=4096, num_warps=4, num_stages=3),
    (3072, 1024, False): GemvTuning(max_rows=8, block_n=16, budget=4096, num_warps=4,
                                    num_stages=3),
    (3072, 2048, False): GemvTuning(max_rows=1, block_n=8, budget=4096, num_warps=4, num_stages=3,
                                    prologue_rows=1),
    (4096, 1024, False): GemvTuning(max_rows=8, block_n=16, budget=4096, num_warps=4,
                                    num_stages=3),
    (4096, 4096, False): GemvTuning(max_rows=8, block_n=16, budget=4096, num_warps=4,
                                    num_stages=3),
    (4096, 14336, False): GemvTuning(max_rows=1, block_n=8, budget=4096, num_warps=4,
                                     num_stages=3),
    (6144, 4096, False): GemvTuning(max_rows=1, block_n=16, budget=4096, num_warps=4,
                                    num_stages=3),
    (8192, 2048, True): GemvTuning(max_rows=8, block_n=16, budget=4096, num_warps=4, num_stages=2,
                                   prologue_rows=1),
    (14336, 4096, True): GemvTuning(max_rows=1, block_n=64, budget=8192, num_warps=8,
                                    num_stages=3),
    (50265, 1024, False): GemvTuning(max_rows=8, block_n=64, budget=8192, num_warps=8,
                                     num_stages=3),
    (128256, 2048, False): GemvTuning(max_rows=8, block_n=64, budget=8192, num_warps=8,
                                      num_stages=3),
    (128256, 4096, False): GemvTuning(max_rows=1, block_n=64, budget=8192, num_warps=8,
                                      num_stages=3),
}


def gemv_tuning(out_features: int, in_features: int, gated: bool, weight_bytes: int,
                processors: int) -> GemvTuning:
    """The tuning of a projection to `out_features` (after the epilogue) from `in_features`."""
    tuned = GEMV_TUNING.get((out_features, in_features, gated))
    if tuned is not None:
        return tuned
    if weight_bytes > GEMV_MAX_WEIGHT_BYTES:
        return GemvTuning(max_rows=0, block_n=1, budget=DEFAULT_BUDGET, num_warps=4)
    block_n = 4
    while block_n < 64 and -(-out_features // block_n) > PROGRAMS_PER_PROCESSOR * processors:
        block_n *= 2
    return GemvTuning(max_rows=MAX_GEMV_ROWS, block_n=block_n, budget=DEFAULT_BUDGET, num_warps=4)


def projection_tuning(weight: torch.Tensor, activation: str) -> GemvTuning:
    """The tuning of the projection by `weight` with the epilogue `activation`."""
    weight_rows = _static(weight.shape[0], "weight rows (output features)")
    in_features = _static(weight.shape[1], "weight columns (input features)")
    gated = activation == "silu_and_mul"
    out_features = weight_rows // 2 if gated else weight_rows
    return gemv_tuning(out_features, in_features, gated,
                       weight_rows * in_features * weight.element_size(),
                       device_processors(weight.device))


def linear_constants(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str) -> tuple[int, int, int, int, int]:
    """(max_rows, block_n, budget, num_warps, num_stages) for a projection by `weight`."""
    tuning = projection_tuning(weight, activation)
    return tuning.max_rows, tuning.block_n, tuning.budget, tuning.num_warps, tuning.num_stages


def gemv_blocks(rows: int, in_features: int, block_n: int, budget: int) -> tuple[int, int]:
    """(block_m, block_k) of a GEMV call with `rows` rows."""
    block_m = _next_power_of_2(rows)
    block_k = max(16, budget // block_n)
    block_k = 1 << (block_k.bit_length() - 1)  # a power of two at most the budget allows
    return block_m, min(block_k, max(16, _next_power_of_2(in_features)))


@dataclass(frozen=True)
class NormPrologue:
    """The norm a GEMV applies to its input rows first (runtime.kernels.triton_norm_linear).
    Rows are (rows, in features); those the kernel writes are contiguous."""

    norm: str                          # "rms" | "layer" ("none": no prologue)
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    residual: torch.Tensor | None      # added to the input rows before the norm
    sum_rows: torch.Tensor             # of the sum's dtype; where the sum goes if `store_sum`
    store_sum: bool = False
    normed_out: torch.Tensor | None = None  # where the normalized rows go, if anyone reads them


NORM_CODES = {"none": linear_jit.NO_NORM.value, "rms": linear_jit.RMS_NORM.value,
              "layer": linear_jit.LAYER_NORM.value}


def takes_gemv(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether a call with input `x` runs the GEMV (else cuBLAS); never an observed call."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    return not observed(x) and 0 < rows <= max_rows and weight.stride(-1) == 1


def gemv(out_rows: torch.Tensor, x_rows: torch.Tensor, weight: torch.Tensor,
         bias: torch.Tensor | None, activation: str, block_n: int, budget: int, num_warps: int,
         num_stages: int, prologue: NormPrologue | None = None) -> None:
    """Launch the GEMV: out_rows (rows, out) = act([norm] x_rows (rows, in) W^T + b).
    Pointers a call does not use are passed as some tensor of the call (never read)."""
    rows, in_features = x_rows.shape
    out_features = out_rows.shape[1]
    block_m, block_k = gemv_blocks(rows, in_features, block_n, budget)
    interpreted = triton_kernels.interpreter_active()
    norm = prologue or NormPrologue("none", weight, None, 0.0, None, x_rows)
    residual = x_rows if norm.residual is None else norm.residual
    normed_out = x_rows if norm.normed_out is None else norm.normed_out
    linear_jit.linear_rows_kernel[(-(-out_features // block_n),)](
        out_rows, x_rows, weight, weight if bias is None else bias.contiguous(), residual,
        norm.sum_rows, normed_out, norm.weight.contiguous(),
        weight if norm.bias is None else norm.bias.contiguous(), rows, x_rows.stride(0),
        residual.stride(0), weight.stride(0), out_rows.stride(0), norm.eps,
        OUT_FEATURES=out_features, IN_FEATURES=in_features, HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation], PROLOGUE=NORM_CODES[norm.norm],
        HAS_RESIDUAL=norm.residual is not None, HAS_NORM_BIAS=norm.bias is not None,
        STORE_SUM=norm.store_sum, STORE_NORMED=norm.normed_out is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        UPCAST=interpreted,
        DOT_PRECISION="ieee" if interpreted or out_rows.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **triton_kernels.dependent_options(out_rows.device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
           max_rows: int, block_n: int, budget: int, num_warps: int,
           num_stages: int) -> torch.Tensor:
    if not takes_gemv(x, weight, max_rows):
        return unfused(x, weight, bias, activation, observed(x))
    gated = activation == "silu_and_mul"
    out_features = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    gemv(out.view(-1, out_features), _rows(x), weight, bias, activation, block_n, budget,
         num_warps, num_stages)  # (rows, out), (rows, in)
    return out


def unfused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
            observed: bool = False) -> torch.Tensor:
    """cuBLAS, then the activation's own kernel (native ones when `observed` by a mode)."""
    y = F.linear(x, weight, bias)
    if activation == "silu_and_mul" and not observed:
        return triton_kernels.silu_and_mul(y, *triton_kernels.silu_and_mul_constants(y))
    return LINEAR_ACTIVATIONS[activation](y)


register_kernel("linear", "triton", supports=triton_kernels.supports,
                priority=triton_kernels.priority, launch_constants=linear_constants)(linear)
