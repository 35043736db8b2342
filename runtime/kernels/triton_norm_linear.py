"""Triton implementations of `fxkiln.norm_linear` and `fxkiln.add_norm_linear`, registered as
"triton": the decode GEMV of `runtime.kernels.triton_linear` with its norm prologue (each
program normalizes the few input rows itself, `linear_rows_kernel`'s PROLOGUE), so a norm and
the one projection that reads it are one launch.

Launch constants: the projection's (`linear_constants`), the norm kernel's, and the most rows
the prologue takes (`tuned_prologue_rows`), all static, baked into the graph by kernel_choice. A call
with more rows, or whose weight the tuning leaves to cuBLAS, runs the unfused pair: the norm
kernel, then the projection as `fxkiln.linear` runs it (the GEMV up to `max_rows`, cuBLAS and
the activation above); a call a dispatch mode observes runs the native twin.
"""
from __future__ import annotations

import torch

from runtime.kernels import native, triton_kernels
from runtime.kernels.triton_kernels import _norm, _norm_constants, _rows, observed
from runtime.kernels.triton_linear import (NormPrologue, gemv, linear, linear_constants,
                                           projection_tuning, takes_gemv)
from runtime.registry import register_kernel

LaunchConstants = tuple[int, int, int, int, int, int, int, int]


def tuned_prologue_rows(norm: str, weight: torch.Tensor, activation: str) -> int:
    """The most rows the prologue serves: RMSNorm's one pass up to the projection's
    `GemvTuning.prologue_rows` (where it was measured faster); LayerNorm's never. Measured on an
    H200 (benchmarks/kernels.py --kernels norm_linear, decode_ab.py --switch norm_prologue,
    2026-12-01): the statistics sweep that LayerNorm (and more than one row) needs before the
    weight stream lost to the norm kernel then the GEMV (Llama-1B's gate_up at 8 rows 53.9
    against 20.8 us; BART-large's projections 6.4 to 8.4 against 4.8 to 6.4 us, its step 0.636
    against 0.576 ms)."""
    if norm != "rms":
        return 0
    tuning = projection_tuning(weight, activation)
    return min(tuning.max_rows, tuning.prologue_rows)


def norm_linear_constants(x: torch.Tensor, norm_weight: torch.Tensor,
                          norm_bias: torch.Tensor | None, eps: float, norm: str,
                          weight: torch.Tensor, bias: torch.Tensor | None,
                          activation: str) -> LaunchConstants:
    """(max_rows, block_n, budget, num_warps, num_stages, norm block, norm warps, the most rows
    the prologue takes)."""
    return (*linear_constants(x, weight, bias, activation), *_norm_constants(x),
            tuned_prologue_rows(norm, weight, activation))


def add_norm_linear_constants(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                              norm_bias: torch.Tensor | None, eps: float, norm: str,
                              weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                              carry: str) -> LaunchConstants:
    return norm_linear_constants(x, norm_weight, norm_bias, eps, norm, weight, bias, activation)


def _norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor | None, eps: float, norm: str, weight: torch.Tensor,
                 bias: torch.Tensor | None, activation: str, carry: str,
                 constants: LaunchConstants) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(projection of the normed rows, the carried rows: x + residual for `carry` "sum", the
    normed rows for "normed"; None without a residual)."""
    max_rows, block_n, budget, num_warps, num_stages, norm_block, norm_warps, prologue_rows = (
        constants)
    if observed(x):
        if residual is None:
            return native.norm_linear(x, norm_weight, norm_bias, eps, norm, weight, bias,
                                      activation), None
        return native.add_norm_linear(x, residual, norm_weight, norm_bias, eps, norm, weight,
                                      bias, activation, carry)
    if not takes_gemv(x, weight, prologue_rows):
        normed, summed = _norm(x, residual, norm_weight, norm_bias, eps, norm_block, norm_warps,
                               layer_norm=norm == "layer")
        out = linear(normed, weight, bias, activation, max_rows, block_n, budget, num_warps,
                     num_stages)
        return out, summed if carry == "sum" else normed
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = sum_dtype if norm == "layer" else torch.promote_types(sum_dtype, norm_weight.dtype)
    out_features = weight.shape[0] // 2 if activation == "silu_and_mul" else weight.shape[0]
    out = torch.empty((*x.shape[:-1], out_features), dtype=out_dtype, device=x.device)
    x_rows = _rows(x)  # (rows, in)
    residual_rows = None if residual is None else _rows(residual)
    carried = None if residual is None else torch.empty(
        x.shape, dtype=sum_dtype if carry == "sum" else out_dtype, device=x.device)
    carried_rows = None if carried is None else carried.view(-1, x.shape[-1])
    store_sum = carried_rows is not None and carry == "sum"
    prologue = NormPrologue(norm, norm_weight, norm_bias, eps, residual_rows,
                            carried_rows if store_sum else _of_dtype(sum_dtype, x_rows,
                                                                     residual_rows),
                            store_sum, None if store_sum else carried_rows)
    gemv(out.view(-1, out_features), x_rows, weight, bias, activation, block_n, budget,
         num_warps, num_stages, prologue)  # (rows, out)
    return out, carried


def _of_dtype(dtype: torch.dtype, *candidates: torch.Tensor | None) -> torch.Tensor:
    """A tensor of `dtype` the kernel reads only the dtype of (the sum's, not stored)."""
    for tensor in candidates:
        if tensor is not None and tensor.dtype == dtype:
            return tensor
    reference = next(t for t in candidates if t is not None)
    return torch.empty(1, dtype=dtype, device=reference.device)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                eps: float, norm: str, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str, max_rows: int, block_n: int, budget: int, num_warps: int,
                num_stages: int, norm_block: int, norm_warps: int,
                prologue_rows: int) -> torch.Tensor:
    constants = (max_rows, block_n, budget, num_warps, num_stages, norm_block, norm_warps,
                 prologue_rows)
    return _norm_linear(x, None, norm_weight, norm_bias, eps, norm, weight, bias, activation,
                        "sum", constants)[0]


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                    norm_bias: torch.Tensor | None, eps: float, norm: str, weight: torch.Tensor,
                    bias: torch.Tensor | None, activation: str, carry: str, max_rows: int,
                    block_n: int, budget: int, num_warps: int, num_stages: int,
                    norm_block: int, norm_warps: int,
                    prologue_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    constants = (max_rows, block_n, budget, num_warps, num_stages, norm_block, norm_warps,
                 prologue_rows)
    out, carried = _norm_linear(x, residual, norm_weight, norm_bias, eps, norm, weight, bias,
                                activation, carry, constants)
    assert carried is not None
    return out, carried


register_kernel("norm_linear", "triton", supports=triton_kernels.supports,
                priority=triton_kernels.priority,
                launch_constants=norm_linear_constants)(norm_linear)
register_kernel("add_norm_linear", "triton", supports=triton_kernels.supports,
                priority=triton_kernels.priority,
                launch_constants=add_norm_linear_constants)(add_norm_linear)
