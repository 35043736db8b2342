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
    value_cache_ptr, tables_ptr, seq_lens_ptr, slots_ptr, arrivals_ptr, positions_ptr,
    cos_sin_ptr, query_row_stride, key_row_stride, value_row_stride, out_row_stride,
    table_row_stride, slot_stride, stats_plane, cos_sin_stride, half_rotary, scale, splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, KV_ROW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
    COMBINE: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_NEW: tl.constexpr,
    ROTARY: tl.constexpr, IS_NEOX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, DEPENDENT: tl.constexpr = False,
):
    """Program (sequence, KV head, split): the KV head's whole query group (GROUP query heads)
    over the split's share of the sequence's cached positions, so each K/V row is loaded once
    per group rather than once per query head.

    Split s of `splits` covers positions [s * chunk, (s + 1) * chunk) of the sequence's length
    (read from the device, so a recorded graph serves any context), chunk being the length over
    `splits` rounded up to whole blocks of BLOCK_N. Online softmax in float32. Without PARTIAL
    (one split) the program writes the normalized output; with it, the unnormalized partial
    (acc, running max, running sum) goes to the workspace, for `decode_reduce_kernel` or, with
    COMBINE, for the split program that arrives last at the (sequence, KV head)'s counter in
    `arrivals` (see `_arrive_and_combine`; BLOCK_S: `splits` padded to a power of two). WRITE_NEW
    (decoder self-attention): the newest position (length - 1) is this step's token, read from
    key/value rather than the cache, and the split that owns it also writes it to cache slot
    slots[sequence] (unless -1). ROTARY: the query and the new key arrive unrotated and are
    rotated on load (RoPE at positions[sequence] from the cos/sin table, neox or interleaved
    halves, as `rotary_kernel` does it, rounded to their dtype), so the cache gets the rotated
    key. The products run in the cache dtype (float32 accumulation);
    UPCAST runs them in float32 (Triton's CPU interpreter has no bfloat16 arithmetic).
    DEPENDENT: launched as a programmatic dependent (`triton_kernels.dependent_launch`).
    """
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()  # the kernels before have finished: their writes are visible
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
    rope_row = cos_sin_ptr
    if ROTARY:
        rope_row = cos_sin_ptr + tl.load(positions_ptr + row).to(tl.int64) * cos_sin_stride
    query = _load_head(query_ptr + row * query_row_stride + q_heads[:, None] * HEAD_SIZE,
                       dims[None, :], group_mask, rope_row, half_rotary, ROTARY,
                       IS_NEOX)                                                # (BLOCK_G, BLOCK_D)
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
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start (and wait for this)
    if WRITE_NEW:
        newest = seq_len - 1
        if (newest >= lo) & (newest < hi):
            new_key = _load_head(key_ptr + row * key_row_stride + kv_offset, dims, dim_mask,
                                 rope_row, half_rotary, ROTARY, IS_NEOX)       # (BLOCK_D,)
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
        if COMBINE:
            _arrive_and_combine(out_ptr, partial_ptr, stats_ptr, arrivals_ptr, row, kv_head,
                                out_row_stride, stats_plane, splits, NUM_HEADS, GROUP,
                                HEAD_SIZE, BLOCK_S, BLOCK_D)


@triton.jit
def _load_head(head_ptr, dims, mask, rope_row, half_rotary, ROTARY: tl.constexpr,
               IS_NEOX: tl.constexpr):
    """Features `dims` (any shape) of a head whose first feature `head_ptr` points at (pointers
    of any shape broadcasting against `dims`); ROTARY: with RoPE applied to the first
    2 * half_rotary features, from the table row `rope_row` (cos halves, then sin halves), in
    float32 and rounded back to the head's dtype."""
    x = tl.load(head_ptr + dims, mask=mask, other=0.0)
    if ROTARY:
        rotary = mask & (dims < 2 * half_rotary)
        if IS_NEOX:
            first = dims < half_rotary
            partner = tl.where(first, dims + half_rotary, dims - half_rotary)
            pair = tl.where(first, dims, dims - half_rotary)
        else:
            first = dims % 2 == 0
            partner = tl.where(first, dims + 1, dims - 1)
            pair = dims // 2
        dtype = head_ptr.dtype.element_ty
        other = tl.load(head_ptr + partner, mask=rotary, other=0.0).to(tl.float32)
        cos = tl.load(rope_row + pair, mask=rotary, other=0.0).to(dtype).to(tl.float32)
        sin = tl.load(rope_row + half_rotary + pair, mask=rotary, other=0.0)
        sin = sin.to(dtype).to(tl.float32)
        rotated = x.to(tl.float32) * cos + tl.where(first, -other, other) * sin
        x = tl.where(rotary, rotated.to(dtype), x)
    return x


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
def _arrive_and_combine(out_ptr, partial_ptr, stats_ptr, arrivals_ptr, row, kv_head,
                        out_row_stride, stats_plane, splits, NUM_HEADS: tl.constexpr,
                        GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """After a split program stored its partials: count it in at the (sequence, KV head)'s
    arrival counter; the program that arrives last combines the `splits` partials of the KV
    head's query group into the output and sets the counter back to zero, so the int32
    workspace is all zeros again when the launch ends (as the next launch, or the next replay
    of a recorded graph, needs it). Every split program arrives, empty ones and those of
    padding rows (length 0) too, so each counter reaches `splits` exactly once per launch.

    The barrier orders the whole program's partial stores before the release of the counter
    (acq_rel at GPU scope); the last arriver's acquire makes the other programs' partials
    visible to it, and `_combine_head` reads them past the (non-coherent) L1 cache."""
    tl.debug_barrier()
    counter = arrivals_ptr + row * (NUM_HEADS // GROUP) + kv_head
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == splits - 1:
        for g in range(GROUP):
            _combine_head(out_ptr, partial_ptr, stats_ptr, row, kv_head * GROUP + g,
                          out_row_stride, stats_plane, splits, NUM_HEADS, HEAD_SIZE, BLOCK_S,
                          BLOCK_D)
        tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def decode_reduce_kernel(out_ptr, partial_ptr, stats_ptr, out_row_stride, stats_plane, splits,
                         NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr, DEPENDENT: tl.constexpr = False):
    """Program (sequence, query head): combine the `splits` partials of the split decode kernel
    (the separate-launch form of its COMBINE). DEPENDENT: as the decode kernel's."""
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # one wave of small programs: let the next start
    _combine_head(out_ptr, partial_ptr, stats_ptr, tl.program_id(0).to(tl.int64),
                  tl.program_id(1), out_row_stride, stats_plane, splits, NUM_HEADS, HEAD_SIZE,
                  BLOCK_S, BLOCK_D)


@triton.jit
def _combine_head(out_ptr, partial_ptr, stats_ptr, row, head, out_row_stride, stats_plane,
                  splits, NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """The output row of one (sequence, query head) from its `splits` partials, each weighted
    by exp(its max - the overall max). Empty splits (max -inf) weigh nothing; a sequence with
    no positions (a padding row) gets a zero row. Loads bypass L1 (".cg"): in the combining
    split program the partials were written by other programs of the same launch."""
    split_ids = tl.arange(0, BLOCK_S)
    split_mask = split_ids < splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    base = (row * NUM_HEADS + head) * splits + split_ids                       # (BLOCK_S,)
    maxima = tl.load(stats_ptr + base, mask=split_mask, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(stats_ptr + stats_plane + base, mask=split_mask, other=0.0,
                   cache_modifier=".cg")
    overall = tl.max(maxima, axis=0)
    overall = tl.where(overall > float("-inf"), overall, 0.0)  # all empty: every weight 0
    weights = tl.exp(maxima - overall)
    partial = tl.load(partial_ptr + base[:, None] * HEAD_SIZE + dims[None, :],
                      mask=split_mask[:, None] & dim_mask[None, :], other=0.0,
                      cache_modifier=".cg")                                     # (BLOCK_S, BLOCK_D)
    numerator = tl.sum(partial * weights[:, None], axis=0)
    denominator = tl.sum(sums * weights, axis=0)
    result = tl.where(denominator > 0, numerator / tl.maximum(denominator, 1e-30), 0.0)
    tl.store(out_ptr + row * out_row_stride + head * HEAD_SIZE + dims,
             result.to(out_ptr.dtype.element_ty), mask=dim_mask)
