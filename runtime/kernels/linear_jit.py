"""Triton device code for projections of a few rows (decode GEMV) with a fused epilogue.

Importing this module needs `triton`; the launcher lives in `runtime.kernels.triton_linear`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels import prologue_jit

# Epilogue codes (ACTIVATION) for the names of runtime.kernels.native.LINEAR_ACTIVATIONS
# (constexpr globals: the only globals a jitted function may read).
NONE, GELU, GELU_TANH, SILU_AND_MUL = (tl.constexpr(code) for code in range(4))
# Prologue codes (PROLOGUE): the input rows as they are, or normalized by the kernel itself.
NO_NORM, RMS_NORM, LAYER_NORM = (tl.constexpr(code) for code in range(3))


@triton.jit
def linear_rows_kernel(
    out_ptr, x_ptr, weight_ptr, bias_ptr, residual_ptr, sum_ptr, normed_ptr, norm_weight_ptr,
    norm_bias_ptr, rows, x_row_stride, residual_row_stride, weight_row_stride, out_row_stride,
    eps, OUT_FEATURES: tl.constexpr, IN_FEATURES: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, STORE_SUM: tl.constexpr, STORE_NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DEPENDENT: tl.constexpr = False,
):
    """Program per BLOCK_N output features, for all `rows` (<= BLOCK_M) input rows at once, so
    each weight element is read once: out = act(x W^T + b).

    One row (BLOCK_M == 1) multiplies on the FMA units, accumulating the (BLOCK_N, BLOCK_K)
    products elementwise and reducing over K once at the end; more rows go through tl.dot (the
    tensor cores pad the few rows), whose accumulator stays (BLOCK_M, BLOCK_N) however large the
    weight tile. SILU_AND_MUL reads two weight rows per output feature f, the gate (row f) and
    the up projection (row OUT_FEATURES + f), and writes silu(gate) * up. Accumulation is
    float32; the result is rounded to the output dtype before the activation, and the SiLU
    before the multiply, where the unfused ops round. The weight's shape is static (one
    compiled kernel per projection shape); the loop's weight loads are software-pipelined
    NUM_STAGES deep (tl.range: plain loads too, not only those feeding a dot). UPCAST runs the
    dots in float32 (Triton's CPU interpreter has no bfloat16 arithmetic).

    PROLOGUE (RMS_NORM, LAYER_NORM) makes x the norm of the rows it points to [plus the
    residual rows (HAS_RESIDUAL)] with the norm's weight [and bias]. Program 0 writes, as it
    goes, the sum (STORE_SUM, to sum_ptr: the residual a pre-norm layer carries on) or the
    normalized rows (STORE_NORMED, to normed_ptr: a post-norm layer's). Each program reads the
    input rows itself (a few KB, from L2 after the first programs, against the BLOCK_N rows of
    weight it streams from memory); what that saves is the norm's launch, its output's round
    trip through memory and the gap between the two kernels. RMSNorm of one row (BLOCK_M == 1)
    without STORE_NORMED takes one pass: the row's 1 / rms is one factor of all its products,
    so the loop multiplies (x [+ residual]) * norm weight by the weight tiles while it sums the
    squares, and the accumulators are scaled once after it; nothing waits for the statistics
    before the weight stream starts. Its normalized row is never rounded (float32 products
    throughout, where the norm kernel rounds the row to its output dtype). Otherwise (LayerNorm,
    STORE_NORMED, or a tl.dot's rows, whose operand is rounded) the prologue sweeps the input
    for the statistics first (twice for LayerNorm: the variance of the centred row) and rounds
    the normalized tiles as the norm kernel does.

    DEPENDENT: launched as a programmatic dependent (`triton_kernels.dependent_launch`): wait
    for the kernels before, then let the next one launch (its programs wait for this one's end;
    a trigger after the loop made the 8-row tl.dot path of some shapes spill on sm_90).
    """
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()  # the kernels before have finished: their writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start, to wait for this one
    block = tl.program_id(0)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < OUT_FEATURES
    row_ids = tl.arange(0, BLOCK_M)
    row_mask = row_ids < rows
    gate_rows = weight_ptr + cols.to(tl.int64)[:, None] * weight_row_stride   # (BLOCK_N, 1)
    up_rows = gate_rows + OUT_FEATURES * weight_row_stride
    dot_dtype = tl.float32 if UPCAST else weight_ptr.dtype.element_ty
    ONE_PASS: tl.constexpr = PROLOGUE == RMS_NORM and not STORE_NORMED and BLOCK_M == 1
    SWEPT: tl.constexpr = PROLOGUE != NO_NORM and not ONE_PASS  # statistics before the loop
    if SWEPT:
        mean, rstd = prologue_jit.row_stats(
            x_ptr, residual_ptr, sum_ptr, row_ids, row_mask, x_row_stride,
            residual_row_stride, eps, IN_FEATURES, BLOCK_M, BLOCK_K, PROLOGUE == LAYER_NORM,
            HAS_RESIDUAL)
    if ONE_PASS:
        squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    if BLOCK_M == 1:
        products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        up_products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in tl.range(0, IN_FEATURES, BLOCK_K, num_stages=NUM_STAGES):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < IN_FEATURES
        x_mask = row_mask[:, None] & k_mask[None, :]
        if PROLOGUE == NO_NORM:
            x = tl.load(x_ptr + row_ids[:, None] * x_row_stride + ks[None, :], mask=x_mask,
                        other=0.0)                                            # (BLOCK_M, BLOCK_K)
        else:
            x = prologue_jit.summed_tile(x_ptr, residual_ptr, sum_ptr, row_ids, ks, x_mask,
                                         x_row_stride, residual_row_stride, HAS_RESIDUAL)
            first = x_mask & (block == 0)  # program 0 stores the rows a later op reads
            if STORE_SUM:
                tl.store(sum_ptr + row_ids[:, None] * IN_FEATURES + ks[None, :],
                         x.to(sum_ptr.dtype.element_ty), mask=first)
            if SWEPT:
                x = prologue_jit.normed_tile(x, mean, rstd, norm_weight_ptr, norm_bias_ptr,
                                             sum_ptr, out_ptr, ks, k_mask, x_mask,
                                             PROLOGUE == LAYER_NORM, HAS_NORM_BIAS)
                if STORE_NORMED:
                    tl.store(normed_ptr + row_ids[:, None] * IN_FEATURES + ks[None, :], x,
                             mask=first)
            else:
                squares += x * x
                x = prologue_jit.weighted_tile(x, norm_weight_ptr, out_ptr, ks, k_mask)
        w_mask = col_mask[:, None] & k_mask[None, :]
        weight = tl.load(gate_rows + ks[None, :], mask=w_mask, other=0.0)     # (BLOCK_N, BLOCK_K)
        if ACTIVATION == SILU_AND_MUL:
            up = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
        if BLOCK_M == 1:
            products += x.to(tl.float32) * weight.to(tl.float32)
            if ACTIVATION == SILU_AND_MUL:
                up_products += x.to(tl.float32) * up.to(tl.float32)
        else:
            x = x.to(dot_dtype)
            acc = tl.dot(x, tl.trans(weight.to(dot_dtype)), acc, input_precision=DOT_PRECISION)
            if ACTIVATION == SILU_AND_MUL:
                up_acc = tl.dot(x, tl.trans(up.to(dot_dtype)), up_acc,
                                input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = tl.sum(products, axis=1)[None, :]                              # (1, BLOCK_N)
        up_acc = tl.sum(up_products, axis=1)[None, :]
    if ONE_PASS:
        rstd = (1.0 / tl.sqrt(tl.sum(squares, axis=1) / IN_FEATURES + eps))[:, None]
        acc *= rstd                                                          # (BLOCK_M, 1)
        up_acc *= rstd
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == SILU_AND_MUL:
            up_acc += tl.load(bias_ptr + OUT_FEATURES + cols, mask=col_mask,
                              other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    y = acc.to(out_dtype).to(tl.float32)
    if ACTIVATION == GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 / (1.0 + tl.exp(-2.0 * inner)))  # 1 + tanh(inner)
    elif ACTIVATION == SILU_AND_MUL:
        y = (y / (1.0 + tl.exp(-y))).to(out_dtype).to(tl.float32)
        y = y * up_acc.to(out_dtype).to(tl.float32)
    tl.store(out_ptr + row_ids[:, None] * out_row_stride + cols[None, :], y.to(out_dtype),
             mask=row_mask[:, None] & col_mask[None, :])
