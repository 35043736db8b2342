"""Triton device code of the decode GEMV's norm prologue: the helpers `linear_rows_kernel`
(runtime.kernels.linear_jit) calls when it normalizes its input rows itself.

The arithmetic is the norm kernel's (`runtime.kernels.triton_jit.norm_rows_kernel`), rounded
where it (and the native ops) round: the residual sum to its dtype, RMSNorm's normalized row to
the sum's dtype before the weight, the result to the norm's output dtype, which is the dtype the
projection reads. Only the order of the statistics' float32 sums differs (tile by tile here,
one row at a time there). The one-pass RMSNorm prologue (`weighted_tile`) scales by 1 / rms
after the products instead, unrounded. Importing this module needs `triton`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def summed_tile(x_ptr, residual_ptr, sum_ptr, row_ids, ks, mask, x_row_stride,
                residual_row_stride, HAS_RESIDUAL: tl.constexpr):
    """The (rows, ks) tile of x [+ residual, rounded to the sum's dtype: sum_ptr's], in
    float32."""
    x = tl.load(x_ptr + row_ids[:, None] * x_row_stride + ks[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row_ids[:, None] * residual_row_stride + ks[None, :],
                           mask=mask, other=0.0)
        x = (x + residual.to(tl.float32)).to(sum_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def row_stats(x_ptr, residual_ptr, sum_ptr, row_ids, row_mask, x_row_stride,
              residual_row_stride, eps, IN_FEATURES: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, LAYER_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """(mean, 1 / sqrt(variance + eps)) of each input row, (BLOCK_M,) each; the mean is 0 for
    RMSNorm, whose "variance" is the mean square. LayerNorm's variance is of the centred row
    (a second sweep), as the norm kernel computes it."""
    mean = tl.zeros((BLOCK_M,), tl.float32)
    if LAYER_NORM:
        total = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, IN_FEATURES, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (ks < IN_FEATURES)[None, :]
            x = summed_tile(x_ptr, residual_ptr, sum_ptr, row_ids, ks, mask, x_row_stride,
                            residual_row_stride, HAS_RESIDUAL)
            total += tl.sum(x, axis=1)
        mean = total / IN_FEATURES
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, IN_FEATURES, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < IN_FEATURES)[None, :]
        x = summed_tile(x_ptr, residual_ptr, sum_ptr, row_ids, ks, mask, x_row_stride,
                        residual_row_stride, HAS_RESIDUAL)
        centered = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    return mean, 1.0 / tl.sqrt(squares / IN_FEATURES + eps)


@triton.jit
def normed_tile(x, mean, rstd, norm_weight_ptr, norm_bias_ptr, sum_ptr, out_ptr, ks, k_mask,
                mask, LAYER_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """The normalized (rows, ks) tile of the float32 row sums `x`, rounded to out's dtype (the
    norm's output dtype: what the projection reads); zero where `mask` is off."""
    out_dtype = out_ptr.dtype.element_ty
    weight = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0)
    if LAYER_NORM:
        centered = tl.where(mask, x - mean[:, None], 0.0)
        result = centered * rstd[:, None] * weight.to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            bias = tl.load(norm_bias_ptr + ks, mask=k_mask, other=0.0)
            result = tl.where(mask, result + bias.to(tl.float32)[None, :], 0.0)
    else:
        normed = (x * rstd[:, None]).to(sum_ptr.dtype.element_ty).to(out_dtype).to(tl.float32)
        result = normed * weight.to(out_dtype).to(tl.float32)[None, :]
    return result.to(out_dtype)


@triton.jit
def weighted_tile(x, norm_weight_ptr, out_ptr, ks, k_mask):
    """The one-pass RMSNorm's (rows, ks) tile: the float32 row sums `x` times the norm's weight
    as the norm kernel applies it (in out's dtype), not yet scaled by 1 / rms, in float32."""
    weight = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0)
    return x * weight.to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]
