"""The Triton kernels themselves (device code). Importing this module needs `triton`.

Launchers, support checks and registration live in `runtime.kernels.triton_kernels`, which
imports this module only when Triton is installed. Rows are addressed with int64 offsets, so
large activations do not overflow; the last dimension of every tensor is contiguous.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def norm_rows_kernel(
    out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, bias_ptr,
    x_row_stride, residual_row_stride, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, LAYER_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DEPENDENT: tl.constexpr = False,
):
    """One program per row: [residual_out = x + residual;] out = norm(row) * weight [+ bias],
    the norm being RMSNorm or (LAYER_NORM) LayerNorm.

    Arithmetic runs in float32 with a rounding to the storage dtype wherever the native
    implementation rounds (half-precision products of two rounded values are exact in float32,
    so this reproduces them): RMSNorm rounds the normalized row before the weight, LayerNorm
    (as `F.layer_norm`) only its result. Triton's CPU interpreter has no bfloat16 arithmetic.
    DEPENDENT: launched as a programmatic dependent (`triton_kernels.dependent_launch`).
    """
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()  # the kernels before have finished: their writes are visible
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x_dtype = x_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        x_dtype = residual_out_ptr.dtype.element_ty
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start (and wait for this)
    if HAS_RESIDUAL:
        x = (x + residual.to(tl.float32)).to(x_dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
        x = x.to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    if LAYER_NORM:
        mean = tl.sum(x, axis=0) / hidden
        centered = tl.where(mask, x - mean, 0.0)
        variance = tl.sum(centered * centered, axis=0) / hidden
        result = centered * (1.0 / tl.sqrt(variance + eps))
        result = result * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            result += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        variance = tl.sum(x * x, axis=0) / hidden
        normed = (x * (1.0 / tl.sqrt(variance + eps))).to(x_dtype).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(out_dtype).to(tl.float32)
        result = normed.to(out_dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * hidden + cols, result.to(out_dtype), mask=mask)


@triton.jit
def act_and_mul_kernel(out_ptr, x_ptr, x_row_stride, half, ACTIVATION: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """Program (row, block): out[row, cols] = act(x[row, cols]) * x[row, half + cols].

    ACTIVATION: 0 silu, 1 exact gelu, 2 tanh-approximated gelu, written as
    x * sigmoid(2z) (= 0.5 x (1 + tanh z)), which has no tanh to lose precision near 0.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < half
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + half + cols, mask=mask, other=0.0)
    gate = gate.to(tl.float32)
    if ACTIVATION == 0:
        activated = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == 1:
        activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        activated = gate / (1.0 + tl.exp(-2.0 * inner))
    activated = activated.to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * half + cols, (activated * up.to(tl.float32)).to(up.dtype), mask=mask)


@triton.jit
def _rotate_heads(out_ptr, x_ptr, x_row_stride, token, cos, sin, pair, pair_mask, num_heads,
                  head_size, half_rotary, IS_NEOX: tl.constexpr, HEADS_BLOCK: tl.constexpr,
                  PASS_BLOCK: tl.constexpr):
    """Rotate the first 2*half_rotary features of each of one token's heads (float32 math)."""
    heads = tl.arange(0, HEADS_BLOCK)[:, None]  # (HEADS_BLOCK, 1)
    head_mask = heads < num_heads
    mask = head_mask & pair_mask[None, :]  # (HEADS_BLOCK, HALF_BLOCK)
    x_head = x_ptr + token * x_row_stride + heads * head_size
    out_head = out_ptr + token * num_heads * head_size + heads * head_size
    if IS_NEOX:
        first = pair
        second = pair + half_rotary
    else:
        first = 2 * pair
        second = 2 * pair + 1
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(x_head + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_head + second[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated1 = x1 * cos[None, :] - x2 * sin[None, :]
    rotated2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out_head + first[None, :], rotated1.to(dtype), mask=mask)
    tl.store(out_head + second[None, :], rotated2.to(dtype), mask=mask)
    if PASS_BLOCK > 0:
        rest = 2 * half_rotary + tl.arange(0, PASS_BLOCK)
        rest_mask = head_mask & (rest < head_size)[None, :]
        kept = tl.load(x_head + rest[None, :], mask=rest_mask, other=0.0)
        tl.store(out_head + rest[None, :], kept, mask=rest_mask)


@triton.jit
def rotary_kernel(
    query_out_ptr, key_out_ptr, query_ptr, key_ptr, positions_ptr, cache_ptr,
    query_row_stride, key_row_stride, cache_row_stride, query_heads, key_heads, head_size,
    half_rotary, IS_NEOX: tl.constexpr, QUERY_HEADS_BLOCK: tl.constexpr,
    KEY_HEADS_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
):
    """One program per token: rotate all its query heads and all its key heads (one launch for
    both; cos/sin loaded once).

    cos/sin are rounded to the activation dtype before use, as the native implementation does.
    """
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pair = tl.arange(0, HALF_BLOCK)
    pair_mask = pair < half_rotary
    cache_row = cache_ptr + position * cache_row_stride
    dtype = query_ptr.dtype.element_ty
    cos = tl.load(cache_row + pair, mask=pair_mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(cache_row + half_rotary + pair, mask=pair_mask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(query_out_ptr, query_ptr, query_row_stride, token, cos, sin, pair, pair_mask,
                  query_heads, head_size, half_rotary, IS_NEOX, QUERY_HEADS_BLOCK, PASS_BLOCK)
    _rotate_heads(key_out_ptr, key_ptr, key_row_stride, token, cos, sin, pair, pair_mask,
                  key_heads, head_size, half_rotary, IS_NEOX, KEY_HEADS_BLOCK, PASS_BLOCK)
