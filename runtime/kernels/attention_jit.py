"""Triton device code for decode attention over a slot-addressed KV cache.

The kernels read the step's layout from device tensors only (slot mapping, slot tables,
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
def grouped_decode_attention_kernel(
    out_ptr, partial_ptr, stats_ptr, query_ptr, key_ptr, value_ptr, key_cache_ptr,
    value_cache_ptr, tables_ptr, seq_lens_ptr, slots_ptr,
    query_row_stride, key_row_stride, value_row_stride, out_row_stride, table_row_stride,
    slot_stride, stats_plane, scale, splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, KV_ROW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
    WRITE_NEW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (sequence, KV head, split): the KV head's whole query group (GROUP query heads)
    over the split's share of the sequence's cached positions, so each K/V row is loaded once
    per group rather than once per query head.

    Split s of `splits` covers positions [s * chunk, (s + 1) * chunk) of the sequence's length
    (read from the device, so a recorded graph serves any context), chunk being the length over
    `splits` rounded up to whole blocks of BLOCK_N. Online softmax in float32. Without PARTIAL
    (one split) the program writes the normalized output; with it, the unnormalized partial
    (acc, running max, running sum) goes to the workspace for `decode_reduce_kernel`. WRITE_NEW
    (decoder self-attention): the newest position (length - 1) is this step's token, read from
    key/value rather than the cache, and the split that owns it also writes it to cache slot
    slots[sequence] (unless -1). The products run in the cache dtype (float32 accumulation);
    UPCAST runs them in float32 (Triton's CPU interpreter has no bfloat16 arithmetic).
    """
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    cached_hi = tl.minimum(hi, seq_len - 1) if WRITE_NEW else hi  # the newest: from key/value
    heads = tl.arange(0, BLOCK_G)
    head_mask = heads < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    q_heads = kv_head * GROUP + heads                                          # (BLOCK_G,)
    group_mask = head_mask[:, None] & dim_mask[None, :]
    query = tl.load(query_ptr + row * query_row_stride + q_heads[:, None] * HEAD_SIZE
                    + dims[None, :], mask=group_mask, other=0.0)               # (BLOCK_G, BLOCK_D)
    dot_dtype = tl.float32 if UPCAST else key_cache_ptr.dtype.element_ty
    query = query.to(dot_dtype)
    kv_offset = kv_head * HEAD_SIZE
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = lo
    while start < cached_hi:  # a while loop: Triton's interpreter cannot range() to a loaded bound
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < cached_hi
        slots = tl.load(tables_ptr + row * table_row_stride + positions, mask=valid,
                        other=0).to(tl.int64)
        offsets = slots[:, None] * KV_ROW + kv_offset + dims[None, :]          # (BLOCK_N, BLOCK_D)
        mask = valid[:, None] & dim_mask[None, :]
        key = tl.load(key_cache_ptr + offsets, mask=mask, other=0.0).to(dot_dtype)
        value = tl.load(value_cache_ptr + offsets, mask=mask, other=0.0).to(dot_dtype)
        acc, running_max, running_sum = _fold_block(acc, running_max, running_sum, query, key,
                                                    value, valid, scale, DOT_PRECISION)
        start += BLOCK_N
    if WRITE_NEW:
        newest = seq_len - 1
        if (newest >= lo) & (newest < hi):
            new_key = tl.load(key_ptr + row * key_row_stride + kv_offset + dims, mask=dim_mask,
                              other=0.0)                                       # (BLOCK_D,)
            new_value = tl.load(value_ptr + row * value_row_stride + kv_offset + dims,
                                mask=dim_mask, other=0.0)
            acc, running_max, running_sum = _fold_position(
                acc, running_max, running_sum, query, new_key, new_value, scale)
            slot = tl.load(slots_ptr + row * slot_stride).to(tl.int64)
            if slot >= 0:
                tl.store(key_cache_ptr + slot * KV_ROW + kv_offset + dims, new_key, mask=dim_mask)
                tl.store(value_cache_ptr + slot * KV_ROW + kv_offset + dims, new_value,
                         mask=dim_mask)
    if not PARTIAL:
        result = tl.where(running_sum[:, None] > 0,
                          acc / tl.maximum(running_sum, 1e-30)[:, None], 0.0)
        tl.store(out_ptr + row * out_row_stride + q_heads[:, None] * HEAD_SIZE + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=group_mask)
    else:
        base = (row * NUM_HEADS + q_heads) * splits + split                     # (BLOCK_G,)
        tl.store(partial_ptr + base[:, None] * HEAD_SIZE + dims[None, :], acc, mask=group_mask)
        tl.store(stats_ptr + base, running_max, mask=head_mask)
        tl.store(stats_ptr + stats_plane + base, running_sum, mask=head_mask)


@triton.jit
def _fold_block(acc, running_max, running_sum, query, key, value, valid, scale,
                DOT_PRECISION: tl.constexpr):
    """The online softmax of a query group (BLOCK_G, BLOCK_D) over a block of positions, keys
    and values (BLOCK_N, BLOCK_D) of which `valid` are real: the updated (acc, max, sum)."""
    scores = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))                   # (BLOCK_G, BLOCK_N)
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    probs = tl.exp(scores - new_max[:, None])
    correction = tl.exp(running_max - new_max)
    acc = acc * correction[:, None] + tl.dot(probs.to(value.dtype), value,
                                             input_precision=DOT_PRECISION)
    return acc, new_max, running_sum * correction + tl.sum(probs, axis=1)


@triton.jit
def _fold_position(acc, running_max, running_sum, query, key, value, scale):
    """The online softmax of a query group over one more position, of key (BLOCK_D,) and value
    (BLOCK_D,): the updated (acc, running max, running sum), in float32."""
    score = tl.sum(query.to(tl.float32) * key.to(tl.float32)[None, :], axis=1) * scale
    new_max = tl.maximum(running_max, score)
    prob = tl.exp(score - new_max)
    correction = tl.exp(running_max - new_max)
    acc = acc * correction[:, None] + prob[:, None] * value.to(tl.float32)[None, :]
    return acc, new_max, running_sum * correction + prob


@triton.jit
def decode_reduce_kernel(out_ptr, partial_ptr, stats_ptr, out_row_stride, stats_plane, splits,
                         NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Program (sequence, query head): combine the `splits` partials of the split decode kernel,
    each weighted by exp(its max - the overall max). Empty splits (max -inf) weigh nothing; a
    sequence with no positions (a padding row) gets a zero row."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    split_ids = tl.arange(0, BLOCK_S)
    split_mask = split_ids < splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    base = (row * NUM_HEADS + head) * splits + split_ids                       # (BLOCK_S,)
    maxima = tl.load(stats_ptr + base, mask=split_mask, other=float("-inf"))
    sums = tl.load(stats_ptr + stats_plane + base, mask=split_mask, other=0.0)
    overall = tl.max(maxima, axis=0)
    overall = tl.where(overall > float("-inf"), overall, 0.0)  # all empty: every weight 0
    weights = tl.exp(maxima - overall)
    partial = tl.load(partial_ptr + base[:, None] * HEAD_SIZE + dims[None, :],
                      mask=split_mask[:, None] & dim_mask[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    numerator = tl.sum(partial * weights[:, None], axis=0)
    denominator = tl.sum(sums * weights, axis=0)
    result = tl.where(denominator > 0, numerator / tl.maximum(denominator, 1e-30), 0.0)
    tl.store(out_ptr + row * out_row_stride + head * HEAD_SIZE + dims,
             result.to(out_ptr.dtype.element_ty), mask=dim_mask)
