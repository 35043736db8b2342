"""Triton device code for variable-length attention: a whole step's sequences in one launch.

Each sequence brings some new query tokens (rows query_start_loc[s] .. [s + 1] of the step)
at the last positions of its context; the kernel attends them over the sequence's keys, read
through its slot-table row (`PAGED`: the KV cache, after this step's K/V were written) or
straight from the step's key/value rows (the encoder's self-attention, which keeps no cache).
That one kernel serves a prefill of many prompts, a chunk of a long prompt over its cached
prefix, and a mixed step of chunks and decode tokens alike. Causal masking (`CAUSAL`) is by
absolute position: query j of a sequence with context c and n new tokens sits at c - n + j.

The layout comes from device tensors only (offsets, lengths, slot tables): the grid is sized
from the step's row count and sequence count, and each program finds its sequence by binary
search over the offsets, as vLLM's unified Triton attention does. Program (block, head): the
block index space gives sequence s the blocks from query_start_loc[s] // BLOCK_M + s on, at
least as many as its query rows need; programs past a sequence's rows exit.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, block, BLOCK_M: tl.constexpr):
    """The last sequence s whose first block, query_start_loc[s] // BLOCK_M + s, is <= block."""
    low = 0
    high = num_seqs
    while low < high:
        middle = (low + high) // 2
        first_block = tl.load(query_start_ptr + middle) // BLOCK_M + middle
        low = tl.where(first_block <= block, middle + 1, low)
        high = tl.where(first_block <= block, high, middle)
    return low - 1


@triton.jit
def varlen_attention_kernel(out_ptr, query_ptr, key_ptr, value_ptr, tables_ptr,
                            query_start_ptr, seq_lens_ptr, num_seqs, query_row_stride,
                            out_row_stride, key_row_stride, value_row_stride, table_row_stride,
                            scale,
                            GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr,
                            IEEE: tl.constexpr):
    """Online softmax over blocks of BLOCK_N key positions, accumulating in float32.

    PAGED: key position p of sequence s is cache row tables[s, p] and its context is
    seq_lens[s]; else key position p is step row query_start_loc[s] + p and the context is the
    sequence's query rows (seq_lens is not read). Query head h reads KV head h // GROUP.
    IEEE: full-precision float32 dots (no TF32), so float32 results match the reference.
    """
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, block, BLOCK_M)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    first_row = (block - (query_start // BLOCK_M + seq)) * BLOCK_M  # within the sequence
    if first_row < query_len:
        if PAGED:
            context = tl.load(seq_lens_ptr + seq)
        else:
            context = query_len
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < query_len
        query_positions = context - query_len + rows                  # (BLOCK_M,)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_SIZE
        token_rows = (query_start + rows).to(tl.int64)
        query = tl.load(query_ptr + token_rows[:, None] * query_row_stride + head * HEAD_SIZE
                        + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        kv_offset = (head // GROUP) * HEAD_SIZE
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        end = context
        if CAUSAL:
            end = tl.minimum(context, context - query_len + first_row + BLOCK_M)
        start = 0
        while start < end:  # a while loop: Triton's interpreter cannot range() to a loaded bound
            positions = start + tl.arange(0, BLOCK_N)
            in_context = positions < end
            if PAGED:
                kv_rows = tl.load(tables_ptr + seq * table_row_stride + positions,
                                  mask=in_context, other=0).to(tl.int64)
            else:
                kv_rows = (query_start + positions).to(tl.int64)
            columns = kv_offset + dims[None, :]
            kv_mask = in_context[:, None] & dim_mask[None, :]
            key = tl.load(key_ptr + kv_rows[:, None] * key_row_stride + columns, mask=kv_mask,
                          other=0.0)                                        # (BLOCK_N, BLOCK_D)
            if IEEE:
                scores = tl.dot(query, tl.trans(key), input_precision="ieee")
            else:
                scores = tl.dot(query, tl.trans(key))
            scores = scores.to(tl.float32) * scale                          # (BLOCK_M, BLOCK_N)
            allowed = in_context[None, :]
            if CAUSAL:
                allowed = allowed & (positions[None, :] <= query_positions[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp(scores - safe_max[:, None])
            correction = tl.exp(running_max - safe_max)
            value = tl.load(value_ptr + kv_rows[:, None] * value_row_stride + columns,
                            mask=kv_mask, other=0.0)
            if IEEE:
                update = tl.dot(probs.to(value.dtype), value, input_precision="ieee")
            else:
                update = tl.dot(probs.to(value.dtype), value)
            acc = acc * correction[:, None] + update
            running_sum = running_sum * correction + tl.sum(probs, axis=1)
            running_max = new_max
            start += BLOCK_N
        result = acc / tl.maximum(running_sum, 1e-30)[:, None]
        tl.store(out_ptr + token_rows[:, None] * out_row_stride + head * HEAD_SIZE + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
