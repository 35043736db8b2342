"""Triton device code for the ops the lifting passes write (`rotary_cos_sin`). Needs `triton`.

Launchers and registration live in `runtime.kernels.triton_lifted`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotary_cos_sin_kernel(
    out_ptr, x_ptr, cos_ptr, sin_ptr,
    rows, size1, size2, half,
    x_stride0, x_stride1, x_stride2, x_stride3,
    cos_stride0, cos_stride1, cos_stride2, cos_stride3,
    sin_stride0, sin_stride1, sin_stride2, sin_stride3,
    ROWS_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    """out = x * cos + rotate_half(x) * sin over a (size0, size1, size2, 2 * half) view.

    Each program takes ROWS_BLOCK rows of the last dimension; cos and sin come with the
    strides of their broadcast to x (0 where they broadcast), out is contiguous. As eager
    torch does, each product and the sum are rounded to the output dtype.
    """
    row = tl.program_id(0).to(tl.int64) * ROWS_BLOCK + tl.arange(0, ROWS_BLOCK).to(tl.int64)
    index2 = row % size2
    index1 = (row // size2) % size1
    index0 = row // (size2 * size1)
    col = tl.arange(0, HALF_BLOCK)
    mask = (row < rows)[:, None] & (col < half)[None, :]  # (ROWS_BLOCK, HALF_BLOCK)
    x_row = (index0 * x_stride0 + index1 * x_stride1 + index2 * x_stride2)[:, None]
    cos_row = (index0 * cos_stride0 + index1 * cos_stride1 + index2 * cos_stride2)[:, None]
    sin_row = (index0 * sin_stride0 + index1 * sin_stride1 + index2 * sin_stride2)[:, None]
    first, second = col[None, :], (col + half)[None, :]
    x1 = tl.load(x_ptr + x_row + first * x_stride3, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row + second * x_stride3, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + cos_row + first * cos_stride3, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cos_row + second * cos_stride3, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + sin_row + first * sin_stride3, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + sin_row + second * sin_stride3, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty  # each product rounded to it, as eager torch rounds
    out1 = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    out_row = out_ptr + (row * 2 * half)[:, None]
    tl.store(out_row + first, out1.to(dtype), mask=mask)
    tl.store(out_row + second, out2.to(dtype), mask=mask)
