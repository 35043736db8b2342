"""Triton device code for the argmax of each row (the greedy token of each sequence's logits).

Two stages, so that one row's 100k+ logits spread over many programs: `argmax_blocks_kernel`
reduces each BLOCK of a row to its (value, index), `argmax_combine_kernel` reduces a row's
blocks. Both keep `torch.argmax`'s answer exactly: the first index of the maximum, and a NaN
ranks above every number (the first NaN wins). Importing this module needs `triton`; the
launcher lives in `runtime.kernels.triton_argmax`.
"""
from __future__ import annotations

import triton
import triton.language as tl

NO_INDEX = tl.constexpr(2**31 - 1)  # above every index: a masked lane never wins a min


@triton.jit
def _first_max(values, indices):
    """(the winning value, its index) of a 1-D block: the first NaN if there is one, else the
    first maximum. `values` float32; lanes to ignore hold -inf and NO_INDEX."""
    nan = values != values
    first_nan = tl.min(tl.where(nan, indices, NO_INDEX), axis=0)
    numbers = tl.where(nan, float("-inf"), values)
    top = tl.max(numbers, axis=0)
    first_top = tl.min(tl.where(numbers == top, indices, NO_INDEX), axis=0)
    has_nan = first_nan < NO_INDEX
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)


@triton.jit
def argmax_blocks_kernel(out_ptr, value_ptr, index_ptr, x_ptr, x_row_stride, vocab, blocks,
                         BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Program (row, block): the first maximum of x[row, block * BLOCK:][:BLOCK]. SINGLE (one
    block per row): its index is the row's answer, written to out_ptr (int64); else the
    (value, index) pair goes to the row's slot `block` of value_ptr / index_ptr."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=float("-inf"))
    value, index = _first_max(x.to(tl.float32), tl.where(mask, cols, NO_INDEX))
    if SINGLE:
        tl.store(out_ptr + row, index.to(tl.int64))
    else:
        tl.store(value_ptr + row * blocks + block, value)
        tl.store(index_ptr + row * blocks + block, index)


@triton.jit
def argmax_combine_kernel(out_ptr, value_ptr, index_ptr, blocks, BLOCK_S: tl.constexpr):
    """Program per row: the first maximum over its `blocks` partial (value, index) pairs. Blocks
    are in column order, so the first winning block holds the row's first winning index."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_S)
    mask = slots < blocks
    values = tl.load(value_ptr + row * blocks + slots, mask=mask, other=float("-inf"))
    indices = tl.load(index_ptr + row * blocks + slots, mask=mask, other=NO_INDEX)
    _, index = _first_max(values, indices)
    tl.store(out_ptr + row, index.to(tl.int64))
