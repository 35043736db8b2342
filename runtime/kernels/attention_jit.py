"""Triton device code for decode attention over a slot-addressed KV cache.

Both kernels read the step's layout from device tensors only (slot mapping, slot tables,
sequence lengths), never from host values, so a CUDA graph can record them once and replay them
on whatever the step's metadata buffers hold. Padding rows have slot -1 (nothing written) and
sequence length 0 (a zero output row).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(key_cache_ptr, value_cache_ptr, key_ptr, value_ptr, slot_mapping_ptr,
                    slot_stride, key_row_stride, value_row_stride,
                    ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Program per token row: cache[slot] = key/value row, unless slot < 0 (padding)."""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + row * slot_stride).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW
        key = tl.load(key_ptr + row * key_row_stride + cols, mask=mask)
        value = tl.load(value_ptr + row * value_row_stride + cols, mask=mask)
        tl.store(key_cache_ptr + slot * ROW + cols, key, mask=mask)
        tl.store(value_cache_ptr + slot * ROW + cols, value, mask=mask)


@triton.jit
def decode_attention_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, tables_ptr,
                            seq_lens_ptr, query_row_stride, out_row_stride, table_row_stride,
                            scale, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
                            KV_ROW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (sequence, query head): one query over the sequence's cached keys and values.

    Online softmax over blocks of BLOCK_N positions; position p of sequence s lives in cache
    slot tables[s, p]; query head h reads KV head h // GROUP. Accumulates in float32.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_offset = (head // GROUP) * HEAD_SIZE
    seq_len = tl.load(seq_lens_ptr + seq)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    query = tl.load(query_ptr + seq * query_row_stride + head * HEAD_SIZE + dims,
                    mask=dim_mask, other=0.0).to(tl.float32) * scale      # (BLOCK_D,)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    start = 0
    while start < seq_len:  # a while loop: Triton's interpreter cannot range() to a loaded bound
        positions = start + tl.arange(0, BLOCK_N)
        in_context = positions < seq_len
        slots = tl.load(tables_ptr + seq * table_row_stride + positions, mask=in_context,
                        other=0).to(tl.int64)
        offsets = slots[:, None] * KV_ROW + kv_offset + dims[None, :]     # (BLOCK_N, BLOCK_D)
        mask = in_context[:, None] & dim_mask[None, :]
        key = tl.load(key_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scores = tl.sum(key * query[None, :], axis=1)                     # (BLOCK_N,)
        scores = tl.where(in_context, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        probs = tl.exp(scores - new_max)
        correction = tl.exp(running_max - new_max)
        value = tl.load(value_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(probs[:, None] * value, axis=0)
        running_sum = running_sum * correction + tl.sum(probs, axis=0)
        running_max = new_max
        start += BLOCK_N
    result = tl.where(running_sum > 0, acc / tl.maximum(running_sum, 1e-30), 0.0)
    tl.store(out_ptr + seq * out_row_stride + head * HEAD_SIZE + dims,
             result.to(out_ptr.dtype.element_ty), mask=dim_mask)
